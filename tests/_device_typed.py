"""Run gpucrypt's kernels on the CPU with the device's integer typing and the device's geometry.

numba's CUDA simulator runs a kernel as Python on NumPy scalars: ``uint32 << uint32``
wraps at 32 bits there, while numba-cuda on a device types it as ``uint64`` (numba's
integer typing, which ``numba.njit`` shares). The simulator also runs one block of
one warp (``kernels/_launch.py``) and replaces the 16-byte load/store intrinsics
with Python twins. This module closes those gaps without a GPU:

* every kernel's source is rewritten (AST) into a plain function of the thread and
  block indices and compiled with ``numba.njit`` (typed as on the device, with
  ``boundscheck=True`` so that every array access is checked); its device functions
  are compiled with ``njit`` too, from their own source, with the module's globals;
* ``cuda.threadIdx.x`` and friends become ``int32`` arguments and ``cuda.grid(1)`` /
  ``cuda.gridsize(1)`` ``int64`` ones (numba-cuda's types), ``cuda.shared.array(...)``
  an array the launcher passes in, ``cuda.syncthreads()`` a no-op;
* :func:`launch` runs every thread of every block with device geometry (256 threads
  per block, several blocks), the threads of a block one after another, highest
  ``threadIdx.x`` first. That order is what a barrier guarantees for the kernels'
  shared-memory patterns: a per-thread slot (ChaCha20's byte path), a table every
  thread fills with the same values (AES; the launcher passes it filled), and
  Poly1305's tree sum, where a lane reads only higher lanes' slots (exact when each
  tile runs one grid-stride round, which :func:`poly1305_aead_tags` arranges),
  GHASH's key schedules, one slot per thread, and GHASH's one-key tables, which every
  block copies from global memory before a barrier (the launcher passes the copy);
* the 16-byte loads and stores are the project's own LLVM code generation
  (``kernels/_vector_io._make_intrinsics``) on the CPU target, behind checks that
  raise when an access is misaligned or leaves its array (GHASH's 128-bit shared loads
  of its key schedule, inline PTX on the device, too); ``ghash.mul_wide_u32``
  and AES's shared-table loads (inline PTX on the device) are replaced by their
  simulator twins, compiled with the same typing.

The launchers here mirror those of the kernel modules (same kernels, same order,
same scratch layout) with device geometry instead of the simulator's.
"""
from __future__ import annotations

import ast
import inspect
import textwrap
import types as pytypes

import numba
import numpy as np
from numba import njit

from gpucrypt.kernels import _launch as kl
from gpucrypt.kernels import _vector_io as kv
from gpucrypt.kernels import aes as ka
from gpucrypt.kernels import chacha20 as kc
from gpucrypt.kernels import ghash as kg
from gpucrypt.kernels import poly1305 as kp

#: Threads per block on the device (``kernels/_launch.py`` on a GPU).
DEVICE_THREADS = 256

# --------------------------------------------------------------------------- checked 16-byte access

_address_of_raw, _load_raw, _store_raw = kv._make_intrinsics(numba.extending.intrinsic)
_byte_swap = kv._make_byte_swap(numba.extending.intrinsic)


@njit
def address_of(a, i):
    return _address_of_raw(a, i)


@njit
def _check16(a, i):
    """Raise unless the 16 bytes at ``a[i]`` are 16-byte aligned and inside ``a``."""
    base = _address_of_raw(a, 0)
    addr = _address_of_raw(a, i)
    if addr & numba.uint64(15):
        raise AssertionError("16-byte access at a misaligned address")
    if addr < base or addr + numba.uint64(16) > base + numba.uint64(a.size * a.itemsize):
        raise AssertionError("16-byte access out of bounds")


@njit
def load_u32x4(a, i):
    _check16(a, i)
    return _load_raw(a, i)


@njit
def store_u32x4(a, i, w0, w1, w2, w3):
    _check16(a, i)
    _store_raw(a, i, w0, w1, w2, w3)


@njit
def mul_wide_u32(a, b):
    """GHASH's ``mul.wide.u32`` (inline PTX on the device) with the device's typing."""
    return numba.uint64(numba.uint32(a)) * numba.uint64(numba.uint32(b))


@njit
def _sync():
    return 0


# --------------------------------------------------------------------------- compiling the modules


def _is_device_function(obj) -> bool:
    return callable(getattr(obj, "py_func", None))


