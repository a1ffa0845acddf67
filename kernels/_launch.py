"""Launch geometry, segment lookup and kernel-report registration shared by all kernels.

Segment tables
--------------
A launch covers ``n`` segments. Work is cut into *units* (a 64-byte ChaCha20
block, a 16-byte AES block, a run of MAC blocks ...). ``unit_start`` is a
``uint64[n + 1]`` exclusive prefix sum of units per segment; a thread that owns
global unit ``u`` finds its segment with :func:`find_segment`, a binary search
(``log2(n)`` steps, done once per unit and amortised over its bytes).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from numba import cuda, uint64, int64

def is_simulator() -> bool:
    """True when numba runs kernels in its CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``)."""
    from numba import config

    return bool(config.ENABLE_CUDASIM)


#: Lanes per warp. Every kernel works with any block size up to THREADS_PER_BLOCK that
#: is a multiple of it (and all but poly1305's tile kernel with any size at all).
WARP_LANES = 32

#: Threads per block: the one constant every kernel sizes its shared memory with and
#: every launcher launches with (at most). On the device, 256 keeps 8 blocks per SM
#: resident at <= 32 registers. Under the simulator every thread is a Python thread
#: and the grid is one block (``grid_for``), so a launch costs in proportion to its
#: block size even when most threads idle; one warp is the smallest block that
#: every kernel supports (poly1305's 32-lane tiles) and keeps tests fast.
THREADS_PER_BLOCK = WARP_LANES if is_simulator() else 256

#: Resident blocks per SM we aim for with grid-stride loops.
BLOCKS_PER_SM = 8


@functools.lru_cache(maxsize=None)
def sm_count() -> int:
    """Number of streaming multiprocessors of the current device (1 in the simulator)."""
    dev = cuda.get_current_device()
    return int(getattr(dev, "MULTIPROCESSOR_COUNT", 1) or 1)


def grid_for(units: int, threads: int = THREADS_PER_BLOCK) -> int:
    """Blocks to launch for ``units`` work units with a grid-stride loop.

    Enough blocks to fill the device (``BLOCKS_PER_SM`` per SM), never more than
    the work needs. Under the simulator every thread is a Python thread, so the
    grid is kept to a single block.
    """
    if units <= 0:
        return 0
    if is_simulator():
        return 1
    needed = (units + threads - 1) // threads
    return max(1, min(needed, sm_count() * BLOCKS_PER_SM))


def threads_for(units: int, multiple: int = 1) -> int:
    """Threads per block to launch for ``units`` work units (one unit per thread).

    ``THREADS_PER_BLOCK`` on the device. Under the simulator, where every thread
    is a Python thread and the grid is one block, no more than the work needs,
    rounded up to ``multiple`` (the kernel's granularity, e.g. a 32-lane tile),
    and never more than ``THREADS_PER_BLOCK``; kernels must therefore accept any
    ``blockDim.x`` that is a multiple of ``multiple`` up to ``THREADS_PER_BLOCK``.
    """
    if not is_simulator():
        return THREADS_PER_BLOCK
    needed = -(-max(int(units), 1) // multiple) * multiple
    return min(THREADS_PER_BLOCK, needed)


@cuda.jit(device=True, inline=True)
def find_segment(unit_start, n_segments, unit):
    """Index ``s`` with ``unit_start[s] <= unit < unit_start[s + 1]`` (binary search)."""
    lo = int64(0)
    hi = int64(n_segments) - int64(1)
    u = uint64(unit)
    while lo < hi:
        mid = (lo + hi + int64(1)) >> int64(1)
        if uint64(unit_start[mid]) <= u:
            lo = mid
        else:
            hi = mid - int64(1)
    return lo


def unit_prefix(units_per_segment: np.ndarray) -> np.ndarray:
    """Exclusive prefix sum (``uint64[n + 1]``) of the units each segment needs."""
    out = np.zeros(len(units_per_segment) + 1, dtype=np.uint64)
    np.cumsum(np.asarray(units_per_segment, dtype=np.uint64), out=out[1:])
    return out


@dataclass(frozen=True)
class ReportEntry:
    """One kernel for ``benchmarks/kernel_report.py``.

    ``pyfunc`` is the undecorated Python function of the kernel, ``signature`` the
    numba signature string to compile it for, and ``bytes_per_iteration`` the data
    bytes one thread processes per iteration of its main loop, so that the static
    SASS count of that loop can be turned into instructions per byte.
    """

    name: str
    pyfunc: Callable[..., Any]
    signature: str
    bytes_per_iteration: int
    note: str = ""
