"""Kernel report: compile every gpucrypt kernel for sm_90 and measure its machine code.

Usage::

    python benchmarks/kernel_report.py [--json FILE] [--sass-dir DIR]

No GPU is needed. The script turns numba's CUDA simulator off in its own process
(``NUMBA_ENABLE_CUDASIM`` is removed before numba is imported), compiles each
kernel listed in the ``KERNEL_REPORT`` of any ``gpucrypt.kernels.*`` module with
``numba.cuda.compile_ptx(pyfunc, signature, cc=(9, 0))``, assembles the PTX with
``ptxas -arch=sm_90 -v`` and disassembles the cubin with ``nvdisasm`` (or
``cuobjdump -sass``). A module that fails to import is skipped, with the reason.

Per kernel it prints:

* registers per thread, stack frame, spill store/load bytes (from ``ptxas -v``);
* ``LDL``/``STL`` instructions in the SASS (local memory: spills or local arrays);
* global memory accesses of one main-loop iteration and whether they are 128-bit
  (``LDG.E.128`` / ``STG.E.128``);
* SASS instructions per byte.

How instructions per byte are counted
--------------------------------------
Statically, from the SASS, without running anything, for one iteration of the
kernel's main loop as bulk data runs it:

1. The *main loop* is the outermost loop of the kernel: the backward branch
   with the largest span (the grid-stride loop). A kernel with no backward
   branch is one straight pass, and its whole body is counted.
2. Every *inner loop* (a backward branch inside the main loop; one loop per
   branch target) must be declared in the kernel's ``ReportEntry.inner_loops``
   (``kernels/_launch.py: InnerLoop``), in address order, with ``trips``: how
   many times its body runs per main-loop iteration on the data path (AES: the
   round loop, ``rounds - 1``, so AES-128 and AES-256 are separate rows; GHASH
   and Poly1305: the Horner loop, one trip per 16-byte block of a chunk), or 0
   for a loop off the data path (binary search over the segment table, byte
   paths for unaligned edges, once-per-message work). The report stops with an
   error when the SASS holds a different number of inner loops than declared, or
   a declared loop lacks the opcodes its ``ops`` names, so a declaration cannot
   drift onto the wrong loop unnoticed.
3. The *path* is the shortest path, in instructions, from the main loop's head
   through the head of every loop with ``trips > 0`` and every instruction
   whose opcode the entry's ``data_path_ops`` names (AES and ChaCha20: the
   ``STG.E.128`` that write the data, so the path cannot take the early exit of
   a block outside its segment), in address order, to the main loop's back-edge
   branch, following fall-through and branch edges; each
   leg is the fewest instructions, so branches off the data path (a segment
   change, the byte path for heads and tails, zero-trip guards of loops with
   ``trips = 0``) are avoided where the code allows. The path runs each data-path
   loop's body once. A loop's *cycle* is the shortest path from its head round
   to one of its back edges (the full-block path of a loop with a partial-block
   branch).
4. ``per iteration = path + sum over inner loops of (trips - 1) * cycle``, and
   ``instructions per byte = per iteration / bytes_per_iteration``, with
   ``bytes_per_iteration`` from the ``ReportEntry`` (the bytes those trips
   process). Every instruction counts once, predicated or not.

A kernel without a grid-stride loop (``ReportEntry.grid_stride=False``: one unit per
thread, launched with a grid that covers every unit) is counted as one pass, from its
first instruction to its last ``EXIT``, with every loop in it an inner loop to declare
(GHASH's one-key kernel: the per-block copy of its tables, trips = its share of the copy).
A kernel compiled with launch bounds (``ReportEntry.launch_bounds``, as
``kernels._compile.kernel`` compiles it) is compiled here with the same bounds.

A loop declared with 0 trips whose body the path still runs (no zero-trip
guard) makes the count a lower bound: that is a FAIL. Loops nested in a
data-path loop are supported only under an outer loop of at most one trip
(Poly1305's step loop). The whole main-loop body (every path) is printed as
``loop body``; the global loads and stores listed are those of one iteration.
The binary search over the segment table costs about ``26 * log2(n_segments)``
more instructions when a thread changes segment.

Targets (PASS/FAIL): zero spill bytes and zero LDL/STL everywhere; ChaCha20
at most 17 instructions per byte on the hot path (the GUIDE's hand-written CUDA C
reference is 16.5); GHASH's bulk kernel (``ghash_blocks``, one key per call) at most 20
instructions per byte and 64 registers, ``ghash_combine`` at most 64 registers (the
mixed-key ``ghash_blocks_mixed_keys`` and the set-up ``ghash_key_tables`` are reported
with their figures, without targets); every kernel's first compile (numba to PTX, then
ptxas) at most 15 s, printed per kernel.

Tools are looked up on PATH, under ``$CUDA_HOME/bin``, ``/usr/local/cuda/bin``,
``/usr/local/cuda-*/bin``, and in the pip wheels ``nvidia-cuda-nvcc`` (ptxas),
``nvidia-cuda-nvdisasm`` and ``nvidia-cuda-cuobjdump``. compile_ptx also needs
NVVM (a CUDA toolkit, or the ``nvidia-nvvm`` wheel) and NVRTC (``nvidia-cuda-nvrtc``).
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import importlib
import json
import os
import pkgutil
import re
import resource
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import traceback
import types
from dataclasses import asdict, dataclass, field

#: Instruction-per-byte targets by kernel name (hot path). Kernels not listed have none.
INSTR_PER_BYTE_TARGETS = {"chacha20_xor": 17.0, "ghash_blocks": 20.0}

#: Register-per-thread targets by kernel name. Kernels not listed have none.
REGISTER_TARGETS = {"ghash_blocks": 64, "ghash_combine": 64}

#: CPU seconds a kernel's first compile (numba typing, lowering and NVVM to PTX, then
#: ptxas) may take, measured in this process in report order: the first kernel also
#: pays numba's start-up, and device functions shared with an earlier kernel are
#: already typed (as in a program that launches several kernels). CPU time, not the
#: clock, so that a busy shared machine does not fail the target; the clock is printed too.
COMPILE_SECONDS_TARGET = 15.0

#: pip packages that provide each tool.
TOOL_PACKAGES = {
    "ptxas": "nvidia-cuda-nvcc (or a CUDA toolkit)",
    "nvdisasm": "nvidia-cuda-nvdisasm (or a CUDA toolkit)",
    "cuobjdump": "nvidia-cuda-cuobjdump (or a CUDA toolkit)",
}


# --------------------------------------------------------------------------- tools

def _tool_dirs() -> list[str]:
    dirs = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            dirs.append(os.path.join(os.environ[var], "bin"))
    dirs.append("/usr/local/cuda/bin")
    dirs.extend(sorted(glob.glob("/usr/local/cuda-*/bin"), reverse=True))
    for site in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        dirs.extend(sorted(glob.glob(os.path.join(site, "nvidia", "*", "bin")), reverse=True))
    return dirs


def find_tool(name: str) -> str | None:
    """Absolute path of a CUDA tool, or None."""
    found = shutil.which(name)
    if found:
        return found
    for d in _tool_dirs():
        candidate = os.path.join(d, name)
        if os.access(candidate, os.X_OK):
            return candidate
    return None


# --------------------------------------------------------------------------- SASS parsing

_SASS_LINE = re.compile(
    r"^\s*/\*(?P<addr>[0-9a-f]{4,})\*/\s+(?P<pred>@!?U?P[T0-9]+\s+)?(?P<op>[A-Z][A-Z0-9_.]*)(?P<args>[^;]*);"
)
_LABEL_LINE = re.compile(r"^\s*(?P<label>\.L_[A-Za-z0-9_]+):")
_BRANCH_HEX = re.compile(r"0x([0-9a-f]+)\s*$")
_BRANCH_LABEL = re.compile(r"`\((?P<label>\.L_[A-Za-z0-9_]+)\)\s*$")


@dataclass
class Instr:
    addr: int
    op: str
    predicated: bool
    target: int | None  # branch target address for BRA


def parse_sass(text: str) -> list[Instr]:
    """Instructions of the first kernel in a listing (nvdisasm or cuobjdump), in address order.

    Branch targets are resolved whether the listing writes them as addresses
    (cuobjdump: ``BRA 0x330``) or as labels (nvdisasm: ``BRA `(.L_x_3)``).
    """
    out: list[Instr] = []
    labels: dict[str, int] = {}
    pending_labels: list[str] = []
    raw_targets: list[object] = []
    for line in text.splitlines():
        lab = _LABEL_LINE.match(line)
        if lab:
            pending_labels.append(lab.group("label"))
            continue
        m = _SASS_LINE.match(line)
        if not m:
            continue
        addr = int(m.group("addr"), 16)
        if out and addr <= out[-1].addr:
            break  # a second kernel or section: keep the first
        for name in pending_labels:
            labels[name] = addr
        pending_labels.clear()
        op = m.group("op")
        pred = m.group("pred")
        predicated = bool(pred) and pred.strip() != "@PT"
        target: object = None
        if op.startswith("BRA"):
            args = m.group("args").strip()
            t = _BRANCH_HEX.search(args)
            if t:
                target = int(t.group(1), 16)
            else:
                t = _BRANCH_LABEL.search(args)
                target = t.group("label") if t else None
        out.append(Instr(addr, op, predicated, None))
        raw_targets.append(target)
    for ins, target in zip(out, raw_targets):
        ins.target = labels.get(target) if isinstance(target, str) else target
    return out


def _ends_flow(ins: Instr) -> bool:
    """True for an instruction after which control never falls through."""
    base = ins.op.split(".")[0]
    return not ins.predicated and base in ("BRA", "EXIT", "RET", "JMP", "BRX", "JMX", "KILL")


@dataclass
class InnerLoopCount:
    """One loop nested in the main loop: where it is, its cheapest trip, and its declared trips."""

    what: str
    head: int  # index of its first instruction (the back edges' target)
    end: int  # index of its last back-edge branch
    cycle: int  # instructions of the shortest path once round the loop (head .. back edge)
    trips: int  # body executions per main-loop iteration on the data path (0: off it)
    cycle_ops: list = field(default_factory=list)


@dataclass
class LoopAnalysis:
    loop_found: bool
    loop_body: int
    hot_path: int  # instructions per main-loop iteration: path + extra trips of the inner loops
    inner_loops_on_hot_path: int  # loops declared off the data path whose body the path still runs
    hot_path_ops: list[str]  # every instruction counted in hot_path (with repeats for the trips)
    inner_loops_in_body: int = 0
    path: int = 0  # instructions on the path itself (each inner loop's body at most once)
    inner_loops: list = field(default_factory=list)  # InnerLoopCount, in address order


class LoopDeclarationError(ValueError):
    """A kernel's declared inner loops do not match its SASS."""


def _successors(instrs: list[Instr], index: dict, i: int) -> list[int]:
    ins = instrs[i]
    succ = []
    if not _ends_flow(ins):
        succ.append(i + 1)
    if ins.target is not None and ins.target in index:
        succ.append(index[ins.target])
    return succ


def _shortest_path(instrs, index, src: int, dst: int, lo: int, hi: int, stop: int | None = None) -> list[int] | None:
    """Fewest instructions from ``src`` to ``dst`` (both counted) staying within ``[lo, hi]``.

    ``stop`` is a node the path may end at but not pass through (the main loop's
    back edge). Breadth-first: every instruction costs one.
    """
    prev = {src: src}
    queue = [src]
    for i in queue:
        if i == dst:
            break
        if i == stop and i != src:
            continue
        for j in _successors(instrs, index, i):
            if lo <= j <= hi and j not in prev:
                prev[j] = i
                queue.append(j)
    if dst not in prev:
        return None
    path = [dst]
    while path[-1] != src:
        path.append(prev[path[-1]])
    return path[::-1]


def _cycle(instrs, index, head: int, latches: list[int]) -> list[int]:
    """Shortest path once round a loop: from ``head`` to one of its back-edge branches (taken)."""
    best = None
    for latch in latches:
        p = _shortest_path(instrs, index, head, latch, head, max(latches))
        if p is not None and (best is None or len(p) < len(best)):
            best = p
    return best or [head]


def analyse_main_loop(instrs: list[Instr], declared=None, through=(), grid_stride: bool = True) -> LoopAnalysis:
    """Static count of the main loop body and of one iteration on the data path; see module docstring.

    ``declared``: the kernel's ``ReportEntry.inner_loops`` (objects with ``what``,
    ``trips``, ``ops``), one per loop nested in the main loop, in address order.
    With ``None`` nothing is checked and every inner loop is taken as off the
    data path (0 trips), i.e. the plain shortest path. ``through``: opcode
    prefixes (``ReportEntry.data_path_ops``) whose every instruction in the main
    loop the path must pass (e.g. the 128-bit stores of the data).
    """
    index = {ins.addr: i for i, ins in enumerate(instrs)}
    back_edges = [
        (i, index[ins.target]) for i, ins in enumerate(instrs)
        if ins.target is not None and ins.target <= ins.addr and ins.target in index and ins.target != ins.addr
    ]
    if not grid_stride:
        # One pass per thread (no grid-stride loop): from the first instruction to the kernel's
        # last EXIT, every loop an inner loop. Modelled as a main loop spanning the kernel.
        exits = [i for i, ins in enumerate(instrs) if ins.op.split(".")[0] == "EXIT" and not ins.predicated]
        if not exits:
            raise LoopDeclarationError("grid_stride=False, but the kernel has no unpredicated EXIT")
        end, head = exits[-1], 0
        back_edges = [(i, h) for i, h in back_edges if i <= end]
        return _analyse(instrs, index, back_edges, head, end, declared, through, main_edge=None)
    if not back_edges:
        body = [ins for ins in instrs if not (ins.op.startswith("BRA") and ins.target == ins.addr)]
        if declared:
            raise LoopDeclarationError(f"{len(declared)} inner loop(s) declared, but the kernel has no loop")
        n = len(body)
        return LoopAnalysis(False, n, n, 0, [ins.op for ins in body], path=n)
    end, head = max(back_edges, key=lambda e: e[0] - e[1])
    return _analyse(instrs, index, back_edges, head, end, declared, through, main_edge=(end, head))


def _analyse(instrs, index, back_edges, head, end, declared, through, main_edge) -> LoopAnalysis:
    """:func:`analyse_main_loop` once the main loop's head and back edge (or the one pass's
    first instruction and last EXIT, ``main_edge=None``) are known."""
    # Loops nested in the main loop, one per head (a head may have several back edges).
    latches: dict[int, list[int]] = {}
    for i, h in back_edges:
        if (i, h) != main_edge and head <= h and i <= end:
            latches.setdefault(h, []).append(i)
    heads = sorted(latches)
    if declared is not None and len(declared) != len(heads):
        raise LoopDeclarationError(
            f"the main loop holds {len(heads)} inner loop(s) (SASS heads at "
            f"{', '.join(hex(instrs[h].addr) for h in heads) or 'none'}), the ReportEntry declares "
            f"{len(declared)}: declare every inner loop, in address order")
    loops = []
    for n, h in enumerate(heads):
        decl = declared[n] if declared is not None else None
        cyc = _cycle(instrs, index, h, latches[h])
        ops = [instrs[i].op for i in cyc]
        span_ops = [ins.op for ins in instrs[h:max(latches[h]) + 1]]
        if decl is not None:
            missing = [p for p in decl.ops if not any(op.startswith(p) for op in span_ops)]
            if missing:
                raise LoopDeclarationError(
                    f"inner loop {n} ({decl.what!r}, head {hex(instrs[h].addr)}) has no {', '.join(missing)}")
        loops.append(InnerLoopCount(decl.what if decl else f"loop {n}", h, max(latches[h]), len(cyc),
                                    int(decl.trips) if decl else 0, ops))
    for outer in loops:
        for inner in loops:
            if inner is not outer and outer.head <= inner.head and inner.end <= outer.end \
                    and outer.trips > 1 and inner.trips > 0:
                raise LoopDeclarationError(
                    f"{outer.what!r} (trips {outer.trips}) contains {inner.what!r}: nested loops on the data "
                    "path are counted only with the outer one at most 1 trip")

    # The path: main-loop head, then the head of every loop on the data path (address
    # order), then the main loop's back edge; each leg the fewest instructions.
    musts = {lp.head for lp in loops if lp.trips > 0}
    musts |= {i for i in range(head, end) if any(instrs[i].op.startswith(p) for p in through)}
    if through and not any(any(instrs[i].op.startswith(p) for p in through) for i in range(head, end)):
        raise LoopDeclarationError(f"no {', '.join(through)} in the main loop")
    waypoints = [head] + sorted(musts - {head}) + [end]
    path = [head]
    for a, b in zip(waypoints, waypoints[1:]):
        leg = _shortest_path(instrs, index, a, b, head, end, stop=end)
        if leg is None:
            raise LoopDeclarationError(f"no path from {hex(instrs[a].addr)} to {hex(instrs[b].addr)} in the main loop")
        path.extend(leg[1:])
    on_path = set(path)
    ops = [instrs[i].op for i in path]
    total = len(path)
    for lp in loops:
        if lp.trips > 1:
            total += (lp.trips - 1) * lp.cycle
            ops.extend(lp.cycle_ops * (lp.trips - 1))
    skipped_wrongly = sum(1 for lp in loops if lp.trips == 0 and lp.head in on_path and lp.end in on_path)
    return LoopAnalysis(True, end - head + 1, total, skipped_wrongly, ops, len(heads), len(path), loops)


# --------------------------------------------------------------------------- compilation

@dataclass
class KernelResult:
    module: str
    name: str
    bytes_per_iteration: int
    variant: str = ""
    launch_bounds: list = field(default_factory=list)  # (max threads per block, min blocks per SM), as compiled
    registers: int | None = None
    stack_frame_bytes: int | None = None
    spill_store_bytes: int | None = None
    spill_load_bytes: int | None = None
    shared_bytes: int | None = None
    ldl_stl_instructions: int | None = None
    total_instructions: int | None = None
    loop_body_instructions: int | None = None
    hot_path_instructions: int | None = None
    path_instructions: int | None = None
    inner_loops: list = field(default_factory=list)
    instructions_per_byte: float | None = None
    inner_loops_on_hot_path: int | None = None
    inner_loops_in_body: int | None = None
    hot_path_global_loads: dict = field(default_factory=dict)
    hot_path_global_stores: dict = field(default_factory=dict)
    wide_global_loads: bool | None = None
    wide_global_stores: bool | None = None
    target_instructions_per_byte: float | None = None
    target_registers: int | None = None
    compile_seconds: float | None = None  # CPU seconds, numba: typing, lowering, NVVM -> PTX
    ptxas_seconds: float | None = None  # CPU seconds of ptxas
    compile_wall_seconds: float | None = None  # both, by the clock (longer on a busy machine)
    verdict: str = "FAIL"
    reasons: list = field(default_factory=list)
    note: str = ""
    error: str | None = None


def _parse_ptxas(stderr: str) -> dict:
    info = {}
    m = re.search(r"Used (\d+) registers", stderr)
    info["registers"] = int(m.group(1)) if m else None
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", stderr)
    if m:
        info["stack_frame_bytes"], info["spill_store_bytes"], info["spill_load_bytes"] = map(int, m.groups())
    m = re.search(r"(\d+) bytes smem", stderr)
    info["shared_bytes"] = int(m.group(1)) if m else 0
    return info


def _width_counts(ops: list[str], prefix: str) -> dict:
    counts: dict[str, int] = {}
    for op in ops:
        if op.startswith(prefix + "."):
            counts[op] = counts.get(op, 0) + 1
    return counts


def _is_wide(counts: dict) -> bool | None:
    """Data moved 16 bytes at a time: some 128-bit accesses and no sub-word ones.

    (A 64-bit load of a prefix-sum entry beside them is bookkeeping, not data.)
    None when there are no global accesses at all.
    """
    if not counts:
        return None
    narrow = any(op.split(".")[-1] in ("U8", "S8", "U16", "S16") for op in counts)
    return any(".128" in op for op in counts) and not narrow


@contextlib.contextmanager
def _device_functions_compiled_for(cc):
    """Let numba-cuda compile device functions for ``cc`` without a GPU.

    A device function that is not inlined at the numba IR level (the kernels'
    ``forceinline`` ones, see ``kernels/_compile.py``) is compiled on its own, for
    the compute capability of the *current device*, which numba asks the driver
    for. The report has no device: it answers ``cc`` for the duration of a compile.
    """
    from numba.cuda import dispatcher

    original = dispatcher.get_current_device
    dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=cc)
    try:
        yield
    finally:
        dispatcher.get_current_device = original


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _compile(entry, tools: dict, stem: str, cache: dict) -> tuple[str, dict]:
    """(SASS listing, ptxas -v figures) of ``entry``; entries sharing a kernel and signature compile once."""
    from numba import cuda

    key = (entry.pyfunc, entry.signature, tuple(getattr(entry, "launch_bounds", ()) or ()))
    if key in cache:
        return cache[key]
    wall, cpu = time.perf_counter(), time.process_time()
    bounds = tuple(getattr(entry, "launch_bounds", ()) or ())
    with _device_functions_compiled_for((9, 0)):
        ptx, _ = cuda.compile_ptx(entry.pyfunc, entry.signature, cc=(9, 0), **({"launch_bounds": bounds} if bounds else {}))
    numba_wall, numba_cpu = time.perf_counter() - wall, time.process_time() - cpu
    with open(stem + ".ptx", "w") as f:
        f.write(ptx)
    wall, cpu = time.perf_counter(), _children_cpu_seconds()
    run = subprocess.run(
        [tools["ptxas"], "-arch=sm_90", "-O3", "-v", stem + ".ptx", "-o", stem + ".cubin"],
        capture_output=True, text=True,
    )
    ptxas_wall, ptxas_cpu = time.perf_counter() - wall, _children_cpu_seconds() - cpu
    if run.returncode != 0:
        raise RuntimeError("ptxas failed:\n" + run.stderr)
    if tools.get("nvdisasm"):
        cmd = [tools["nvdisasm"], "-c", stem + ".cubin"]
    else:
        cmd = [tools["cuobjdump"], "-sass", stem + ".cubin"]
    dis = subprocess.run(cmd, capture_output=True, text=True)
    if dis.returncode != 0:
        raise RuntimeError(f"{os.path.basename(cmd[0])} failed:\n" + dis.stderr)
    info = _parse_ptxas(run.stderr)
    info["compile_seconds"] = round(numba_cpu, 2)
    info["ptxas_seconds"] = round(ptxas_cpu, 2)
    info["compile_wall_seconds"] = round(numba_wall + ptxas_wall, 2)
    cache[key] = (dis.stdout, info)
    return cache[key]


def measure(module: str, entry, tools: dict, workdir: str, sass_dir: str | None,
            cache: dict | None = None) -> KernelResult:
    variant = getattr(entry, "variant", "")
    res = KernelResult(module, entry.name, entry.bytes_per_iteration, variant, note=entry.note,
                       launch_bounds=list(getattr(entry, "launch_bounds", ()) or ()))
    res.target_instructions_per_byte = INSTR_PER_BYTE_TARGETS.get(entry.name)
    res.target_registers = REGISTER_TARGETS.get(entry.name)
    try:
        stem = os.path.join(workdir, f"{module}.{entry.name}")
        sass, ptxas_info = _compile(entry, tools, stem, {} if cache is None else cache)
        for k, v in ptxas_info.items():
            setattr(res, k, v)
        if sass_dir:
            os.makedirs(sass_dir, exist_ok=True)
            with open(os.path.join(sass_dir, f"{module}.{entry.name}.sass"), "w") as f:
                f.write(sass)
        instrs = parse_sass(sass)
        if not instrs:
            raise RuntimeError("no SASS instructions found in the disassembly")
        res.total_instructions = len(instrs)
        res.ldl_stl_instructions = sum(1 for i in instrs if i.op.split(".")[0] in ("LDL", "STL"))
        loop = analyse_main_loop(instrs, tuple(getattr(entry, "inner_loops", ())),
                                 tuple(getattr(entry, "data_path_ops", ())), getattr(entry, "grid_stride", True))
        res.loop_body_instructions = loop.loop_body
        res.hot_path_instructions = loop.hot_path
        res.path_instructions = loop.path
        res.inner_loops = [{"what": lp.what, "address": instrs[lp.head].addr, "cycle": lp.cycle,
                            "trips": lp.trips} for lp in loop.inner_loops]
        res.inner_loops_on_hot_path = loop.inner_loops_on_hot_path
        res.inner_loops_in_body = loop.inner_loops_in_body
        res.instructions_per_byte = round(loop.hot_path / entry.bytes_per_iteration, 3)
        res.hot_path_global_loads = _width_counts(loop.hot_path_ops, "LDG")
        res.hot_path_global_stores = _width_counts(loop.hot_path_ops, "STG")
        res.wide_global_loads = _is_wide(res.hot_path_global_loads)
        res.wide_global_stores = _is_wide(res.hot_path_global_stores)
    except Exception as exc:  # reported per kernel, the others still run
        res.error = f"{type(exc).__name__}: {exc}"
        res.reasons.append("did not compile/measure")
        return res

    if (res.spill_store_bytes or 0) or (res.spill_load_bytes or 0):
        res.reasons.append(f"spills ({res.spill_store_bytes} B stored, {res.spill_load_bytes} B loaded)")
    if res.ldl_stl_instructions:
        res.reasons.append(f"{res.ldl_stl_instructions} LDL/STL instructions")
    if res.inner_loops_on_hot_path:
        res.reasons.append(f"{res.inner_loops_on_hot_path} inner loop(s) declared off the data path lie on it: "
                           "instructions/byte would be a lower bound")
    target = res.target_instructions_per_byte
    if target is not None and res.instructions_per_byte > target:
        res.reasons.append(f"{res.instructions_per_byte} instructions/byte > {target}")
    if res.target_registers is not None and (res.registers or 0) > res.target_registers:
        res.reasons.append(f"{res.registers} registers > {res.target_registers}")
    seconds = (res.compile_seconds or 0) + (res.ptxas_seconds or 0)
    if seconds > COMPILE_SECONDS_TARGET:
        res.reasons.append(f"first compile took {seconds:.1f} s > {COMPILE_SECONDS_TARGET} s")
    res.verdict = "PASS" if not res.reasons else "FAIL"
    return res


# --------------------------------------------------------------------------- discovery

def collect_entries() -> tuple[list[tuple[str, object]], list[tuple[str, str]]]:
    """(module, ReportEntry) pairs from every gpucrypt.kernels.* module, and (module, reason) skips."""
    import gpucrypt.kernels as pkg

    entries, skipped = [], []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        try:
            mod = importlib.import_module(f"gpucrypt.kernels.{info.name}")
        except Exception as exc:
            skipped.append((info.name, f"import failed: {type(exc).__name__}: {exc}"))
            continue
        report = getattr(mod, "KERNEL_REPORT", None)
        if not report:
            skipped.append((info.name, "no KERNEL_REPORT"))
            continue
        entries.extend((info.name, entry) for entry in report)
    return entries, skipped


def _fmt_mem(counts: dict) -> str:
    return ", ".join(f"{n}x {op}" for op, n in sorted(counts.items())) or "none"


def print_table(results: list[KernelResult], skipped: list[tuple[str, str]]) -> None:
    print("gpucrypt kernel report (sm_90, static SASS; method in benchmarks/kernel_report.py)")
    print()
    for r in results:
        label = f"{r.module}.{r.name}" + (f" [{r.variant}]" if r.variant else "")
        print(f"[{r.verdict}] {label}" + (f"  ({r.note})" if r.note else ""))
        if r.error:
            print(f"    error: {r.error}")
            continue
        target = f" (target <= {r.target_instructions_per_byte})" if r.target_instructions_per_byte else ""
        regs = f" (target <= {r.target_registers})" if r.target_registers else ""
        print(f"    compile time (CPU)    {r.compile_seconds} s numba (typing, lowering, NVVM) + "
              f"{r.ptxas_seconds} s ptxas (target <= {COMPILE_SECONDS_TARGET} s together; "
              f"{r.compile_wall_seconds} s by the clock)")
        bounds = f"; launch bounds {tuple(r.launch_bounds)}" if r.launch_bounds else ""
        print(f"    registers/thread      {r.registers}{regs}{bounds}")
        print(f"    stack / spills        {r.stack_frame_bytes} B stack, {r.spill_store_bytes} B spill stores, "
              f"{r.spill_load_bytes} B spill loads; {r.ldl_stl_instructions} LDL/STL; {r.shared_bytes} B shared")
        extra = "".join(f" + {lp['trips'] - 1} x {lp['cycle']}" for lp in r.inner_loops if lp["trips"] > 1)
        print(f"    instructions/byte     {r.instructions_per_byte}{target}: {r.hot_path_instructions} per iteration "
              f"/ {r.bytes_per_iteration} B = path {r.path_instructions}{extra} "
              f"(loop body {r.loop_body_instructions}, kernel {r.total_instructions})")
        for lp in r.inner_loops:
            trips = f"{lp['trips']} trip(s) per iteration" if lp["trips"] else "off the data path"
            print(f"    inner loop @{lp['address']:#06x}  {lp['cycle']} per trip, {trips}: {lp['what']}")
        print(f"    loads per iteration   {_fmt_mem(r.hot_path_global_loads)}  (128-bit: {r.wide_global_loads})")
        print(f"    stores per iteration  {_fmt_mem(r.hot_path_global_stores)}  (128-bit: {r.wide_global_stores})")
        for reason in r.reasons:
            print(f"    FAIL because          {reason}")
    for name, reason in skipped:
        print(f"[SKIP] {name}: {reason}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--sass-dir", metavar="DIR", help="keep each kernel's SASS listing here")
    parser.add_argument("--only", metavar="NAME", action="append",
                        help="measure only kernels whose module or kernel name is NAME (repeatable)")
    args = parser.parse_args(argv)

    if "numba" in sys.modules and os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        print("numba was imported with the simulator on; run this script in its own process", file=sys.stderr)
        return 2
    os.environ.pop("NUMBA_ENABLE_CUDASIM", None)
    if not os.environ.get("CUDA_HOME"):
        toolkit = next((p for p in ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
                        if os.path.isdir(p)), None)
        if toolkit:
            os.environ["CUDA_HOME"] = toolkit  # lets numba find NVVM without a driver

    tools = {name: find_tool(name) for name in ("ptxas", "nvdisasm", "cuobjdump")}
    missing = []
    if not tools["ptxas"]:
        missing.append("ptxas")
    if not tools["nvdisasm"] and not tools["cuobjdump"]:
        missing.append("nvdisasm")
    if not tools["nvdisasm"] and tools["cuobjdump"]:
        # cuobjdump -sass runs nvdisasm itself; without it, it prints nothing.
        missing.append("nvdisasm")
    if missing:
        for name in missing:
            print(f"missing tool: {name}; install with `pip install {TOOL_PACKAGES[name]}`", file=sys.stderr)
        return 2

    entries, skipped = collect_entries()
    if args.only:
        entries = [(m, e) for m, e in entries if m in args.only or e.name in args.only]
    cache: dict = {}
    with tempfile.TemporaryDirectory(prefix="gpucrypt-kernel-report-") as workdir:
        results = [measure(module, entry, tools, workdir, args.sass_dir, cache) for module, entry in entries]
    print_table(results, skipped)
    if args.json:
        with open(args.json, "w") as f:
            from gpucrypt.bench import _git_commit

            commit = _git_commit()  # with -dirty, as gpucrypt bench
            json.dump({"benchmark": "kernel_report", "commit": commit, "load_average": os.getloadavg(),
                       "tools": tools, "results": [asdict(r) for r in results],
                       "skipped": [{"module": m, "reason": r} for m, r in skipped]}, f, indent=2)
    return 0 if results and all(r.verdict == "PASS" for r in results) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.exit(2)
