"""Can the GPU backend run here? Asked without importing NumPy or numba.

``device="auto"`` asks this for every large payload: on a machine without a GPU the
answer must cost a ``dlopen`` that fails, not the ~0.1 s and tens of MiB of importing
NumPy (the GPU backend's module) or the ~0.4 s and ~100 MiB of numba.
"""
from __future__ import annotations

import os
import sys


def _cuda_driver_loadable() -> bool:
    """Whether the CUDA driver library loads. Checked before numba is imported (which
    costs ~0.4 s and ~100 MiB), so that a machine without a GPU decides at once: a
    ``device="auto"`` command there pays nothing for asking."""
    if os.environ.get("NUMBA_CUDA_DRIVER"):  # numba is told where the driver is
        return True
    import ctypes

    for name in (("nvcuda.dll",) if sys.platform == "win32" else ("libcuda.so.1", "libcuda.so")):
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            pass
    return False


def gpu_unavailable_reason() -> str | None:
    """None when the GPU backend can run here (a device, or the simulator), else why not."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1" and not _cuda_driver_loadable():
        return ("no CUDA driver library (libcuda) can be loaded: this machine has no NVIDIA "
                "GPU driver; use device='cpu', or install the driver")
    try:
        from numba import cuda
    except ImportError as exc:
        return (f"numba-cuda is not installed ({exc}); install the GPU extra: "
                f"pip install 'gpucrypt[gpu]'")
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return None
    try:
        if not cuda.is_available():
            return ("numba-cuda finds no usable CUDA device or driver "
                    "(no NVIDIA GPU, driver not loaded, or CUDA libraries missing)")
        cuda.get_current_device()
    except Exception as exc:  # driver errors come in many types
        return f"CUDA initialisation failed: {type(exc).__name__}: {exc}"
    return None
