"""The GPU backend: numba-cuda kernels over CuPy/numba device memory."""
from __future__ import annotations

import os


def gpu_unavailable_reason() -> str | None:
    """None when the GPU backend can run here (a device, or the simulator), else why not."""
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


class GpuBackend:
    def __init__(self):
        from . import BackendUnavailable

        raise BackendUnavailable("the GPU backend is being built (kernels not wired yet)")
