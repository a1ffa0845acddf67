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

from ._compile import ON_SIMULATOR, device_function


def is_simulator() -> bool:
    """True when numba runs kernels in its CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``): read
    once, when numba was imported (every launch asks, several times)."""
    return ON_SIMULATOR


#: Lanes per warp. Every kernel works with any block size up to THREADS_PER_BLOCK that
#: is a multiple of it (and all but poly1305's tile kernel with any size at all).
WARP_LANES = 32

#: Threads per block: the one constant every kernel sizes its shared memory with and
#: every launcher launches with (at most). Under the simulator every thread is a
#: Python thread and the grid is one block (``grid_for``), so a launch costs in
#: proportion to its block size even when most threads idle; one warp is the smallest
#: block that every kernel supports (poly1305's 32-lane tiles) and keeps tests fast.
THREADS_PER_BLOCK = WARP_LANES if is_simulator() else 256

#: The fewest blocks a launch has. numba-cuda warns ("Grid size N will likely result in
#: GPU under-utilization due to low occupancy", an error under ``-W error``) at every
#: launch of fewer; a block past the work finds no unit and exits at once, so a small
#: launch of 128 blocks costs what one of a few blocks does.
MIN_GRID_BLOCKS = 128

#: Per-SM budgets of sm_90 (H100/H200), for the estimate when the driver's occupancy
#: API cannot answer: registers, threads, shared memory, blocks; the register
#: allocation unit per warp; the shared memory the driver reserves per block.
SM90_LIMITS = {"MAX_REGISTERS_PER_MULTIPROCESSOR": 65536, "MAX_THREADS_PER_MULTIPROCESSOR": 2048,
               "MAX_SHARED_MEMORY_PER_MULTIPROCESSOR": 233472, "MAX_BLOCKS_PER_MULTIPROCESSOR": 32}
_REGISTER_UNIT = 256
_RESERVED_SHARED_PER_BLOCK = 1024


def _device_id() -> int:
    return int(getattr(cuda.get_current_device(), "id", 0) or 0)


def sm_count() -> int:
    """Number of streaming multiprocessors of the current device (1 in the simulator)."""
    return _sm_count(_device_id())


@functools.lru_cache(maxsize=None)
def _sm_count(device_id: int) -> int:
    dev = cuda.get_current_device()
    return int(getattr(dev, "MULTIPROCESSOR_COUNT", 1) or 1)


