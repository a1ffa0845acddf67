"""How the kernels are compiled: device functions inlined by NVVM, and a disk cache keyed on the package.

Device functions: :func:`device_function`
-----------------------------------------
numba-cuda's ``inline=True`` (``"always"``) inlines a device function into its
caller at the *numba IR* level: the callee's IR is copied into every call site and
the whole kernel is typed and rewritten again after each copy. ChaCha20's ten
unrolled double rounds (80 quarter rounds, 320 rotates) took about 140 s to
compile that way, nearly all of it numba typing and IR inlining (NVVM itself took
0.3 s). :func:`device_function` compiles each device function once per signature
as an ordinary function and asks NVVM to inline it (``forceinline``: LLVM's
``alwaysinline``), which gives the same machine code (checked with the kernel
report) in a few seconds. The simulator has no NVVM and no ``forceinline``
option; there the plain device function runs.

Kernels: :func:`kernel`
-----------------------
``cuda.jit(cache=True)`` keys its on-disk cache on the kernel's own bytecode and
the modification time of the file that defines it. The device functions it
inlines from other modules (``_launch.find_segment``, ``_vector_io``'s loads and
stores, constants such as ``THREADS_PER_BLOCK``) are not in that key, so an edit
there would reuse stale machine code. :func:`kernel` adds a hash of the *contents*
of every module of this package (:func:`package_source_hash`), a superset of what
any kernel inlines, to the key. Where numba-cuda's cache class is not where this
module expects it, caching is switched off rather than left stale.

Filling the cache ahead of first use is ``gpucrypt warmup`` (``gpucrypt/cli``),
which runs a few small messages through every kernel on the current GPU.

NumPy 2.5 and numba-cuda 0.30: :func:`restore_numpy_row_stack`
----------------------------------------------------------------
The first compilation for the CUDA target loads numba-cuda's array registry, which
registers an overload for ``np.row_stack`` whenever NumPy is 2.0 or later. NumPy 2.5
removed that name (an alias of ``np.vstack`` since 1.x), so under NumPy 2.5 every
kernel compile fails with ``AttributeError: module 'numpy' has no attribute
'row_stack'`` (seen on an H200 on 2026-12-04, numba-cuda 0.30.4, NumPy 2.5.2: every GPU
test failed). numba-cuda is in maintenance mode and declined the fix (NVIDIA/numba-cuda
#907, #916). Before anything here compiles, the alias is given back to NumPy, as the
very function it named; nothing else of NumPy is touched, and a NumPy that still has
the name is left alone.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import os
import warnings

from numba import cuda

from numba import config

#: numba's CUDA simulator is on (read once, like ``_launch.is_simulator``, which imports this module).
ON_SIMULATOR = bool(config.ENABLE_CUDASIM)


def restore_numpy_row_stack(numpy_module=None) -> bool:
    """Give ``numpy.row_stack`` back (as ``numpy.vstack``) where NumPy >= 2.5 removed it; True if it did.

    numba-cuda 0.30's CUDA target cannot compile anything without the name (module
    docstring). Idempotent; a NumPy that has the name is not changed.
    """
    if numpy_module is None:
        import numpy as numpy_module
    if hasattr(numpy_module, "row_stack"):
        return False
    numpy_module.row_stack = numpy_module.vstack
    return True


if not ON_SIMULATOR:
    restore_numpy_row_stack()

#: The folder of this package: every ``*.py`` in it counts in the cache key.
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def device_function(pyfunc):
    """A device function, inlined into its callers by NVVM (not by numba's IR inliner)."""
    if ON_SIMULATOR:
        return cuda.jit(device=True)(pyfunc)
    if "forceinline" not in inspect.signature(cuda.jit).parameters:  # pragma: no cover - old numba-cuda
        return cuda.jit(device=True, inline=True)(pyfunc)
    return cuda.jit(device=True, forceinline=True)(pyfunc)


@functools.lru_cache(maxsize=None)
def package_source_hash(folder: str = PACKAGE_DIR) -> str:
    """SHA-256 over the names and contents of the ``*.py`` files of ``folder`` (sorted by name)."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(folder, name), "rb") as f:
            data = f.read()
        digest.update(name.encode() + b"\0" + len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()


@functools.lru_cache(maxsize=None)
def _package_keyed_cache_class():
    """numba-cuda's CUDACache with :func:`package_source_hash` added to its index key, or None."""
    try:
        from numba.cuda.dispatcher import CUDACache
    except ImportError:  # pragma: no cover - depends on numba-cuda's layout
        return None

    class PackageKeyedCache(CUDACache):
        """On-disk kernel cache whose key also covers every module of ``gpucrypt.kernels``."""

        def _index_key(self, sig, codegen):
            return super()._index_key(sig, codegen) + (("gpucrypt.kernels", package_source_hash()),)

    return PackageKeyedCache


#: Every kernel made by :func:`kernel`, in the order their modules defined them (for ``gpucrypt warmup``).
KERNELS: list = []


def kernel(pyfunc, *, launch_bounds=()):
    """``cuda.jit`` for a kernel: lazy (compiled at the first launch), cached on disk under a package-wide key.

    ``launch_bounds``: ``(max threads per block, min blocks per SM)`` for ptxas (PTX
    ``.maxntid``/``.minnctapersm``, which caps the registers per thread), empty for none;
    ignored by the simulator."""
    if ON_SIMULATOR:
        dispatcher = cuda.jit(pyfunc)
        KERNELS.append(dispatcher)
        return dispatcher
    cache_class = _package_keyed_cache_class()
    options = {"launch_bounds": tuple(launch_bounds)} if launch_bounds else {}
    dispatcher = cuda.jit(cache=cache_class is not None, **options)(pyfunc)
    if cache_class is not None and hasattr(dispatcher, "_cache"):
        dispatcher._cache = cache_class(pyfunc)
    elif cache_class is not None:  # pragma: no cover - depends on numba-cuda
        warnings.warn("numba-cuda's dispatcher has no _cache attribute: kernels are compiled without the disk "
                      "cache", RuntimeWarning, stacklevel=2)
    KERNELS.append(dispatcher)
    return dispatcher


def kernel_name(dispatcher) -> str:
    """``module.function`` of a kernel made by :func:`kernel` (e.g. ``ghash._ghash_blocks``)."""
    fn = dispatcher.py_func
    return f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}"


def cache_dir(dispatcher) -> str | None:
    """Where numba keeps a kernel's compiled code on disk (None: no disk cache, e.g. the simulator)."""
    cache = getattr(dispatcher, "_cache", None)
    return getattr(cache, "cache_path", None)
