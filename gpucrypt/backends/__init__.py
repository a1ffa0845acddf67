"""Backend registry and selection: the one place that decides where work runs.

- ``cpu`` is always registered (OpenSSL through ``cryptography``).
- ``gpu`` is registered when numba-cuda reports a device, real or simulated
  (``NUMBA_ENABLE_CUDASIM=1`` runs the real kernels on NumPy buffers).

``device="auto"`` picks the GPU only when it is present and the payload is at
least :data:`AUTO_GPU_THRESHOLD` bytes; ``GPUCRYPT_DEVICE`` (``cpu``/``gpu``/``auto``)
overrides ``auto``. Under the simulator ``auto`` stays on the CPU: the simulator
exists to test kernels, not to run them.
"""
from __future__ import annotations

import os
import _thread
from typing import Any, Callable

from ._base import AEAD_ALGORITHMS, STREAM_ALGORITHMS, AeadContext, Backend

__all__ = ["Backend", "AeadContext", "AEAD_ALGORITHMS", "STREAM_ALGORITHMS", "BackendUnavailable",
           "get_backend", "select_backend", "available_backends", "unavailable_reasons",
           "AUTO_GPU_THRESHOLD", "DEVICES", "check_device", "small_payloads_on_cpu"]

DEVICES = ("auto", "cpu", "gpu")

#: Smallest host payload for which ``auto`` sends work to a GPU. Host buffers cross
#: PCIe twice (~25 GB/s each way on PCIe 5), so the GPU path is capped near 12 GB/s for
#: host data plus a launch and two synchronisations (~50 us); OpenSSL does 5-20 GB/s
#: per core. The GPU therefore wins only for large host payloads. This value is an
#: estimate from those figures, not yet measured on a GPU: ``gpucrypt bench
#: --include-transfer`` on a GPU machine is the measurement that should set it.
#: Device arrays (the tensor API) go to the GPU regardless of size.
AUTO_GPU_THRESHOLD = 8 << 20


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run on this machine; the message says why.

    ``environment``: the ``GPUCRYPT_DEVICE`` value that asked for the backend, when the
    variable chose it for a caller's ``device="auto"``, else None. The caller asked for
    ``auto``, so a message about its own ``device`` would hide the cause."""

    environment: str | None = None


_lock = _thread.allocate_lock()  # threading.Lock; threading itself loads with a pool
_instances: dict[str, Backend] = {}
_reasons: dict[str, str] = {}


def _make_cpu() -> Backend:
    from .cpu import CpuBackend

    return CpuBackend()


def _make_gpu() -> Backend:
    from ._probe import gpu_unavailable_reason

    reason = gpu_unavailable_reason()  # before the GPU module (NumPy) is imported
    if reason:
        raise BackendUnavailable(reason)
    from .gpu import GpuBackend

    return GpuBackend()


_FACTORIES: dict[str, Callable[[], Backend]] = {"cpu": _make_cpu, "gpu": _make_gpu}


def get_backend(name: str) -> Backend:
    """The backend called ``name``; raises :class:`BackendUnavailable` with the reason."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown backend {name!r}; choose one of {sorted(_FACTORIES)}")
    backend = _instances.get(name)  # made once; later calls need no lock
    if backend is not None:
        return backend
    with _lock:
        if name in _instances:
            return _instances[name]
        if name in _reasons:
            raise BackendUnavailable(_reasons[name])
        try:
            backend = _FACTORIES[name]()
        except BackendUnavailable as exc:
            _reasons[name] = str(exc)
            raise
        except Exception as exc:  # an import error deep in a GPU stack, say
            _reasons[name] = f"{name} backend failed to start: {type(exc).__name__}: {exc}"
            raise BackendUnavailable(_reasons[name]) from exc
        _instances[name] = backend
        return backend


def available_backends() -> list[str]:
    """Names of the backends that can run here."""
    names = []
    for name in _FACTORIES:
        try:
            get_backend(name)
        except BackendUnavailable:
            continue
        names.append(name)
    return names


def unavailable_reasons() -> dict[str, str]:
    """For each backend that cannot run, why not."""
    available_backends()
    return dict(_reasons)


