"""Test configuration shared by the whole suite.

GPU code is tested on a real GPU when one is present and in numba's CUDA
simulator otherwise. The choice must be made before numba is imported, so it
happens here, at collection time:

- ``NUMBA_ENABLE_CUDASIM`` already set: respected as it is.
- no NVIDIA driver on the machine: the simulator is switched on, so the ``gpu``
  backend runs the very same kernels on NumPy buffers.
- ``GPUCRYPT_REQUIRE_GPU=1``: the simulator is never switched on, and every test
  that needs a real GPU fails instead of skipping.
"""
from __future__ import annotations

import ctypes.util
import glob
import os
import sys

import pytest

# ``python -m pytest`` puts the repository root on sys.path, where the top-level
# ``kernels/`` folder (installed as ``gpucrypt.kernels``) would shadow any other package
# named ``kernels``: transformers >= 5.25 imports Hugging Face's ``kernels`` and got ours.
# gpucrypt itself is imported from its installation (editable or not), never from there.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]

REQUIRE_GPU = os.environ.get("GPUCRYPT_REQUIRE_GPU") == "1"


def _driver_present() -> bool:
    return bool(glob.glob("/dev/nvidia[0-9]*")) or ctypes.util.find_library("cuda") is not None


if "NUMBA_ENABLE_CUDASIM" not in os.environ and not REQUIRE_GPU and not _driver_present():
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"

ON_CUDASIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def _real_gpu_reason() -> str | None:
    """None when a real GPU is usable, else why not."""
    if ON_CUDASIM:
        return "numba's CUDA simulator is active (NUMBA_ENABLE_CUDASIM=1); no real GPU in use"
    try:
        from numba import cuda
    except Exception as exc:  # pragma: no cover - depends on the machine
        return f"numba-cuda is not importable: {exc}"
    if not cuda.is_available():
        return "numba-cuda finds no CUDA device or driver"
    return None


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") is None:
        return
    reason = _real_gpu_reason()
    if reason is None:
        return
    if REQUIRE_GPU:
        pytest.fail("GPUCRYPT_REQUIRE_GPU=1 but " + reason, pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def on_cudasim() -> bool:
    return ON_CUDASIM


@pytest.fixture(params=[pytest.param("cpu"), pytest.param("gpu", marks=pytest.mark.cudasim)])
def device(request) -> str:
    """Each registered backend in turn: the same test body runs on the CPU and the GPU.

    The GPU runs in numba's simulator where no GPU exists. A GPU backend that cannot
    start skips with the reason, or fails under ``GPUCRYPT_REQUIRE_GPU=1``.
    """
    name = request.param
    if name == "gpu":
        from _reference import require_gpu_backend

        require_gpu_backend()
    return name


@pytest.fixture
def workers_in_place(monkeypatch):
    """One ChaCha20-Poly1305 message in place on several threads runs on the pool's workers
    whatever cryptography is installed: where it refuses in place (51) the CPU backend
    takes its one-thread forms instead (faster there), and the pool path's own rules
    (pieces taken back, interrupts, worker failures), which 50 runs, are tested on both."""
    from gpucrypt.backends import cpu

    monkeypatch.setattr(cpu._ChaCha20Poly1305, "_parallel",
                        lambda self, threads, data, out: threads >= 2 and len(data) >= cpu.PARALLEL_MIN)