def estimate_resident_blocks(regs_per_thread: int, shared_per_block: int, threads: int,
                             limits: dict | None = None) -> int:
    """Blocks of ``threads`` threads an SM holds at once for a kernel of
    ``regs_per_thread`` registers and ``shared_per_block`` bytes of static shared
    memory, from the SM's budgets (``limits``: device attribute names as in
    ``SM90_LIMITS``, which fills what is missing). Registers are allocated per warp
    in units of 256. At least 1."""
    lim = dict(SM90_LIMITS, **(limits or {}))
    warps = -(-int(threads) // WARP_LANES)
    regs_per_warp = -(-int(regs_per_thread) * WARP_LANES // _REGISTER_UNIT) * _REGISTER_UNIT
    by_registers = (lim["MAX_REGISTERS_PER_MULTIPROCESSOR"] // max(regs_per_warp, 1)) // warps
    by_threads = lim["MAX_THREADS_PER_MULTIPROCESSOR"] // (warps * WARP_LANES)
    by_shared = lim["MAX_SHARED_MEMORY_PER_MULTIPROCESSOR"] // (int(shared_per_block) + _RESERVED_SHARED_PER_BLOCK)
    return max(1, min(by_registers, by_threads, by_shared, lim["MAX_BLOCKS_PER_MULTIPROCESSOR"]))


_resident: dict = {}


def resident_blocks(kernel: Any, args: tuple, threads: int) -> int:
    """Blocks of ``kernel`` (a numba dispatcher, compiled here for ``args`` if it is not
    yet) that the whole current device holds at once with ``threads`` per block: the
    driver's occupancy API, or where it cannot answer the estimate from the kernel's
    registers and shared memory and the device's budgets."""
    overloads = getattr(kernel, "overloads", {})
    overload = next(iter(overloads.values())) if len(overloads) == 1 else \
        kernel.compile(tuple(kernel.typeof_pyval(a) for a in args))
    key = (id(overload), int(threads), _device_id())
    found = _resident.get(key)
    if found is None:
        try:
            found = int(overload.max_cooperative_grid_blocks(int(threads)))
        except Exception:  # no answer from the driver: work it out
            dev = cuda.get_current_device()
            limits = {name: getattr(dev, name) for name in SM90_LIMITS if hasattr(dev, name)}
            found = sm_count() * estimate_resident_blocks(
                overload.regs_per_thread, overload.shared_mem_per_block, threads, limits)
        _resident[key] = found = max(1, found)
    return found


def grid_for(units: int, threads: int = THREADS_PER_BLOCK, resident: int | None = None) -> int:
    """Blocks to launch for ``units`` work units with a grid-stride loop.

    No more blocks than the device holds at once (``resident``, from
    :func:`resident_blocks`; a grid larger than that runs a late second wave), no more
    than the work needs, and never fewer than ``MIN_GRID_BLOCKS``: where that is more
    than the device holds, whole waves of it, so that every wave is full. Under the
    simulator every thread is a Python thread, so the grid is a single block.
    """
    if units <= 0:
        return 0
    if is_simulator():
        return 1
    needed = (units + threads - 1) // threads
    full = resident if resident is not None else sm_count() * estimate_resident_blocks(32, 0, threads)
    blocks = min(needed, full)
    if blocks < MIN_GRID_BLOCKS:
        blocks = MIN_GRID_BLOCKS if needed <= full else full * -(-MIN_GRID_BLOCKS // full)
    return blocks


def launch(kernel: Any, units: int, args: tuple, stream, *, multiple: int = 1, grid_stride: bool = True) -> None:
    """Queue ``kernel(*args)`` on ``stream`` over ``units`` work units (one per thread, in
    a grid-stride loop): ``threads_for`` threads per block, ``grid_for`` blocks sized by
    the kernel's own occupancy on the current device. Nothing for no units.

    ``grid_stride=False``: for a kernel whose threads do one unit each (no grid-stride loop),
    a grid that covers every unit (at least ``MIN_GRID_BLOCKS`` blocks on a device; the
    kernel must let blocks past the work exit at once)."""
    threads = threads_for(units, multiple)
    if units <= 0:
        return
    if not grid_stride:
        needed = -(-int(units) // threads)
        kernel[needed if is_simulator() else max(needed, MIN_GRID_BLOCKS), threads, stream](*args)
        return
    resident = None
    if not is_simulator():
        try:
            resident = resident_blocks(kernel, args, threads)
        except Exception as exc:  # pragma: no cover - a numba-cuda without these attributes
            _warn_once(f"{getattr(kernel, '__name__', kernel)}: no occupancy figure ({type(exc).__name__}: "
                       f"{exc}); its grid assumes 32 registers per thread")
    kernel[grid_for(units, threads, resident), threads, stream](*args)


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    import warnings

    warnings.warn(message, RuntimeWarning, stacklevel=3)


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


@device_function
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


def mac_messages(aad_offsets, aad_lengths, ct_offsets, ct_lengths) -> tuple[np.ndarray, np.ndarray]:
    """Host table of AEAD messages for the MAC kernels (GHASH and Poly1305 share it).

    Returns ``(layout, blocks)``: ``uint64[n, 4]`` rows ``(aad offset, aad length,
    ct offset, ct length)`` (C-contiguous), and ``uint64[n]``, the 16-byte blocks of
    each message's MAC input ``aad || pad16 || ct || pad16 || lengths block``.
    """
    cols = [np.asarray(a, dtype=np.uint64).reshape(-1) for a in (aad_offsets, aad_lengths, ct_offsets, ct_lengths)]
    layout = np.ascontiguousarray(np.stack(cols, axis=1).reshape(-1, 4))
    sixteen = np.uint64(16)
    blocks = ((layout[:, 1] + np.uint64(15)) // sixteen + (layout[:, 3] + np.uint64(15)) // sixteen
              + np.uint64(1))
    return layout, blocks


@dataclass(frozen=True)
class InnerLoop:
    """One loop nested in a kernel's main loop, as ``benchmarks/kernel_report.py`` counts it.

    ``what`` says which source loop it is (for the reader). ``trips`` is how many
    times its body runs per iteration of the main loop on the path bulk data takes;
    0 for loops off that path (the ``find_segment`` binary search, byte paths for
    unaligned edges, once-per-message work), which the report then lets the hot
    path skip. ``ops`` are SASS opcode prefixes that the loop must contain (e.g.
    ``("LDS",)`` for AES's round loop), so a declaration cannot silently land on
    the wrong loop when the compiler reorders code.
    """

    what: str
    trips: int = 0
    ops: tuple = ()


@dataclass(frozen=True)
class ReportEntry:
    """One kernel for ``benchmarks/kernel_report.py``.

    ``pyfunc`` is the undecorated Python function of the kernel and ``signature`` the
    numba signature string to compile it for. ``inner_loops`` declares *every* loop
    nested in the kernel's main (grid-stride) loop, in the order of the SASS (their
    heads' addresses), with its trip count per main-loop iteration on the data path;
    the report refuses a kernel whose SASS has a different number of inner loops.
    ``bytes_per_iteration`` is the data bytes one thread processes per main-loop
    iteration when the inner loops run those trips, so that the static SASS count
    (hot path plus inner-loop bodies times trips) becomes instructions per byte.
    ``data_path_ops``: SASS opcode prefixes whose every instruction in the main loop
    bulk data executes (e.g. ``("STG.E.128",)``), which the counted path must pass.
    ``variant`` tells apart entries of one kernel measured with different trips
    (AES-128 / AES-256); the compiled code is the same. ``launch_bounds``: the
    ``(max threads per block, min blocks per SM)`` the kernel is compiled with
    (``kernels._compile.kernel``), empty for none; the report compiles with the same.
    ``grid_stride=False``: the kernel has no grid-stride loop (one unit per thread,
    ``launch(..., grid_stride=False)``); the report then counts one pass of the whole
    kernel, and every loop in it is an inner loop to declare.
    """

    name: str
    pyfunc: Callable[..., Any]
    signature: str
    bytes_per_iteration: int
    note: str = ""
    inner_loops: tuple = ()
    data_path_ops: tuple = ()
    variant: str = ""
    launch_bounds: tuple = ()
    grid_stride: bool = True