def _simulated() -> bool:
    return os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def _environment_device() -> str:
    override = os.environ.get("GPUCRYPT_DEVICE", "auto").strip().lower() or "auto"
    if override == "cuda":  # as device="cuda"
        return "gpu"
    if override not in DEVICES:
        raise ValueError(f"GPUCRYPT_DEVICE must be one of {DEVICES} (or cuda), not {override!r}")
    return override


def _environment_backend(name: str) -> Backend:
    """``get_backend(name)`` for the backend ``GPUCRYPT_DEVICE`` chose in place of
    ``auto``: a refusal names the variable and how to undo it (the caller, who said
    ``auto``, may not know it is set)."""
    try:
        return get_backend(name)
    except BackendUnavailable as exc:
        setting = os.environ.get("GPUCRYPT_DEVICE", "").strip()
        error = BackendUnavailable(
            f"GPUCRYPT_DEVICE={setting} in the environment asks for the {name.upper()}, "
            f"which cannot run here ({exc}): unset GPUCRYPT_DEVICE, or set "
            f"GPUCRYPT_DEVICE=cpu, to run on the CPU")
        error.environment = setting
        raise error from None


def check_device(device: Any) -> str:
    """``device`` as one of :data:`DEVICES`. Also taken, as frameworks spell them: "cuda"
    and ``torch.device("cuda")`` for "gpu" (the GPU backend works on the current CUDA
    device, or on a tensor's own), ``torch.device("cpu")`` for "cpu". A device with an
    index ("cuda:1") is refused: this argument says where the cipher runs, not on which GPU."""
    if device in DEVICES:
        return device
    kind, index = device, None
    if not isinstance(device, str):  # a torch.device: its type and index
        kind, index = getattr(device, "type", device), getattr(device, "index", None)
    if isinstance(kind, str) and ":" in kind:
        kind, _, index = kind.partition(":")
    if index is None and kind in ("cuda", "cpu"):
        return "gpu" if kind == "cuda" else "cpu"
    if kind == "cuda":
        raise ValueError(f"device={device!r} names one GPU, but device here says only where "
                         f"the cipher runs: give 'gpu', and make that GPU the current device "
                         f"(torch.cuda.set_device, cupy.cuda.Device(n).use())")
    raise ValueError(f"device must be one of {DEVICES} (or 'cuda', the same as 'gpu'), not "
                     f"{device!r}")


def small_payloads_on_cpu(device: str) -> bool:
    """Check ``device`` as :func:`select_backend` does (raising the same errors) and say
    whether payloads below :data:`AUTO_GPU_THRESHOLD` run on the CPU for it. Objects
    call this once, when made, so that small calls skip selection entirely."""
    device = check_device(device)
    if device == "auto":
        if _environment_device() == "gpu":
            _environment_backend("gpu")
            return False
        return True
    if device == "gpu":
        get_backend("gpu")
        return False
    return True


def select_backend(device: str, nbytes: int = 0) -> Backend:
    """The backend for ``device`` (``auto``/``cpu``/``gpu``) and a payload of ``nbytes``."""
    if device not in DEVICES:
        device = check_device(device)
    if device == "auto":
        device = _environment_device()
        if device != "auto":
            return _environment_backend(device)
        if nbytes >= AUTO_GPU_THRESHOLD and not _simulated():
            try:
                return get_backend("gpu")
            except BackendUnavailable:
                pass
        return get_backend("cpu")
    return get_backend(device)


_no_driver: bool | None = None


def every_payload_on_cpu(device: str) -> bool:
    """Whether :func:`select_backend` can only answer the CPU for ``device`` (already
    checked by :func:`small_payloads_on_cpu`), whatever the size: asked for by name or
    by ``GPUCRYPT_DEVICE``, or ``auto`` on a machine with no CUDA driver library (outside
    the simulator). Objects ask once, when made, so that on such a machine every call of
    an ``auto`` object goes straight to OpenSSL. Costs one failed ``dlopen`` per process."""
    global _no_driver
    if device == "auto":
        device = _environment_device()
    if device != "auto":
        return device == "cpu"
    if _simulated() or os.environ.get("NUMBA_CUDA_DRIVER"):
        return False
    if _no_driver is None:
        from ._probe import _cuda_driver_loadable

        _no_driver = not _cuda_driver_loadable()
    return _no_driver