def _njit_copy(pyfunc, scope: dict):
    """``pyfunc`` compiled with njit against the globals ``scope`` (device typing, bounds checked)."""
    fn = pytypes.FunctionType(pyfunc.__code__, scope, pyfunc.__name__, pyfunc.__defaults__, pyfunc.__closure__)
    return njit(boundscheck=True)(fn)


def _aes_table_twins() -> dict:
    """AES's shared-table access (inline PTX on the device) as its simulator twins."""
    twins = ka._make_shared_table_simulator()
    return dict(zip(("table_base", "lds_u32", "lds_u8"), (getattr(t, "py_func", t) for t in twins)))


_COMMON = {"address_of": address_of, "load_u32x4": load_u32x4, "store_u32x4": store_u32x4, "_sync": _sync,
           "byte_swap": _byte_swap,
           "THREADS_PER_BLOCK": DEVICE_THREADS}


def module_scope(mod, overrides: dict | None = None) -> tuple[dict, dict]:
    """(globals of ``mod`` where every device function is an njit copy compiled in that scope,
    {name: njit copy} of the project's own device functions among them)."""
    scope = dict(vars(mod))
    scope.update(_COMMON)
    replaced = dict(overrides or {})
    copies = {}
    for name, obj in list(scope.items()):
        if name in _COMMON or name in replaced or not _is_device_function(obj):
            continue
        home = inspect.getmodule(obj.py_func)
        if home is mod:
            copies[name] = _njit_copy(obj.py_func, scope)
        else:  # imported from another kernel module (find_segment, bswap32): that module's globals
            copies[name] = _njit_copy(obj.py_func, module_scope(home)[0])
    scope.update(copies)
    for name, value in replaced.items():
        scope[name] = _njit_copy(value, scope) if inspect.isfunction(value) else value
    return scope, copies


#: Device functions whose results are 64-bit by design (offsets, indices, counts, and the
#: carry-less products inside GHASH's multiply). Every other device function must return
#: ``uint32`` where its value is 32 bits, so that a caller's ``<<`` cannot keep bits above 32.
WIDE_BY_DESIGN = frozenset({"find_segment", "unit_of_message", "chunk_bounds", "chunk_field", "clmul32",
                            "clmul32_keyed", "clmul32_row", "clmul64", "karatsuba_join", "spread_bits",
                            "reload_u64"})


def _flat_types(t):
    return [e for inner in t.types for e in _flat_types(inner)] if isinstance(t, numba.types.BaseTuple) else [t]


def widened_results(kernels: "Kernels") -> list[str]:
    """``name(args) -> type`` of every compiled device function that returns a 64-bit integer
    (alone or in a tuple) and is not in :data:`WIDE_BY_DESIGN`."""
    found = []
    for name, fn in sorted(kernels.device_functions.items()):
        if name in WIDE_BY_DESIGN:
            continue
        for args, cres in fn.overloads.items():
            ret = cres.signature.return_type
            if any(isinstance(e, numba.types.Integer) and e.bitwidth == 64 for e in _flat_types(ret)):
                found.append(f"{name}{tuple(str(a) for a in args)} -> {ret}")
    return found


def compiled_device_functions(kernels: "Kernels") -> set[str]:
    """Names of the device functions the kernels run so far have compiled (called at least once)."""
    return {name for name, fn in kernels.device_functions.items() if fn.overloads}


class _CudaRewriter(ast.NodeTransformer):
    """``cuda.threadIdx.x`` -> ``_tid`` and so on; see the module docstring."""

    NAMES = {("threadIdx", "x"): "_tid", ("blockIdx", "x"): "_bid",
             ("blockDim", "x"): "_bdim", ("gridDim", "x"): "_gdim"}

    def visit_Attribute(self, node):
        self.generic_visit(node)
        if (isinstance(node.value, ast.Attribute) and isinstance(node.value.value, ast.Name)
                and node.value.value.id == "cuda" and (node.value.attr, node.attr) in self.NAMES):
            return ast.copy_location(ast.Name(self.NAMES[(node.value.attr, node.attr)], ast.Load()), node)
        return node

    def visit_Call(self, node):
        self.generic_visit(node)
        f = node.func
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "cuda":
            if f.attr == "grid":
                return ast.copy_location(ast.Name("_grid1", ast.Load()), node)
            if f.attr == "gridsize":
                return ast.copy_location(ast.Name("_gsize1", ast.Load()), node)
            if f.attr == "syncthreads":
                return ast.copy_location(ast.Call(ast.Name("_sync", ast.Load()), [], []), node)
        if isinstance(f, ast.Attribute) and f.attr == "array" and isinstance(f.value, ast.Attribute) \
                and f.value.attr == "shared":
            return ast.copy_location(ast.Name("_shared", ast.Load()), node)
        return node


