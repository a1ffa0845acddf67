"""``gpucrypt.info()``: what this installation can do, and why not where it can't."""
from __future__ import annotations

import sys


def _version(dist: str) -> str | None:
    from importlib import metadata  # ~30 ms: imported by info() only, not by `import gpucrypt`

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def info() -> dict:
    """Versions, available backends with their details, and reasons for missing ones."""
    import platform

    from . import backends

    available = backends.available_backends()
    return {
        "gpucrypt": _version("gpucrypt"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "libraries": {name: _version(name) for name in
                      ("cryptography", "numpy", "numba", "numba-cuda", "cupy-cuda13x", "torch")},
        "backends": {name: backends.get_backend(name).describe() for name in available},
        "unavailable": backends.unavailable_reasons(),
        "auto_gpu_threshold_bytes": backends.AUTO_GPU_THRESHOLD,
    }