def compile_kernel(pyfunc, scope: dict):
    """The kernel ``pyfunc`` as an njit function of ``(tid, bid, bdim, gdim, grid1, gsize1, shared, *args)``."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(pyfunc)))
    fn = tree.body[0]
    fn.decorator_list = []
    tree = _CudaRewriter().visit(tree)
    fn.args.args = [ast.arg(a) for a in ("_tid", "_bid", "_bdim", "_gdim", "_grid1", "_gsize1", "_shared")] \
        + fn.args.args
    ast.fix_missing_locations(tree)
    namespace: dict = {}
    exec(compile(tree, f"<device-typed {pyfunc.__name__}>", "exec"), scope, namespace)
    return njit(boundscheck=True)(namespace[pyfunc.__name__])


def launch(kernel, grid: int, block: int, shared_factory, *args):
    """Run ``kernel`` on ``grid`` blocks of ``block`` threads (threads of a block highest first)."""
    for b in range(grid):
        shared = shared_factory()
        for t in range(block - 1, -1, -1):
            kernel(np.int32(t), np.int32(b), np.int32(block), np.int32(grid),
                   np.int64(b * block + t), np.int64(grid * block), shared, *args)


def _no_shared():
    return np.zeros(1, np.uint32)


class Kernels:
    """The device-typed kernels of one module, compiled on first use (njit compiles lazily too)."""

    def __init__(self, mod, names, overrides=None):
        self.scope, self.device_functions = module_scope(mod, overrides)
        self._names = names
        self._compiled: dict = {}

    def __getattr__(self, name):
        if name.startswith("_") and name not in self._names:
            raise AttributeError(name)
        if name not in self._compiled:
            self._compiled[name] = compile_kernel(self._names[name], self.scope)
        return self._compiled[name]


chacha20 = Kernels(kc, {"xor": kc._chacha20_xor_kernel})
aes = Kernels(ka, {"xor": ka._aes_ctr_xor_kernel}, _aes_table_twins())
@njit
def reload_u64(a, i):
    """GHASH's volatile reload (inline PTX on the device): element ``i`` of the C-contiguous ``a``."""
    return numba.uint64(a.reshape(a.size)[i])


@njit
def opaque_u32(x):
    """GHASH's optimisation barrier (an inline-asm ``mov`` on the device): ``x`` as uint32."""
    return numba.uint32(x)


ghash = Kernels(kg, {"blocks": kg._ghash_blocks, "blocks_mixed_keys": kg._ghash_blocks_mixed_keys,
                     "key_tables": kg._ghash_key_tables, "combine": kg._ghash_combine},
                {"mul_wide_u32": mul_wide_u32, "lds_u32x4": load_u32x4, "sts_u32x4": store_u32x4,
                 "reload_u64": reload_u64, "opaque_u32": opaque_u32})
poly1305 = Kernels(kp, {"powers": kp._poly1305_powers, "partial": kp._poly1305_aead_partial,
                        "combine": kp._poly1305_combine})


# --------------------------------------------------------------------------- launchers (as in the modules)


def chacha20_xor(src, dst, keys, table, unit_start, n_segments, *, grid=3, block=DEVICE_THREADS):
    if int(unit_start[-1]) == 0:
        return
    launch(chacha20.xor, grid, block, lambda: np.zeros(16 * DEVICE_THREADS, np.uint32),
           src, dst, keys.reshape(-1), table.reshape(-1), unit_start, np.int64(n_segments))


def aes_ctr_xor(src, dst, round_keys, n_rounds, table, unit_start, n_segments, *, grid=3, block=DEVICE_THREADS):
    if int(unit_start[-1]) == 0:
        return
    shared = np.repeat(ka.T0, ka.WARP_LANES).astype(np.uint32)  # what every thread writes: tab[i] = T0[i >> 5]
    launch(aes.xor, grid, block, shared.copy, src, dst, round_keys, np.int64(n_rounds), table, unit_start,
           np.int64(n_segments))


def ghash_aead_tags(aad_buf, ct_buf, table, n_messages, h_blocks, ekj0_blocks, tags_out, *, grid=2,
                    block=DEVICE_THREADS, one_key=False):
    if n_messages == 0:
        return
    sizes = list(table.units_total[:2]) + [1, 1]
    partials = tuple(np.zeros((max(1, sizes[i]), 4), np.uint32) for i in range(2))
    keys = tuple(np.zeros((max(1, n_messages), 4), np.uint32) for _ in range(2))
    chunk = int(table.chunk_blocks)
    log2_chunk = chunk.bit_length() - 1
    last = table.levels - 1

    def schedules():  # every thread's key schedule (kernels/ghash.py: key_schedule)
        return np.zeros(kg.SCHEDULE_ROWS * DEVICE_THREADS * 4, np.uint32)

    for level in range(table.levels):
        if level == 0 and one_key:
            # The set-up kernel writes the tables to global memory; each block of the table kernel
            # copies them into its shared memory before a barrier: the launcher passes that copy.
            tables = np.zeros(kg.KEY_TABLE_WORDS, np.uint32)
            launch(ghash.key_tables, grid, block, _no_shared, h_blocks, np.int64(log2_chunk), tables)
            # One unit per thread (no grid-stride loop): a grid that covers every unit, and at least 2 blocks.
            blocks = max(2, -(-table.units_total[0] // block))
            launch(ghash.blocks, blocks, block, tables.copy, aad_buf, ct_buf, table.messages, table.unit_start[0],
                   np.int64(n_messages), tables, np.int64(chunk), partials[0], keys[0], ekj0_blocks, tags_out,
                   level == last)
        elif level == 0:
            launch(ghash.blocks_mixed_keys, grid, block, schedules, aad_buf, ct_buf, table.messages, table.unit_start[0],
                   np.int64(n_messages), h_blocks, np.int64(chunk), np.int64(log2_chunk), partials[0], keys[0],
                   ekj0_blocks, tags_out, level == last)
        else:
            launch(ghash.combine, grid, block, schedules, partials[(level - 1) % 2], table.unit_start[level - 1],
                   partials[level % 2], table.unit_start[level], np.int64(n_messages), keys[(level - 1) % 2],
                   keys[level % 2], np.int64(chunk), np.int64(log2_chunk), ekj0_blocks, tags_out, level == last)


def _word_view(buf):
    head = (-buf.ctypes.data) % 8 if len(buf) else 0
    usable = max(0, len(buf) - head) // 8 * 8
    if usable == 0:
        return np.zeros(2, np.uint64), 0
    return buf[head:head + usable].view(np.uint64), head


def poly1305_aead_tags(aad_buf, ct_buf, table, n_messages, one_time_keys, tags_out, *, block=DEVICE_THREADS):
    """Tiles of 32 lanes, ``block // 32`` tiles per block, one grid-stride round per tile."""
    if n_messages == 0:
        return
    keys = one_time_keys if one_time_keys.dtype.itemsize == 4 else one_time_keys.view(np.uint32)
    tags = tags_out if tags_out.dtype.itemsize == 4 else tags_out.view(np.uint32)
    scratch = np.zeros(table.scratch_words, np.uint32)
    aad_words, aad_head = _word_view(aad_buf)
    ct_words, ct_head = _word_view(ct_buf)
    width = table.power_width
    launch(poly1305.powers, 2, block, _no_shared, keys, np.int64(n_messages), np.int64(width),
           np.int64(kp.TILE_LANES * table.chunk_blocks), np.int64(table.combine_width), scratch)
    partial_base = kp.LIMBS * n_messages * width
    n_spans = table.group_totals[0]
    grid = -(-n_spans // (block // kp.TILE_LANES))
    launch(poly1305.partial, grid, block, lambda: np.zeros((DEVICE_THREADS, kp.LIMBS), np.uint32),
           aad_buf, aad_words, np.int64(aad_head), ct_buf, ct_words, np.int64(ct_head),
           table.layout, table.group_start[0], np.int64(n_messages), np.int64(n_spans),
           np.int64(table.chunk_blocks), np.int64(width), np.int64(partial_base), scratch, keys, tags)
    in_base = partial_base
    for level in range(1, table.levels + 1):
        out_base = in_base + kp.LIMBS * table.group_totals[level - 1]
        launch(poly1305.combine, 2, block, _no_shared, table.group_start[level - 1], table.group_start[level],
               np.int64(n_messages), np.int64(table.group_totals[level]), np.int64(table.combine_width),
               np.int64(kp.TILE_LANES + level - 1), np.int64(width), np.int64(in_base), np.int64(out_base),
               scratch, keys, tags)
        in_base = out_base
