"""GHASH (NIST SP 800-38D) on the GPU: AES-GCM tags for one huge message or many small ones.

What it computes
----------------
For every message ``m``::

    tag[m] = GHASH_H(A || 0-pad16 || C || 0-pad16 || be64(8*len(A)) || be64(8*len(C))) XOR E_K(J0)

with ``H`` and ``E_K(J0)`` given per message as 16 bytes on the device. The same
launcher computes J0 for nonces that are not 96 bits long
(``J0 = GHASH_H(IV || 0-pad16 || 0^64 || be64(8*len(IV)))``): pass the IV as the
"ciphertext", no associated data and ``E_K(J0) = 0``.

Limits
------
- Offsets and lengths are byte counts below 2**61 (so ``8*len`` fits in 64 bits);
  buffers are 1-D ``uint8`` device arrays of any alignment.
- ``chunk_blocks`` (``L`` below) is a power of two, 2 <= L <= 2**16.
- Fewer than ``MAX_UNITS`` = 2**31 chunks per call (2 TiB at L = 64; the kernels count
  units in 32 bits; :func:`pack_messages` refuses more).
- Blocks of at most ``THREADS_PER_BLOCK`` threads (``kernels._launch``).
- Two level-0 kernels. ``one_key=True`` (every message under one AES key, so one ``H``;
  the kernel reads ``h_blocks[0]`` only, a differing row gets a wrong tag): the table
  kernel :func:`_ghash_blocks`, 24,880 B of static shared memory (tables of ``H^1..H^3``
  and two shared key schedules, built on the device by :func:`_ghash_key_tables`, one
  extra launch of 97 threads per call). Any mix of keys: :func:`_ghash_blocks_mixed_keys`,
  a key schedule per thread (``SCHEDULE_WORDS`` uint32, 36 KiB at 256 threads). The
  backend (``gpucrypt/backends/gpu.py``) passes ``one_key`` when a batch has one key.
- **Only public data may be hashed.** The table kernel indexes shared-memory tables
  with the nibbles of ``aad_buf``/``ct_buf`` (see "Constant time" below). AES-GCM's
  GHASH inputs are public (associated data, ciphertext, the IV); a caller must never
  pass secret bytes (a plaintext, a key) as "ciphertext" or associated data, e.g. to
  build a MAC over secret data: use ``one_key=False`` for that, which indexes nothing.
- Nothing is validated here: the backend checks lengths, shapes and offsets.

Constant time (which values are secret, which are indices)
-----------------------------------------------------------
Secret: ``H`` and everything derived from it (its powers, the tables' entries, the
schedules), the running accumulator ``Y`` and every partial. Public: the GHASH input
bytes, their lengths and offsets, the message table. No branch and no address depends on
a secret: the products are integer multiplies (below); the only data-dependent addresses
are the table lookups of :func:`table_lookup`, whose index is ``row*64 + 4*v`` with ``row``
a constant of the code position and ``v`` a nibble of an input block as loaded from
``aad_buf``/``ct_buf``. Bank conflicts and timing therefore reveal at most the input
bytes, which an attacker already has. The accumulator never indexes anything: in a group
the first block is folded into ``Y`` *before* the product (``(Y ^ X_1)*H^4``), and only
``X_2..X_4`` go through tables (Shoup's method, rejected below, indexes by ``Y ^ X``).
``tests/test_kernel_ghash.py::test_table_indices_are_the_public_input_nibbles`` records
every index and checks it against the input's nibbles under two different keys.

One key: tables indexed by the public input (:func:`_ghash_blocks`)
-------------------------------------------------------------------
Inside a chunk, ``S = 4`` consecutive full blocks (a 16-byte aligned field) take::

    Y' = (Y ^ X_1) * H^4  ^  X_2 * H^3  ^  X_3 * H^2  ^  X_4 * H

``(Y ^ X_1)*H^4`` is the integer-multiply product with the shared schedule of ``(H^4)'``
(one product per 4 blocks instead of 4). ``X * H^e`` (``e = 1..3``) is linear in ``X``: with
``T_e[p][v] = (v at nibble position p) * H^e`` (32 positions x 16 values x 16 B = 8 KiB per
power), ``X * H^e = XOR_p T_e[p][nibble_p(X)]``: 32 ``LDS.128`` and the XORs, the reduction
already inside the entries. Positions are nibbles of the little-endian words as loaded
(:func:`nibble_element`), so no byte swap is needed on that path. Everything else (fields
that are not 16-byte aligned, the blocks after the last full group, partial blocks, the
length block) is one product per block with the shared schedule of ``H'``, as in the
mixed-key kernel. The set-up kernel :func:`_ghash_key_tables` computes ``H' = H*x^-1`` from
``h_blocks[0]`` (on the device: the backend keeps ``H`` there), one unit per table row
(``b = nibble_element(p) * H^e``, then ``b*x, b*x^2, b*x^3`` and the 16 XOR combinations,
masked, no branch on a secret) and one unit for the schedules of ``H'``, ``(H^4)'`` and
``(H^L)'``. The main kernel has no grid-stride loop: one chunk per thread, launched with a
grid that covers every chunk (``launch(..., grid_stride=False)``); each block copies the
24,880 B of tables into shared memory (25 words per thread) and waits at one barrier (a
block past the work exits first). Without the grid-stride loop no counters or bounds stay
live across the Horner loops, and the chunk's offsets and lengths are read again from
global memory around them (:func:`reload_u64`, :func:`chunk_field`): 62 registers, where the
same kernel with a grid-stride loop took 70-78 (and spilled under a 64-register cap).

Measured SASS (sm_90, numba-cuda 0.30, ``ptxas -arch=sm_90`` 13.0; benchmarks/kernel_report.py,
``benchmarks/results/2026-12-04-cpu-amd-epyc-kernel-report.json``):

- ``ghash_blocks`` (one key): **14.56 instructions per byte** (14,911 per 1 KiB chunk: 878
  per group of 4 blocks, ~220 per block against 402 in the mixed-key kernel, plus the
  thread's share of the table copy, 25 x 18), 64 ``LDG.E.128`` per chunk, **62 registers,
  0 spills**, 24,880 B shared. First compile 5.5 s numba + 0.4 s ptxas (CPU).
- ``ghash_blocks_mixed_keys``: 25.3 per byte, 76 registers, 0 spills (the design below,
  unchanged; no target: only batches that mix keys take it).
- ``ghash_combine``: 24.9 per byte of partials (~1/64 of level 0's work), **64 registers,
  0 spills** with ``launch_bounds=(256, 4)`` (70 unbounded): 32-bit unit counters and rows,
  and ``next_key`` by squarings that spread bits (:func:`gf128_square`) instead of full
  products.
- ``ghash_key_tables``: once per call, 97 threads, ~2,200 instructions per table row.

Rough H100 estimate (not measured, no GPU here; public throughput figures: 64 results per
clock per SM for 32-bit logic and IMAD, IMAD.WIDE taken as two, shared memory 128 B per
clock per SM, 132 SMs at 1.755 GHz). Mixed-key kernel: 144 IMAD.WIDE + ~258 other per
block, ~273 clocks per warp per 512 B -> ~1.9 B/clock/SM -> ~0.44 TB/s. Table kernel: per
4 blocks ~96 LDS.128 at public, random addresses; a quarter-warp's 8 lanes pick among 16
entries of a 256 B row, entries ``v`` and ``v + 8`` share banks, so ~1.8 wavefronts per
quarter instead of 1 (~7.3 per warp load instead of 4): ~700 shared-memory clocks per warp
per 2 KiB -> ~2.9 B/clock/SM (the ALU side, ~510 clocks per 2 KiB, is ~4 B/clock/SM), so
shared-memory bound near **~0.65 TB/s, about 1.5x the mixed-key kernel**. Fewer table
blocks per group (S = 3) shifts work back to the multiplier; 3-bit tables (8 entries per
row, no conflicts) would cost ~35% more lookups; both left for a measurement on a GPU.
Occupancy: 62 registers and 25 KiB of shared memory fit 4 blocks of 256 threads per SM
(32 warps; the mixed-key kernel's 76 fit 3). The per-block table copy reads 24.9 KB (from
L2, the same for every block) per 256 KiB of message, ~10% more traffic than the data.

Algorithm: parallel polynomial evaluation (both level-0 kernels)
-----------------------------------------
GHASH of blocks ``X_0 .. X_{n-1}`` is ``Y = sum_i X_i * H^(n-i)`` in GF(2^128).
Each message's ``n`` blocks are cut into chunks of ``L`` blocks *aligned to the
end* (the first chunk is the short one), so chunk ``c`` of ``C`` ends ``(C-1-c)*L``
blocks before the end and::

    Y = sum_c P_c * (H^L)^(C-1-c),     P_c = Horner_H(blocks of chunk c)

i.e. ``Y`` is again a polynomial, in ``K = H^L``, whose coefficients are the chunk
partials. Level 0 (``ghash_blocks``) does Horner with ``H`` over the message bytes,
one chunk per thread; level ``k >= 1`` (``ghash_combine``) does Horner with
``K_k = H^(L^k)`` over groups of ``L`` partials of the previous level, again
aligned to the end. Levels repeat until every message has one partial; the last
level XORs ``E_K(J0)`` in and writes the tag. A 1 GiB message with L = 64 needs
5 launches (64 Mi blocks -> 1 Mi -> 16 Ki -> 256 -> 4 -> 1); any number of
messages of at most ``L`` blocks, the length block included, needs exactly one.
The powers are made on the device: the thread owning unit 0 of a message at
level ``k`` squares ``K_k`` log2(L) times into ``K_{k+1}`` (double-buffered, so
no thread of the same launch reads what it writes).

Many messages in one launch: ``unit_start[k]`` is the exclusive prefix sum of
each message's units at level ``k`` (``kernels._launch.unit_prefix``); a thread
owning global unit ``u`` finds its message with ``kernels._launch.find_segment``.

GF(2^128) multiplication: constant time, no carry-less multiply instruction
---------------------------------------------------------------------------
Choice: BearSSL's ``ghash_ctmul`` idea, adapted to the GPU (option (b)), not
Shoup 4-bit tables (option (a)):

- A 32x32 carry-less product is 16 ordinary integer multiplies of the operands
  masked to every 4th bit (``0x11111111 << j``); each product bit sums at most 8
  terms, which fits in the 3 "hole" bits above it, so carries never reach a bit
  we keep. On the GPU one ``IMAD.WIDE.U32`` gives the full 64-bit product, so no
  bit-reversed second product is needed (BearSSL's ``ctmul32`` does 2x the work
  to get the high half).
- 128x128 -> 256 bits with two levels of Karatsuba: 9 such 32x32 products.
- GCM's bit-reflected order is kept as is: blocks are big-endian words, the
  integer carry-less product of two reflected values is the reflected product
  times ``x``, and that extra ``x`` is cancelled by keeping the *key* operand
  (``H``, ``H^L`` ...) pre-multiplied by ``x^-1`` (``H' = H*x^-1``, computed
  from ``H`` with a shift and a masked XOR of ``0xC2..01``); ``mul(a', b') =
  (ab)'`` so powers stay in that form. The reduction modulo
  ``x^128 + x^7 + x^2 + x + 1`` is shifts and XORs on the reflected value.
- Constant time: no table lookups and no data-dependent branches or addresses.

Measured SASS of the mixed-key kernel before the one-key kernel existed (sm_90, numba-cuda
0.30 -> ``ptxas -arch=sm_90`` 13.0, one 16-byte block of its main loop, full-block path):

- (b) this module: 402 instructions per block (25.4 per byte over a 1 KiB chunk):
  144 IMAD.WIDE.U32, 9 LDS.128, about 200 LOP3, one LDG.E.128, 4 PRMT; 76 registers,
  0 spills, 36 KiB shared (``ghash_combine``: 414 per partial, 72 registers). With
  ``launch_bounds=(256, 4)`` ptxas fits 64 registers but spills 20-44 bytes (outside
  the Horner loop, ~10 local accesses per chunk), so the bound is not set.
  History: 498 per block (31.4 per byte) with byte loads; 455 (28.7) with 128-bit
  loads and the shared multiply-adds of ``clmul32``; 424 (26.8) with the key schedule
  (the key-side masks and Karatsuba sums, 41 LOP3 per block, replaced by 9 LDS.128:
  see :func:`key_schedule`); 400 (25.3) with the byte swap as one PRMT.
  What stands between this and 20 per byte (320 per block with the loop's overhead):
  the data side of the product alone is 144 IMAD.WIDE + 36 masks + 90 XORs summing
  the products of a class + 54 merging the 4 classes of each of the 9 ``clmul32``,
  324 before the Karatsuba joins and the reduction (~40). Aggregated reduction
  (several blocks times ``H^k``, one reduction) saves at most the ~30 of the
  reduction per block and needs a schedule per power (36 KiB of shared memory
  each); deferring the class merges across blocks needs 72 accumulator registers.
  A table method (Shoup) is faster but indexes tables with secret data, which the
  constant-time requirement rules out. Reaching 20 per byte needs another multiplier
  (an untried idea: the tensor cores' 1-bit MMA, a GF(2) matrix product by popcount
  parity), not more tuning of this one.
  Written the obvious way (``uint64(a) * uint64(b)``) numba/LLVM emitted
  ``mul.lo.s64`` and ptxas added a useless VIADD per product (749 per block); hence
  ``mul_wide_u32`` below.
- (a) a Shoup 4-bit kernel written in numba for comparison (256 B table per key
  in shared memory, remainder table in constant memory): about 1,050
  instructions per block (127 per 4 nibbles x 8 + loads), with 32 shared loads
  at data-dependent addresses and 32 constant-memory loads at divergent
  addresses (serialised) per block. A hand-tuned table version would be
  ~15 instructions per nibble, ~500 per block: no better than (b), and it is not
  constant time and needs a table per key per thread block.

So (b) is the product of every kernel (in the one-key kernel, for the secret accumulator; the
tables there are indexed by public input only, which is what rules Shoup's method out): as fast or faster by instruction count, constant time (the shared key
schedule is read at addresses that depend only on the thread, never on data), and
any mix of keys per warp. Rough H100 estimate (not measured, no GPU
here, for the old 498-instruction version): ~400 ALU-pipe + 144 IMAD.WIDE per block -> ~6 clocks per block per SM ->
~0.6-0.7 TB/s for GHASH alone; with AES-CTR at ~0.35-0.4 TB/s that gives
~0.23-0.25 TB/s for AES-GCM, at the edge of the 0.25 TB/s target (see the
report for what could still be cut).

Memory layout
-------------
- ``aad_buf``, ``ct_buf``: ``uint8[*]``, every message's bytes at its offsets.
- ``GhashTable.messages``: ``uint64[n, 4]`` rows ``(aad_off, aad_len, ct_off, ct_len)``.
- ``GhashTable.unit_start``: ``uint64[levels, n + 1]``, units per message per level.
- ``h_blocks``, ``ekj0_blocks``, ``tags_out``: ``uint8[n, 16]`` (bytes as in the standard).
- Shared memory (per thread block): the key schedules, ``uint32[SCHEDULE_ROWS,
  THREADS_PER_BLOCK, 4]`` flattened; thread ``t`` owns ``[:, t, :]`` and nobody else
  reads it, so no barrier is needed.
- Scratch (``GhashScratch``): partials ``uint32[units, 4]`` x 2 (level outputs,
  ping-pong) and keys ``uint32[n, 4]`` x 2 (``K_k'`` per message, ping-pong).
  128-bit values in registers/scratch are 4 big-endian ``uint32`` words, word 0 first.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import cuda, int64, uint32, uint64

from ._compile import device_function, kernel
from ._vector_io import address_of, bswap32, load_u32x4, store_u32x4
from ._launch import (THREADS_PER_BLOCK, InnerLoop, ReportEntry, find_segment, is_simulator, launch,
                      mac_messages, unit_prefix)

#: Default chunk length L in 16-byte blocks (1 KiB per thread at level 0).
DEFAULT_CHUNK_BLOCKS = 64
#: Units (chunks) per launch must stay below this: the kernels count them in 32 bits, with
#: room for the grid stride (2 TiB of data per call at L = 64; a GPU holds far less).
MAX_UNITS = 2**31

_M0 = 0x11111111
_M1 = 0x22222222
_M2 = 0x44444444
_M3 = 0x88888888
_M0_64 = 0x1111111111111111
_M1_64 = 0x2222222222222222
_M2_64 = 0x4444444444444444
_M3_64 = 0x8888888888888888

#: Rows of a thread's key schedule (one per ``clmul32`` of a product), 4 words each.
SCHEDULE_ROWS = 9
#: Words of the shared key-schedule array: ``SCHEDULE_ROWS`` rows of ``THREADS_PER_BLOCK`` x 4
#: (row-major, so the 128-bit loads of a warp touch consecutive addresses): 36 KiB at 256 threads.
SCHEDULE_WORDS = SCHEDULE_ROWS * THREADS_PER_BLOCK * 4
#: Its alignment for the 128-bit loads (None in the simulator, which refuses the argument;
#: NumPy's allocations there are 16-byte aligned, and the twins assert it).
SCHEDULE_ALIGN = None if is_simulator() else 16

#: One-key kernel (:func:`_ghash_blocks`): blocks per group of its table path (S). A group
#: ``X_1..X_S`` of full blocks does ``Y = (Y ^ X_1)*H^S ^ X_2*H^(S-1) ^ .. ^ X_S*H``.
GROUP_BLOCKS = 4
LOG2_GROUP = 2  # table_groups is written out for S = 4 (three table blocks per group)
#: Words of the table of one power ``H^e``: 32 nibble positions x 16 values x 4 words (8 KiB).
TABLE_POWER_WORDS = 32 * 16 * 4
#: The one-key kernel's key tables (``uint32``, built on the device by :func:`_ghash_key_tables`,
#: copied into each thread block's shared memory): the tables of ``H^1 .. H^(S-1)``, then the
#: shared key schedules of ``H'`` and ``(H^S)'`` (9 rows of 4 words each, rows 4 words apart),
#: then ``(H^L)'`` for the next level (4 words). 24,880 bytes for S = 4.
TABLES_WORDS = (GROUP_BLOCKS - 1) * TABLE_POWER_WORDS
SCHED_H = TABLES_WORDS
SCHED_HS = SCHED_H + 4 * SCHEDULE_ROWS
NEXT_KEY = SCHED_HS + 4 * SCHEDULE_ROWS
KEY_TABLE_WORDS = NEXT_KEY + 4
#: Work units of :func:`_ghash_key_tables`: one per table row, one for the schedules.
KEY_TABLE_UNITS = 32 * (GROUP_BLOCKS - 1) + 1


# --------------------------------------------------------------------------- GF(2^128)

# 32x32 -> 64-bit multiply. Written in numba as ``uint64(a) * uint64(b)``, LLVM folds
# the masking into 64-bit ANDs, loses the zero-extension, and emits ``mul.lo.s64``
# (ptxas: IMAD.WIDE + a useless VIADD each). The device build therefore emits PTX
# ``mul.wide.u32`` directly; the simulator (which cannot run PTX) gets the plain
# NumPy twin. The choice is made here, once, at import.
if is_simulator():
    @device_function
    def mul_wide_u32(a, b):
        """Full 64-bit product of two uint32 (simulator twin)."""
        return uint64(uint32(a)) * uint64(uint32(b))

    @device_function
    def lds_u32x4(array, index):
        """Simulator twin of the shared 128-bit load: 4 words from a 16-byte aligned index
        (the device-typed tests check the real addresses with the device's code generation)."""
        i = int(index)
        assert i % 4 == 0, "16-byte shared load at a misaligned index"
        return uint32(array[i]), uint32(array[i + 1]), uint32(array[i + 2]), uint32(array[i + 3])

    @device_function
    def sts_u32x4(array, index, w0, w1, w2, w3):
        """Simulator twin of the schedule's 128-bit shared store (as :func:`lds_u32x4`)."""
        i = int(index)
        assert i % 4 == 0, "16-byte shared store at a misaligned index"
        array[i] = w0
        array[i + 1] = w1
        array[i + 2] = w2
        array[i + 3] = w3

    @device_function
    def opaque_u32(x):
        """Simulator twin of the optimisation barrier: ``x``."""
        return uint32(x)

    @device_function
    def reload_u64(array, index):
        """Simulator twin of the volatile reload: element ``index`` of the C-contiguous ``array``."""
        return uint64(getattr(array, "_ary", array).reshape(-1)[int(index)])
else:
    from llvmlite import ir as _ir
    from numba import types as _types
    from numba.cuda.extending import intrinsic as _intrinsic

    @_intrinsic
    def _mul_wide_u32_ptx(typingctx, a, b):
        sig = _types.uint64(_types.uint32, _types.uint32)

        def codegen(context, builder, signature, args):
            fnty = _ir.FunctionType(_ir.IntType(64), [_ir.IntType(32), _ir.IntType(32)])
            asm = _ir.InlineAsm(fnty, "mul.wide.u32 $0, $1, $2;", "=l,r,r")
            return builder.call(asm, args)

        return sig, codegen

    #: The schedule's 128-bit shared store (``STS.128``): an ordinary store suffices.
    sts_u32x4 = store_u32x4

    @device_function
    def mul_wide_u32(a, b):
        """Full 64-bit product of two uint32 (one PTX ``mul.wide.u32``: IMAD.WIDE.U32)."""
        return _mul_wide_u32_ptx(uint32(a), uint32(b))

    @_intrinsic
    def lds_u32x4(typingctx, array, index):
        """The 16 bytes at element ``index`` of the shared uint32 ``array`` (one ``LDS.128``).

        An ordinary load of the key schedule is what LLVM would see through: it forwards
        the values the same thread stored and hoists them out of the Horner loop into
        registers (136 of them). The load is therefore inline PTX marked as having side
        effects, so it stays in the loop, once per product.
        """
        ret = _types.UniTuple(_types.uint32, 4)

        def codegen(context, builder, sig, args):
            i32 = _ir.IntType(32)
            ary = context.make_array(sig.args[0])(context, builder, value=args[0])
            base = builder.ptrtoint(builder.addrspacecast(ary.data, _ir.IntType(8).as_pointer(3)), i32)
            index = context.cast(builder, args[1], sig.args[1], _types.uint32)
            address = builder.add(base, builder.shl(index, _ir.Constant(i32, 2)))
            fnty = _ir.FunctionType(_ir.LiteralStructType([i32] * 4), [i32])
            asm = _ir.InlineAsm(fnty, "ld.shared.v4.u32 {$0, $1, $2, $3}, [$4];", "=r,=r,=r,=r,r",
                                side_effect=True)
            words = builder.call(asm, [address])
            return context.make_tuple(builder, ret, [builder.extract_value(words, k) for k in range(4)])

        return ret(array, index), codegen

    @_intrinsic
    def opaque_u32(typingctx, x):
        """``x`` (uint32) through an inline-asm ``mov`` that LLVM must not merge or hoist: what is
        computed from the result (a message's table addresses) is computed again at each use
        instead of being kept in registers across the Horner loops."""
        def codegen(context, builder, sig, args):
            value = context.cast(builder, args[0], sig.args[0], _types.uint32)
            fnty = _ir.FunctionType(_ir.IntType(32), [_ir.IntType(32)])
            return builder.call(_ir.InlineAsm(fnty, "mov.b32 $0, $1;", "=r,r", side_effect=True), [value])

        return _types.uint32(x), codegen

    @_intrinsic
    def reload_u64(typingctx, array, index):
        """Element ``index`` of the C-contiguous uint64 ``array``, loaded again each time (``ld.volatile``).

        For values needed before and after a register-hungry loop (a message's offsets and
        lengths): an ordinary load would be merged with the first one by LLVM and the value kept
        in a register across the loop; reloading costs a load per chunk instead.
        """
        def codegen(context, builder, sig, args):
            ary = context.make_array(sig.args[0])(context, builder, value=args[0])
            index = context.cast(builder, args[1], sig.args[1], _types.int64)
            ptr = builder.ptrtoint(builder.gep(ary.data, [index]), _ir.IntType(64))
            fnty = _ir.FunctionType(_ir.IntType(64), [_ir.IntType(64)])
            asm = _ir.InlineAsm(fnty, "ld.volatile.u64 $0, [$1];", "=l,l", side_effect=True)
            return builder.call(asm, [ptr])

        return _types.uint64(array, index), codegen


@device_function
def clmul32_keyed(x, y0, y1, y2, y3):
    """Carry-less 32x32 -> 64-bit product of ``x`` and ``y`` (uint32), constant time, with the
    key operand ``y`` given split: ``y_b = y & (0x11111111 << b)`` (see :func:`key_schedule`).

    Each operand is split into 4 interleaved parts (every 4th bit: ``x_a`` holds the
    bits of ``x`` at positions ``= a`` mod 4). ``x_a * y_b`` (integer) holds the
    carry-less product's terms at positions ``= a + b`` mod 4, at most 8 per
    position (``8 - |t - 7|`` at position ``a + b + 4t``), so the 3 bits above each
    fit the sum and class ``k = a + b mod 4`` is read off by masking.

    Class ``k`` gets 4 products: ``k + 1`` with ``a + b = k`` (peak count 8 at position
    ``k + 28``) and ``3 - k`` with ``a + b = k + 4`` (peak at ``k + 32``). One of each
    summed as *integers* counts at most 8 + 7 = 15 terms per position, still inside
    the 4 bits, so those pairs share one multiply-add (``IMAD.WIDE.U32`` with its
    64-bit addend) and save an XOR: 16 multiplies, 10 XORs instead of 12.
    """
    x0 = uint32(x) & uint32(_M0)
    x1 = uint32(x) & uint32(_M1)
    x2 = uint32(x) & uint32(_M2)
    x3 = uint32(x) & uint32(_M3)
    z0 = (mul_wide_u32(x0, y0) + mul_wide_u32(x1, y3)) ^ mul_wide_u32(x2, y2) ^ mul_wide_u32(x3, y1)
    z1 = (mul_wide_u32(x0, y1) + mul_wide_u32(x2, y3)) ^ (mul_wide_u32(x1, y0) + mul_wide_u32(x3, y2))
    z2 = (mul_wide_u32(x0, y2) + mul_wide_u32(x3, y3)) ^ mul_wide_u32(x1, y1) ^ mul_wide_u32(x2, y0)
    z3 = mul_wide_u32(x0, y3) ^ mul_wide_u32(x1, y2) ^ mul_wide_u32(x2, y1) ^ mul_wide_u32(x3, y0)
    return ((z0 & uint64(_M0_64)) | (z1 & uint64(_M1_64))
            | (z2 & uint64(_M2_64)) | (z3 & uint64(_M3_64)))


@device_function
def clmul32(x, y):
    """Carry-less 32x32 -> 64-bit product of ``x`` and ``y`` (uint32), constant time."""
    return clmul32_keyed(x, uint32(y) & uint32(_M0), uint32(y) & uint32(_M1),
                         uint32(y) & uint32(_M2), uint32(y) & uint32(_M3))


@device_function
def karatsuba_join(lo, hi, mid):
    """(hi64, lo64) of a 64x64 carry-less product from its Karatsuba parts
    ``lo = a_lo*b_lo``, ``hi = a_hi*b_hi``, ``mid = (a_lo^a_hi)*(b_lo^b_hi)`` (uint64 each)."""
    mid = mid ^ lo ^ hi
    return hi ^ (mid >> uint64(32)), lo ^ (mid << uint64(32))


@device_function
def clmul64(a_hi, a_lo, b_hi, b_lo):
    """Carry-less 64x64 -> 128-bit product (Karatsuba, 3 ``clmul32``); returns (hi64, lo64)."""
    return karatsuba_join(clmul32(a_lo, b_lo), clmul32(a_hi, b_hi),
                          clmul32(uint32(a_lo) ^ uint32(a_hi), uint32(b_lo) ^ uint32(b_hi)))


@device_function
def gf128_join_reduce(l1, l0, h1, h0, m1, m0):
    """``a * b'`` as 4 big-endian words from the three 128-bit Karatsuba parts
    ``l = a_lo*b_lo``, ``h = a_hi*b_hi``, ``m = (a_lo^a_hi)*(b_lo^b_hi)`` ((hi64, lo64) each)."""
    m1 = m1 ^ l1 ^ h1
    m0 = m0 ^ l0 ^ h0
    # 256-bit product p3:p2:p1:p0 (uint64, p3 most significant).
    return gf128_reduce(h1, h0 ^ m1, l1 ^ m0, l0)


@device_function
def gf128_reduce(p3, p2, p1, p0):
    """The 256-bit carry-less product ``p3:p2:p1:p0`` (uint64, p3 most significant) reduced
    modulo GCM's polynomial, as 4 big-endian words."""
    # Reflected: p3:p2 holds degrees 0..127, d = p1:p0 degrees 128..255 (as a
    # reflected 128-bit value). x^128 = 1 + x + x^2 + x^7; multiplying by x^s is
    # a right shift by s. Bits shifted out (degree >= 128) fold back once more:
    # they only come from the 7 low bits of d, landing in the top word.
    g1 = p1 ^ (p0 << uint64(63)) ^ (p0 << uint64(62)) ^ (p0 << uint64(57))
    g0 = p0
    r1 = p3 ^ g1 ^ (g1 >> uint64(1)) ^ (g1 >> uint64(2)) ^ (g1 >> uint64(7))
    r0 = (p2 ^ g0 ^ ((g0 >> uint64(1)) | (g1 << uint64(63)))
          ^ ((g0 >> uint64(2)) | (g1 << uint64(62)))
          ^ ((g0 >> uint64(7)) | (g1 << uint64(57))))
    return (uint32(r1 >> uint64(32)), uint32(r1 & uint64(0xFFFFFFFF)),
            uint32(r0 >> uint64(32)), uint32(r0 & uint64(0xFFFFFFFF)))


@device_function
def spread_bits(x):
    """The carry-less square of the uint32 ``x``: bit ``i`` moved to bit ``2i`` (uint64)."""
    v = uint64(uint32(x))
    v = (v | (v << uint64(16))) & uint64(0x0000FFFF0000FFFF)
    v = (v | (v << uint64(8))) & uint64(0x00FF00FF00FF00FF)
    v = (v | (v << uint64(4))) & uint64(0x0F0F0F0F0F0F0F0F)
    v = (v | (v << uint64(2))) & uint64(0x3333333333333333)
    return (v | (v << uint64(1))) & uint64(0x5555555555555555)


@device_function
def gf128_square(a0, a1, a2, a3):
    """``gf128_mul(a, a)`` (so ``(a^2)'`` from ``a'``): squaring is linear in GF(2)[x], the
    carry-less square is the bits spread apart (no cross terms), then the same reduction.
    About 40 instructions and few registers, where the product takes ~400 and 16 live inputs."""
    return gf128_reduce(spread_bits(a0), spread_bits(a1), spread_bits(a2), spread_bits(a3))


@device_function
def gf128_mul(a0, a1, a2, a3, b0, b1, b2, b3):
    """``a * b`` in GCM's field, where ``b`` is a key operand in primed form (``b' = b*x^-1``).

    Inputs and output are GCM blocks as 4 big-endian uint32 words (word 0 = bytes
    0..3). With ``b`` primed the result is the plain product ``a*b_plain``; with
    both primed it is ``(a*b)'``. Constant time. The Horner loops use
    :func:`gf128_mul_scheduled` (the same product, key-side work done once).
    """
    # 128x128 Karatsuba over 64-bit halves: high half = words 0,1 (x^0.. in reflected order).
    l1, l0 = clmul64(a2, a3, b2, b3)
    h1, h0 = clmul64(a0, a1, b0, b1)
    m1, m0 = clmul64(uint32(a0) ^ uint32(a2), uint32(a1) ^ uint32(a3),
                     uint32(b0) ^ uint32(b2), uint32(b1) ^ uint32(b3))
    return gf128_join_reduce(l1, l0, h1, h0, m1, m0)


@device_function
def store_schedule_row(sched, index, w):
    """The schedule row at word ``index``: the key word ``w`` split into its 4 bit classes."""
    sts_u32x4(sched, index, uint32(w) & uint32(_M0), uint32(w) & uint32(_M1),
              uint32(w) & uint32(_M2), uint32(w) & uint32(_M3))


@device_function
def key_schedule(sched, base, stride, b0, b1, b2, b3):
    """Write the key schedule of the primed key ``b'`` into ``sched``, row ``r`` at word
    ``base + r*stride`` (16-byte aligned; see :func:`gf128_mul_scheduled`).

    The 9 key-side operands of the 9 ``clmul32`` of one :func:`gf128_mul` (Karatsuba
    sums included), each split into its 4 bit classes: the key-side work of a product,
    done once per key instead of once per block. Row order is that of
    :func:`gf128_mul_scheduled`.
    """
    store_schedule_row(sched, base, b3)
    store_schedule_row(sched, base + stride, b2)
    store_schedule_row(sched, base + int64(2) * stride, uint32(b2) ^ uint32(b3))
    store_schedule_row(sched, base + int64(3) * stride, b1)
    store_schedule_row(sched, base + int64(4) * stride, b0)
    store_schedule_row(sched, base + int64(5) * stride, uint32(b0) ^ uint32(b1))
    store_schedule_row(sched, base + int64(6) * stride, uint32(b1) ^ uint32(b3))
    store_schedule_row(sched, base + int64(7) * stride, uint32(b0) ^ uint32(b2))
    store_schedule_row(sched, base + int64(8) * stride, uint32(b0) ^ uint32(b1) ^ uint32(b2) ^ uint32(b3))


@device_function
def clmul32_row(x, sched, index):
    """``clmul32(x, key word)``, the key word's 4 bit classes read with one 128-bit shared load at ``index``."""
    y0, y1, y2, y3 = lds_u32x4(sched, index)
    return clmul32_keyed(x, y0, y1, y2, y3)


@device_function
def gf128_mul_scheduled(a0, a1, a2, a3, sched, base, stride):
    """``gf128_mul(a, b')`` with the key ``b'`` given by its schedule (:func:`key_schedule`) in the
    shared ``sched``: row ``r`` at word ``base + r*stride`` (a thread's slot: ``base = 4*slot``,
    ``stride = 4*THREADS_PER_BLOCK``; a schedule shared by the whole block: ``stride = 4``)."""
    l1, l0 = karatsuba_join(clmul32_row(a3, sched, base), clmul32_row(a2, sched, base + stride),
                            clmul32_row(uint32(a2) ^ uint32(a3), sched, base + int64(2) * stride))
    h1, h0 = karatsuba_join(clmul32_row(a1, sched, base + int64(3) * stride),
                            clmul32_row(a0, sched, base + int64(4) * stride),
                            clmul32_row(uint32(a0) ^ uint32(a1), sched, base + int64(5) * stride))
    s1 = uint32(a1) ^ uint32(a3)
    s0 = uint32(a0) ^ uint32(a2)
    m1, m0 = karatsuba_join(clmul32_row(s1, sched, base + int64(6) * stride),
                            clmul32_row(s0, sched, base + int64(7) * stride),
                            clmul32_row(s0 ^ s1, sched, base + int64(8) * stride))
    return gf128_join_reduce(l1, l0, h1, h0, m1, m0)


@device_function
def gf128_prime(h0, h1, h2, h3):
    """``h * x^-1`` (the primed key form): shift left by one bit, fold the bit
    shifted out (degree 0) back as ``x^-1 = x^127 + x^6 + x + 1`` (0xC2..01). Constant time."""
    mask = uint32(uint32(0) - (uint32(h0) >> uint32(31)))
    p0 = uint32((uint32(h0) << uint32(1)) | (uint32(h1) >> uint32(31)))
    p1 = uint32((uint32(h1) << uint32(1)) | (uint32(h2) >> uint32(31)))
    p2 = uint32((uint32(h2) << uint32(1)) | (uint32(h3) >> uint32(31)))
    p3 = uint32(uint32(h3) << uint32(1))
    return uint32(p0 ^ (mask & uint32(0xC2000000))), p1, p2, uint32(p3 ^ (mask & uint32(1)))


# --------------------------------------------------------------------------- byte I/O


@device_function
def load_be32(buf, off):
    """Big-endian uint32 from 4 bytes of ``buf`` at ``off`` (>= 0).

    Indices are unsigned so numba emits no negative-index wrap-around selects.
    """
    o = uint64(off)
    return uint32((uint32(buf[o]) << uint32(24)) | (uint32(buf[o + uint64(1)]) << uint32(16))
                  | (uint32(buf[o + uint64(2)]) << uint32(8)) | uint32(buf[o + uint64(3)]))


@device_function
def load_be32_partial(buf, off, avail):
    """Like ``load_be32`` but only the first ``avail`` bytes exist (rest read as zero)."""
    w = uint32(0)
    for b in range(4):
        if int64(b) < avail:
            w = uint32(w | (uint32(buf[uint64(off) + uint64(b)]) << uint32(24 - 8 * b)))
    return w


@device_function
def store_be32(buf, off, w):
    """Store uint32 ``w`` big-endian into 4 bytes of ``buf`` at ``off``."""
    buf[off] = uint32(w) >> uint32(24)
    buf[off + 1] = (uint32(w) >> uint32(16)) & uint32(0xFF)
    buf[off + 2] = (uint32(w) >> uint32(8)) & uint32(0xFF)
    buf[off + 3] = uint32(w) & uint32(0xFF)


@device_function
def load_block(buf, off, avail):
    """GCM block from ``buf[off:off+16]`` as 4 BE words; only ``avail`` (>0) bytes exist, zero-padded."""
    if avail >= int64(16):
        return (load_be32(buf, off), load_be32(buf, off + 4),
                load_be32(buf, off + 8), load_be32(buf, off + 12))
    return (load_be32_partial(buf, off, avail), load_be32_partial(buf, off + 4, avail - 4),
            load_be32_partial(buf, off + 8, avail - 8), load_be32_partial(buf, off + 12, avail - 12))


@device_function
def horner_bytes(x0, x1, x2, x3, buf, base, length, first, stop, sched, kbase, kstride):
    """Continue Horner ``x = (x ^ X_i) * H`` over blocks ``first..stop-1`` of the
    ``length``-byte field at ``buf[base:]`` (last block zero-padded); ``H'`` is given
    by its schedule in ``sched`` (rows at ``kbase + r*kstride``, :func:`gf128_mul_scheduled`).

    When the field starts 16-byte aligned, its full blocks are read with one
    128-bit load each (``LDG.E.128``, little-endian words, byte-swapped); the rest
    (an unaligned field, the partial last block) byte by byte.
    """
    wide_stop = first
    if (address_of(buf, base) & uint64(15)) == uint64(0):
        wide_stop = min(stop, length >> int64(4))
    i = first
    while i < wide_stop:
        w0, w1, w2, w3 = load_u32x4(buf, base + i * int64(16))
        x0, x1, x2, x3 = gf128_mul_scheduled(x0 ^ bswap32(w0), x1 ^ bswap32(w1), x2 ^ bswap32(w2),
                                             x3 ^ bswap32(w3), sched, kbase, kstride)
        i += int64(1)
    while i < stop:
        w0, w1, w2, w3 = load_block(buf, base + i * int64(16), length - i * int64(16))
        x0, x1, x2, x3 = gf128_mul_scheduled(x0 ^ w0, x1 ^ w1, x2 ^ w2, x3 ^ w3, sched, kbase, kstride)
        i += int64(1)
    return x0, x1, x2, x3


# --------------------------------------------------------------------------- one-key tables


@device_function
def mul_x(a0, a1, a2, a3):
    """``a * x`` (reflected order: a right shift by one bit, the bit of degree 127 folded
    back as ``x^128 = 1 + x + x^2 + x^7``, i.e. ``0xE1`` into the top byte). Constant time."""
    mask = uint32(uint32(0) - (uint32(a3) & uint32(1)))
    r3 = uint32((uint32(a3) >> uint32(1)) | (uint32(a2) << uint32(31)))
    r2 = uint32((uint32(a2) >> uint32(1)) | (uint32(a1) << uint32(31)))
    r1 = uint32((uint32(a1) >> uint32(1)) | (uint32(a0) << uint32(31)))
    r0 = uint32((uint32(a0) >> uint32(1)) ^ (mask & uint32(0xE1000000)))
    return r0, r1, r2, r3


@device_function
def nibble_element(p):
    """The field element whose only set coefficient is the top bit of nibble position ``p``
    (0..31) of a block read as 4 *little-endian* words (``load_u32x4``): word ``p >> 3``, nibble
    ``p & 7`` of that word, as 4 big-endian words. Byte ``j = (p & 7) >> 1`` of the word is
    block byte ``4*(p >> 3) + j``; an odd nibble is that byte's high half (its bit 7 is the
    lowest degree), an even one its low half (bit 3)."""
    q = p & int64(7)
    bit = uint32(uint32(1) << uint32(int64(27) - int64(8) * (q >> int64(1)) + int64(4) * (q & int64(1))))
    w = p >> int64(3)
    return (bit if w == int64(0) else uint32(0), bit if w == int64(1) else uint32(0),
            bit if w == int64(2) else uint32(0), bit if w == int64(3) else uint32(0))


@device_function
def store_table_row(tables, row, b0, b1, b2, b3):
    """Row ``row`` (16 entries of 4 words) of a table: entry ``v`` is the XOR of the basis values
    ``b3`` (for bit 3 of ``v``) .. ``b0`` (bit 0), each a 4-tuple of big-endian words."""
    for v in range(16):
        m3 = uint32(uint32(0) - ((uint32(v) >> uint32(3)) & uint32(1)))
        m2 = uint32(uint32(0) - ((uint32(v) >> uint32(2)) & uint32(1)))
        m1 = uint32(uint32(0) - ((uint32(v) >> uint32(1)) & uint32(1)))
        m0 = uint32(uint32(0) - (uint32(v) & uint32(1)))
        i = row * int64(64) + int64(v) * int64(4)
        for k in range(4):
            tables[i + k] = uint32((m3 & b3[k]) ^ (m2 & b2[k]) ^ (m1 & b1[k]) ^ (m0 & b0[k]))


@device_function
def table_lookup(tables, index):
    """Entry of the one-key tables at word ``index``: one 128-bit shared load (``LDS.128``).

    The only shared load whose address depends on data. Its callers pass indices made
    from the bytes of the *public* GHASH input (associated data, ciphertext, IV), never
    from the accumulator or the key; the tests record every index it is given and check them
    against the input's nibbles (``tests/test_kernel_ghash.py``).
    """
    return lds_u32x4(tables, index)


@device_function
def table_word(x0, x1, x2, x3, tables, row, w):
    """``x ^ sum_q T[row + q][nibble q of w]`` over the 8 nibbles of the little-endian word ``w``:
    8 lookups whose indices are the nibbles of ``w`` times 4 words (``(w >> (4q - 4)) & 0xF0`` is
    nibble ``q`` times 16 bytes), plus the row's offset (a constant in the load's immediate)."""
    w = uint32(w)
    base = row * int64(64)
    t0, t1, t2, t3 = table_lookup(tables, base + int64(((w << uint32(4)) & uint32(0xF0)) >> uint32(2)))
    x0 ^= t0
    x1 ^= t1
    x2 ^= t2
    x3 ^= t3
    t0, t1, t2, t3 = table_lookup(tables, base + int64(64) + int64((w & uint32(0xF0)) >> uint32(2)))
    x0 ^= t0
    x1 ^= t1
    x2 ^= t2
    x3 ^= t3
    t0, t1, t2, t3 = table_lookup(tables, base + int64(128) + int64(((w >> uint32(4)) & uint32(0xF0)) >> uint32(2)))
    x0 ^= t0
    x1 ^= t1
    x2 ^= t2
    x3 ^= t3
    t0, t1, t2, t3 = table_lookup(tables, base + int64(192) + int64(((w >> uint32(8)) & uint32(0xF0)) >> uint32(2)))
    x0 ^= t0
    x1 ^= t1
    x2 ^= t2
    x3 ^= t3
    t0, t1, t2, t3 = table_lookup(tables, base + int64(256) + int64(((w >> uint32(12)) & uint32(0xF0)) >> uint32(2)))
    x0 ^= t0
    x1 ^= t1
    x2 ^= t2
    x3 ^= t3
    t0, t1, t2, t3 = table_lookup(tables, base + int64(320) + int64(((w >> uint32(16)) & uint32(0xF0)) >> uint32(2)))
    x0 ^= t0
    x1 ^= t1
    x2 ^= t2
    x3 ^= t3
    t0, t1, t2, t3 = table_lookup(tables, base + int64(384) + int64(((w >> uint32(20)) & uint32(0xF0)) >> uint32(2)))
    x0 ^= t0
    x1 ^= t1
    x2 ^= t2
    x3 ^= t3
    t0, t1, t2, t3 = table_lookup(tables, base + int64(448) + int64(((w >> uint32(24)) & uint32(0xF0)) >> uint32(2)))
    return uint32(x0 ^ t0), uint32(x1 ^ t1), uint32(x2 ^ t2), uint32(x3 ^ t3)


@device_function
def table_block(x0, x1, x2, x3, tables, power, w0, w1, w2, w3):
    """``x ^ X*H^power`` for the block ``X`` given as its 4 little-endian words (as loaded, not
    byte-swapped): the 32 nibble lookups of the table of ``H^power`` (1 <= power < S)."""
    row = (int64(power) - int64(1)) * int64(32)
    x0, x1, x2, x3 = table_word(x0, x1, x2, x3, tables, row, w0)
    x0, x1, x2, x3 = table_word(x0, x1, x2, x3, tables, row + int64(8), w1)
    x0, x1, x2, x3 = table_word(x0, x1, x2, x3, tables, row + int64(16), w2)
    return table_word(x0, x1, x2, x3, tables, row + int64(24), w3)


@device_function
def full_groups(buf, base, length, first, stop):
    """Groups of ``GROUP_BLOCKS`` full blocks from block ``first`` (before ``stop``) of the
    ``length``-byte field at ``buf[base:]`` that take the table path: none unless the field
    is 16-byte aligned (uint32)."""
    groups = uint32(0)
    if (address_of(buf, base) & uint64(15)) == uint64(0) and first < stop:
        full = min(stop, length >> int64(4)) - first
        if full > int64(0):
            groups = uint32(full >> int64(LOG2_GROUP))
    return groups


@device_function
def table_groups(x0, x1, x2, x3, buf, base, length, first, stop, tables):
    """Horner over the first :func:`full_groups` groups of ``GROUP_BLOCKS`` full blocks of
    ``buf[base:]``'s blocks ``first..stop-1``: per group one product with ``(H^S)'`` (shared
    schedule) and table lookups for the other S - 1 blocks. The caller continues with
    :func:`horner_bytes` after them. Only ``x``, a byte offset and a 32-bit count stay live in
    the loop (registers)."""
    groups = full_groups(buf, base, length, first, stop)
    at = base + first * int64(16)
    for _ in range(groups):
        # The table blocks first, the product last: while the product runs (the register peak)
        # only their sum and x are live, no block loaded ahead.
        w0, w1, w2, w3 = load_u32x4(buf, at + int64(16))
        z0, z1, z2, z3 = table_block(uint32(0), uint32(0), uint32(0), uint32(0), tables, 3, w0, w1, w2, w3)
        w0, w1, w2, w3 = load_u32x4(buf, at + int64(32))
        z0, z1, z2, z3 = table_block(z0, z1, z2, z3, tables, 2, w0, w1, w2, w3)
        w0, w1, w2, w3 = load_u32x4(buf, at + int64(48))
        z0, z1, z2, z3 = table_block(z0, z1, z2, z3, tables, 1, w0, w1, w2, w3)
        w0, w1, w2, w3 = load_u32x4(buf, at)
        x0, x1, x2, x3 = gf128_mul_scheduled(x0 ^ bswap32(w0), x1 ^ bswap32(w1), x2 ^ bswap32(w2),
                                             x3 ^ bswap32(w3), tables, int64(SCHED_HS), int64(4))
        x0 = uint32(x0 ^ z0)
        x1 = uint32(x1 ^ z1)
        x2 = uint32(x2 ^ z2)
        x3 = uint32(x3 ^ z3)
        at += int64(16 * GROUP_BLOCKS)
    return x0, x1, x2, x3


@device_function
def horner_field_tables(x0, x1, x2, x3, buf, messages, unit_start, m, u, chunk_blocks, field, tables):
    """Horner over the blocks of ``field`` (0: associated data, 1: ciphertext) of unit ``u``'s
    chunk in the one-key kernel: :func:`table_groups`, then :func:`horner_bytes` for the rest
    (shared schedule of ``H'``), the field's geometry read again in between (:func:`chunk_field`)."""
    first, stop, off, length = chunk_field(messages, unit_start, m, u, chunk_blocks, field)
    x0, x1, x2, x3 = table_groups(x0, x1, x2, x3, buf, off, length, first, stop, tables)
    first, stop, off, length = chunk_field(messages, unit_start, m, u, chunk_blocks, field)
    groups = full_groups(buf, off, length, first, stop)  # computed again, not kept across the loop
    return horner_bytes(x0, x1, x2, x3, buf, off, length, first + (int64(groups) << int64(LOG2_GROUP)), stop,
                        tables, int64(SCHED_H), int64(4))

@device_function
def next_key(k0, k1, k2, k3, log2_l):
    """``(K^L)'`` from ``K'`` by ``log2(L)`` squarings (``mul(a', a') = (a^2)'``)."""
    for _ in range(uint32(log2_l)):  # a 32-bit trip count: one register if hoisted
        k0, k1, k2, k3 = gf128_square(k0, k1, k2, k3)
    return k0, k1, k2, k3


@device_function
def store_next_key(key_out, m, k0, k1, k2, k3, log2_l):
    """``key_out[m] = (K^L)'`` for the next level, from ``K'`` (done by unit 0 of a message)."""
    n0, n1, n2, n3 = next_key(k0, k1, k2, k3, log2_l)
    key_out[m, 0] = n0
    key_out[m, 1] = n1
    key_out[m, 2] = n2
    key_out[m, 3] = n3


@device_function
def unit_of_message(unit_start, n_messages, u):
    """``(m, c, n)``: global unit ``u`` is unit ``c`` (int64) of message ``m``, which has ``n`` (int64) units."""
    m = find_segment(unit_start, n_messages, u)
    first_unit = uint64(unit_start[m])
    n_units = int64(uint64(unit_start[m + 1]) - first_unit)
    return m, int64(u - first_unit), n_units


@device_function
def chunk_bounds(n_items, n_units, c, chunk_blocks):
    """``[start, end)`` of chunk ``c`` when ``n_items`` are cut into ``n_units`` chunks of
    ``chunk_blocks`` aligned to the end (chunk 0 is the short one)."""
    end = n_items - (n_units - int64(1) - c) * int64(chunk_blocks)
    start = end - int64(chunk_blocks)
    if start < int64(0):
        start = int64(0)
    return start, end


@device_function
def store_result(m, unit, x0, x1, x2, x3, final, partials_out, ekj0_blocks, tags_out):
    """Final level: ``tags_out[m] = x ^ E_K(J0)`` as bytes; else ``partials_out[unit] = x``."""
    if final:
        e0 = load_be32(ekj0_blocks[m], 0)
        e1 = load_be32(ekj0_blocks[m], 4)
        e2 = load_be32(ekj0_blocks[m], 8)
        e3 = load_be32(ekj0_blocks[m], 12)
        t = tags_out[m]
        store_be32(t, 0, x0 ^ e0)
        store_be32(t, 4, x1 ^ e1)
        store_be32(t, 8, x2 ^ e2)
        store_be32(t, 12, x3 ^ e3)
    else:
        partials_out[unit, 0] = x0
        partials_out[unit, 1] = x1
        partials_out[unit, 2] = x2
        partials_out[unit, 3] = x3


# --------------------------------------------------------------------------- kernels


def _ghash_blocks_mixed_keys(aad_buf, ct_buf, messages, unit_start, n_messages, h_blocks, chunk_blocks,
                  log2_chunk, partials_out, key_out, ekj0_blocks, tags_out, final):
    """Level 0: one thread per chunk of ``chunk_blocks`` message blocks (aligned to the end).

    Writes the chunk's Horner partial ``sum X_i H^(e-i)`` (or, when ``final``, the
    tag), and for unit 0 of a message with more than one chunk, ``(H^L)'`` to ``key_out``.
    Each thread keeps its key schedule in its own slot of the shared ``sched`` (no
    thread reads another's, so no barrier).
    """
    sched = cuda.shared.array(SCHEDULE_WORDS, dtype=uint32, alignment=SCHEDULE_ALIGN)
    kbase = int64(cuda.threadIdx.x) * int64(4)  # this thread's slot of the schedule
    kstride = int64(4 * THREADS_PER_BLOCK)
    total = uint64(unit_start[n_messages])
    stride = uint64(cuda.gridDim.x) * uint64(cuda.blockDim.x)
    u = uint64(cuda.grid(1))
    while u < total:
        m, c, n_units = unit_of_message(unit_start, n_messages, u)
        aad_off = int64(messages[m, 0])
        aad_len = int64(messages[m, 1])
        ct_off = int64(messages[m, 2])
        ct_len = int64(messages[m, 3])
        n_aad = (aad_len + int64(15)) >> int64(4)
        n_ct = (ct_len + int64(15)) >> int64(4)
        n_blocks = n_aad + n_ct + int64(1)
        start, end = chunk_bounds(n_blocks, n_units, c, chunk_blocks)

        hb = h_blocks[m]
        k0, k1, k2, k3 = gf128_prime(load_be32(hb, 0), load_be32(hb, 4),
                                     load_be32(hb, 8), load_be32(hb, 12))
        key_schedule(sched, kbase, kstride, k0, k1, k2, k3)
        # Before the Horner loops, so that the key is not live (in registers) across them.
        if c == int64(0) and n_units > int64(1):
            store_next_key(key_out, m, k0, k1, k2, k3, log2_chunk)
        x0 = uint32(0)
        x1 = uint32(0)
        x2 = uint32(0)
        x3 = uint32(0)
        # Associated data blocks [0, n_aad).
        x0, x1, x2, x3 = horner_bytes(x0, x1, x2, x3, aad_buf, aad_off, aad_len,
                                      start, min(end, n_aad), sched, kbase, kstride)
        # Ciphertext blocks [n_aad, n_aad + n_ct), indexed from 0 in ct_buf.
        x0, x1, x2, x3 = horner_bytes(x0, x1, x2, x3, ct_buf, ct_off, ct_len,
                                      max(start, n_aad) - n_aad, min(end, n_aad + n_ct) - n_aad,
                                      sched, kbase, kstride)
        # Length block be64(8*len(A)) || be64(8*len(C)).
        if end == n_blocks:
            abits = uint64(aad_len) << uint64(3)
            cbits = uint64(ct_len) << uint64(3)
            x0, x1, x2, x3 = gf128_mul_scheduled(x0 ^ uint32(abits >> uint64(32)),
                                                 x1 ^ uint32(abits & uint64(0xFFFFFFFF)),
                                                 x2 ^ uint32(cbits >> uint64(32)),
                                                 x3 ^ uint32(cbits & uint64(0xFFFFFFFF)), sched, kbase, kstride)
        store_result(m, u, x0, x1, x2, x3, final, partials_out, ekj0_blocks, tags_out)
        u += stride


@device_function
def chunk_field(messages, unit_start, m, u, chunk_blocks, field):
    """``(first, stop, offset, length)`` of the blocks of field ``field`` (0: associated data,
    1: ciphertext) that unit ``u`` (chunk of message ``m``) covers, read again from the tables
    (:func:`reload_u64`) so that nothing of it stays in a register across the Horner loops;
    field 2: ``(1 if the chunk ends with the length block else 0, 0, 8*len(A), 8*len(C))``."""
    m = int64(opaque_u32(m))
    aad_len = int64(reload_u64(messages, m * int64(4) + int64(1)))
    ct_len = int64(reload_u64(messages, m * int64(4) + int64(3)))
    first_unit = int64(reload_u64(unit_start, m))
    n_units = int64(reload_u64(unit_start, m + int64(1))) - first_unit
    n_aad = (aad_len + int64(15)) >> int64(4)
    n_blocks = n_aad + ((ct_len + int64(15)) >> int64(4)) + int64(1)
    start, end = chunk_bounds(n_blocks, n_units, int64(u) - first_unit, chunk_blocks)
    if field == 0:
        return start, min(end, n_aad), int64(reload_u64(messages, m * int64(4))), aad_len
    if field == 1:
        return (max(start, n_aad) - n_aad, min(end, n_blocks - int64(1)) - n_aad,
                int64(reload_u64(messages, m * int64(4) + int64(2))), ct_len)
    return int64(end == n_blocks), int64(0), aad_len << int64(3), ct_len << int64(3)


def _ghash_key_tables(h_blocks, log2_chunk, tables):
    """Set-up of the one-key kernel: ``tables`` (``uint32[KEY_TABLE_WORDS]``) from ``H = h_blocks[0]``.

    Unit ``u < 32*(S-1)``: row ``u`` (power ``e = u // 32 + 1``, nibble position ``p = u % 32``):
    the basis ``b3 = nibble_element(p) * H^e``, ``b2 = b3*x``, ``b1``, ``b0``, and the 16 entries
    (XORs of the basis, :func:`store_table_row`). The last unit: the schedules of ``H'`` and
    ``(H^S)'`` and ``(H^L)'``. Every unit computes its powers itself (a few products, once per call).
    """
    n_rows = int64(32 * (GROUP_BLOCKS - 1))
    stride = int64(cuda.gridDim.x) * int64(cuda.blockDim.x)
    u = int64(cuda.grid(1))
    hb = h_blocks[0]
    while u <= n_rows:
        h0, h1, h2, h3 = gf128_prime(load_be32(hb, 0), load_be32(hb, 4), load_be32(hb, 8), load_be32(hb, 12))
        if u < n_rows:
            e = u >> int64(5)   # power - 1
            k0, k1, k2, k3 = h0, h1, h2, h3
            for _ in range(e):
                k0, k1, k2, k3 = gf128_mul(k0, k1, k2, k3, h0, h1, h2, h3)
            n0, n1, n2, n3 = nibble_element(u & int64(31))
            b3 = gf128_mul(n0, n1, n2, n3, k0, k1, k2, k3)
            b2 = mul_x(b3[0], b3[1], b3[2], b3[3])
            b1 = mul_x(b2[0], b2[1], b2[2], b2[3])
            b0 = mul_x(b1[0], b1[1], b1[2], b1[3])
            store_table_row(tables, u, b0, b1, b2, b3)
        else:
            key_schedule(tables, int64(SCHED_H), int64(4), h0, h1, h2, h3)
            k0, k1, k2, k3 = h0, h1, h2, h3
            for _ in range(LOG2_GROUP):  # S = 4: two squarings
                k0, k1, k2, k3 = gf128_square(k0, k1, k2, k3)
            key_schedule(tables, int64(SCHED_HS), int64(4), k0, k1, k2, k3)
            n0, n1, n2, n3 = next_key(h0, h1, h2, h3, log2_chunk)
            tables[NEXT_KEY] = n0
            tables[NEXT_KEY + 1] = n1
            tables[NEXT_KEY + 2] = n2
            tables[NEXT_KEY + 3] = n3
        u += stride


def _ghash_blocks(aad_buf, ct_buf, messages, unit_start, n_messages, key_tables, chunk_blocks,
                  partials_out, key_out, ekj0_blocks, tags_out, final):
    """Level 0 when every message has the same ``H`` (one AES key): one thread per chunk of
    ``chunk_blocks`` blocks, as :func:`_ghash_blocks_mixed_keys`, with the key tables
    (:func:`_ghash_key_tables`) copied into shared memory first.

    Full groups of ``GROUP_BLOCKS`` aligned full blocks take the table path
    (:func:`table_groups`); the rest (unaligned fields, partial and last blocks, the length
    block) one product per block with the shared schedule of ``H'``.
    """
    tables = cuda.shared.array(KEY_TABLE_WORDS, dtype=uint32, alignment=SCHEDULE_ALIGN)
    # One unit per thread (launched with grid_stride=False): no grid-stride loop, whose
    # counters and bounds would stay live across the Horner loops (70 registers with it,
    # 62 without). A block past the work exits before it copies anything (uniform: no barrier
    # is left waiting).
    total = uint32(unit_start[n_messages])
    if uint32(cuda.blockIdx.x) * uint32(cuda.blockDim.x) >= total:
        return
    i = cuda.threadIdx.x
    while i < KEY_TABLE_WORDS:
        tables[i] = key_tables[i]
        i += cuda.blockDim.x
    cuda.syncthreads()
    u = uint32(cuda.grid(1))
    if u < total:
        m_, c, n_units = unit_of_message(unit_start, n_messages, u)
        m = uint32(m_)
        if c == int64(0) and n_units > int64(1):
            for k in range(4):
                key_out[m, k] = tables[NEXT_KEY + k]
        x0 = uint32(0)
        x1 = uint32(0)
        x2 = uint32(0)
        x3 = uint32(0)
        x0, x1, x2, x3 = horner_field_tables(x0, x1, x2, x3, aad_buf, messages, unit_start, m, u,
                                             chunk_blocks, 0, tables)
        x0, x1, x2, x3 = horner_field_tables(x0, x1, x2, x3, ct_buf, messages, unit_start, m, u,
                                             chunk_blocks, 1, tables)
        last, _, abits, cbits = chunk_field(messages, unit_start, m, u, chunk_blocks, 2)
        if last != int64(0):
            x0, x1, x2, x3 = gf128_mul_scheduled(x0 ^ uint32(uint64(abits) >> uint64(32)),
                                                 x1 ^ uint32(uint64(abits) & uint64(0xFFFFFFFF)),
                                                 x2 ^ uint32(uint64(cbits) >> uint64(32)),
                                                 x3 ^ uint32(uint64(cbits) & uint64(0xFFFFFFFF)), tables,
                                                 int64(SCHED_H), int64(4))
        store_result(m, u, x0, x1, x2, x3, final, partials_out, ekj0_blocks, tags_out)


def _ghash_combine(partials_in, in_start, partials_out, out_start, n_messages, key_in, key_out,
                   chunk_blocks, log2_chunk, ekj0_blocks, tags_out, final):
    """Level k >= 1: one thread per group of ``chunk_blocks`` partials of the previous level.

    Group ``g`` (aligned to the end) gets ``sum_c P_c K^(e-1-c)`` by Horner with
    ``K' = key_in[m]``; unit 0 of a message with more than one group writes ``(K^L)'``.
    The key schedule lives in the thread's slot of the shared ``sched``, as in level 0.
    """
    sched = cuda.shared.array(SCHEDULE_WORDS, dtype=uint32, alignment=SCHEDULE_ALIGN)
    kbase = int64(cuda.threadIdx.x) * int64(4)  # this thread's slot of the schedule
    kstride = int64(4 * THREADS_PER_BLOCK)
    # The unit count in 32 bits (fewer than 2**31 units per launch, see pack_messages):
    # registers, which the products need.
    total = uint32(out_start[n_messages])
    u = uint32(cuda.grid(1))  # (the stride added below is uint64, so u is too from then on)
    while u < total:
        m_, g, n_units = unit_of_message(out_start, n_messages, u)
        m = uint32(m_)  # one register across the loop (n < 2**32 messages)
        in_first = int64(in_start[m])
        n_in = int64(uint64(in_start[m + 1])) - in_first
        start, end = chunk_bounds(n_in, n_units, g, chunk_blocks)
        k0 = uint32(key_in[m, 0])
        k1 = uint32(key_in[m, 1])
        k2 = uint32(key_in[m, 2])
        k3 = uint32(key_in[m, 3])
        key_schedule(sched, kbase, kstride, k0, k1, k2, k3)
        if g == int64(0) and n_units > int64(1):  # before the loop: the key is then dead in it
            store_next_key(key_out, m, k0, k1, k2, k3, log2_chunk)
        j = uint32(in_first + start)
        x0 = uint32(partials_in[j, 0])
        x1 = uint32(partials_in[j, 1])
        x2 = uint32(partials_in[j, 2])
        x3 = uint32(partials_in[j, 3])
        # A 32-bit count and an unsigned row: the fewest registers live across the products.
        for _ in range(uint32(end - start - int64(1))):
            j += uint32(1)
            x0, x1, x2, x3 = gf128_mul_scheduled(x0, x1, x2, x3, sched, kbase, kstride)
            x0 ^= uint32(partials_in[j, 0])
            x1 ^= uint32(partials_in[j, 1])
            x2 ^= uint32(partials_in[j, 2])
            x3 ^= uint32(partials_in[j, 3])
        store_result(m, u, x0, x1, x2, x3, final, partials_out, ekj0_blocks, tags_out)
        u += uint32(cuda.gridDim.x) * uint32(cuda.blockDim.x)


_BLOCKS_SIG = ("void(uint8[::1], uint8[::1], uint64[:, ::1], uint64[::1], int64, uint32[::1], "
               "int64, uint32[:, ::1], uint32[:, ::1], uint8[:, ::1], uint8[:, ::1], boolean)")
_MIXED_SIG = ("void(uint8[::1], uint8[::1], uint64[:, ::1], uint64[::1], int64, uint8[:, ::1], "
              "int64, int64, uint32[:, ::1], uint32[:, ::1], uint8[:, ::1], uint8[:, ::1], boolean)")
_TABLES_SIG = "void(uint8[:, ::1], int64, uint32[::1])"
_COMBINE_SIG = ("void(uint32[:, ::1], uint64[::1], uint32[:, ::1], uint64[::1], int64, "
                "uint32[:, ::1], uint32[:, ::1], int64, int64, uint8[:, ::1], uint8[:, ::1], boolean)")

#: ``(threads per block, blocks per SM)`` the combine kernel is compiled for: caps ptxas at
#: 65536 / (4 * 256) = 64 registers per thread, where it needs no spill (unbounded it takes 70).
COMBINE_LAUNCH_BOUNDS = (THREADS_PER_BLOCK, 4)

ghash_blocks = kernel(_ghash_blocks)
ghash_blocks_mixed_keys = kernel(_ghash_blocks_mixed_keys)
ghash_key_tables = kernel(_ghash_key_tables)
ghash_combine = kernel(_ghash_combine, launch_bounds=COMBINE_LAUNCH_BOUNDS)

KERNEL_REPORT = [
    ReportEntry("ghash_blocks", _ghash_blocks, _BLOCKS_SIG, 16 * DEFAULT_CHUNK_BLOCKS, grid_stride=False,
                inner_loops=(
                    InnerLoop(f"copy of the key tables into shared memory: {KEY_TABLE_WORDS} words per block of "
                              f"{THREADS_PER_BLOCK} threads", trips=-(-KEY_TABLE_WORDS // THREADS_PER_BLOCK),
                              ops=("STS",)),
                    InnerLoop("find_segment: binary search over the message table"),
                    InnerLoop("table groups of aligned full associated-data blocks (none in a ciphertext chunk)",
                              ops=("IMAD.WIDE.U32", "LDG.E.128", "LDS.128")),
                    InnerLoop("Horner over the other aligned full associated-data blocks",
                              ops=("IMAD.WIDE.U32", "LDG.E.128")),
                    InnerLoop("Horner over associated-data blocks, byte path", ops=("IMAD.WIDE.U32", "LDG.E.U8")),
                    InnerLoop(f"table groups of aligned full ciphertext blocks: {GROUP_BLOCKS} 128-bit loads, one "
                              f"product with H^{GROUP_BLOCKS}, {32 * (GROUP_BLOCKS - 1)} table lookups per trip",
                              trips=DEFAULT_CHUNK_BLOCKS // GROUP_BLOCKS, ops=("IMAD.WIDE.U32", "LDG.E.128", "LDS.128")),
                    InnerLoop("Horner over the other aligned full ciphertext blocks (fewer than a group)",
                              ops=("IMAD.WIDE.U32", "LDG.E.128")),
                    InnerLoop("Horner over ciphertext blocks, byte path (unaligned field, partial last block)",
                              ops=("IMAD.WIDE.U32", "LDG.E.U8")),
                ),
                note=f"one key, level 0: one thread = one chunk of L = {DEFAULT_CHUNK_BLOCKS} ciphertext "
                     f"blocks, {DEFAULT_CHUNK_BLOCKS // GROUP_BLOCKS} groups of {GROUP_BLOCKS}, and its share of the "
                     "table copy"),
    ReportEntry("ghash_blocks_mixed_keys", _ghash_blocks_mixed_keys, _MIXED_SIG, 16 * DEFAULT_CHUNK_BLOCKS,
                inner_loops=(
                    InnerLoop("find_segment: binary search over the message table"),
                    InnerLoop("next_key: log2(L) squarings, once per message"),
                    InnerLoop("Horner over aligned full associated-data blocks (none in a ciphertext chunk)",
                              ops=("IMAD.WIDE.U32", "LDG.E.128")),
                    InnerLoop("Horner over associated-data blocks, byte path", ops=("IMAD.WIDE.U32", "LDG.E.U8")),
                    InnerLoop("Horner over aligned full ciphertext blocks: one 128-bit load per trip",
                              trips=DEFAULT_CHUNK_BLOCKS, ops=("IMAD.WIDE.U32", "LDG.E.128")),
                    InnerLoop("Horner over ciphertext blocks, byte path (unaligned field, partial last block)",
                              ops=("IMAD.WIDE.U32", "LDG.E.U8")),
                ),
                note=f"any mix of keys, level 0: one iteration = one chunk of L = {DEFAULT_CHUNK_BLOCKS} "
                     "ciphertext blocks, Horner with H (one product per block)"),
    ReportEntry("ghash_key_tables", _ghash_key_tables, _TABLES_SIG, 256,
                inner_loops=(
                    InnerLoop("next_key: log2(L) squarings (the schedules' unit only)", ops=("LOP3",)),
                    InnerLoop("H^e: e - 1 products (0, 1 or 2: 1 on average over the rows)", trips=1,
                              ops=("IMAD.WIDE.U32",)),
                    InnerLoop("the 16 entries of the row", trips=16, ops=("STG",)),
                ),
                note="one-key set-up, once per call (97 threads): one iteration = one table row "
                     "(16 entries, 256 B)"),
    ReportEntry("ghash_combine", _ghash_combine, _COMBINE_SIG, 16 * DEFAULT_CHUNK_BLOCKS,
                inner_loops=(
                    InnerLoop("find_segment: binary search over the message table"),
                    InnerLoop("next_key: log2(L) squarings, once per message"),
                    InnerLoop("Horner over partials: the first is loaded before the loop",
                              trips=DEFAULT_CHUNK_BLOCKS - 1, ops=("IMAD.WIDE.U32",)),
                ),
                note=f"levels >= 1: one iteration = {DEFAULT_CHUNK_BLOCKS} partials of 16 bytes, Horner with "
                     "H^(L^k) (~1/L of level 0's work)", launch_bounds=COMBINE_LAUNCH_BOUNDS),
]


# --------------------------------------------------------------------------- host side


@dataclass(frozen=True)
class GhashTable:
    """Message table for :func:`ghash_aead_tags` (built by :func:`pack_messages`).

    ``messages``: ``uint64[n, 4]`` rows (aad_off, aad_len, ct_off, ct_len);
    ``unit_start``: ``uint64[levels, n + 1]`` prefix sums of units per level;
    ``units_total``: host ints, units per level; ``chunk_blocks``: L.
    The arrays are NumPy (host) or device arrays (after :meth:`to_device`).
    """

    messages: object
    unit_start: object
    units_total: tuple
    chunk_blocks: int

    @property
    def levels(self) -> int:
        return len(self.units_total)

    def to_device(self, stream=0) -> "GhashTable":
        """A copy whose arrays live on the device (queued on ``stream``)."""
        return GhashTable(_on_device(self.messages, stream), _on_device(self.unit_start, stream),
                          self.units_total, self.chunk_blocks)


def _on_device(arr, stream):
    if isinstance(arr, np.ndarray):  # host array (device arrays, and the simulator's, are not ndarrays)
        return cuda.to_device(np.ascontiguousarray(arr), stream=stream)
    return arr


def pack_messages(aad_offsets, aad_lengths, ct_offsets, ct_lengths, *,
                  chunk_blocks: int = DEFAULT_CHUNK_BLOCKS) -> GhashTable:
    """Host-side table for ``n`` messages (NumPy, no device work).

    Each argument is a length-``n`` sequence of byte offsets/lengths into
    ``aad_buf`` / ``ct_buf``. ``chunk_blocks`` (L) is a power of two >= 2.
    """
    if chunk_blocks < 2 or chunk_blocks & (chunk_blocks - 1):
        raise ValueError("chunk_blocks must be a power of two >= 2")
    messages, units = mac_messages(aad_offsets, aad_lengths, ct_offsets, ct_lengths)  # units: blocks
    n = messages.shape[0]
    prefixes = []
    while True:
        units = (units + np.uint64(chunk_blocks - 1)) // np.uint64(chunk_blocks)
        prefixes.append(unit_prefix(units))
        if n == 0 or int(units.max()) <= 1:
            break
    unit_start = np.ascontiguousarray(np.stack(prefixes))
    if prefixes[0][-1] >= MAX_UNITS:
        raise ValueError(f"{int(prefixes[0][-1])} chunks of {chunk_blocks} blocks in one GHASH call; the kernels "
                         f"count units in 32 bits (at most {MAX_UNITS - 1}): split the batch")
    return GhashTable(messages, unit_start, tuple(int(p[-1]) for p in prefixes), chunk_blocks)


@dataclass(frozen=True)
class GhashScratch:
    """Device scratch for one :func:`ghash_aead_tags` call (reusable for tables no larger)."""

    partials: tuple  # two uint32[units, 4] device arrays (ping-pong between levels)
    keys: tuple      # two uint32[n, 4] device arrays
    tables: object = None  # uint32[KEY_TABLE_WORDS] (one-key calls only; allocated there if None)


def ghash_scratch(table: GhashTable, n_messages: int, stream=0, *, one_key: bool = False) -> GhashScratch:
    """Allocate the scratch :func:`ghash_aead_tags` needs for ``table``."""
    sizes = list(table.units_total[:2]) + [1, 1]
    partials = tuple(cuda.device_array((max(1, sizes[i]), 4), dtype=np.uint32, stream=stream)
                     for i in range(2))
    keys = tuple(cuda.device_array((max(1, n_messages), 4), dtype=np.uint32, stream=stream)
                 for _ in range(2))
    tables = cuda.device_array(KEY_TABLE_WORDS, dtype=np.uint32, stream=stream) if one_key else None
    return GhashScratch(partials, keys, tables)


def ghash_aead_tags(aad_buf, ct_buf, table, n_messages, h_blocks, ekj0_blocks, tags_out, *,
                    stream=0, scratch=None, one_key=False):
    """Queue on ``stream`` the GCM tags of ``n_messages`` messages into ``tags_out``.

    aad_buf, ct_buf: 1-D uint8 device arrays with all messages' associated data
    and ciphertexts; table: a :class:`GhashTable` from :func:`pack_messages`
    (host or device arrays; host ones are copied on ``stream``); h_blocks,
    ekj0_blocks: uint8[n, 16] device arrays (H and E_K(J0) as bytes); tags_out:
    uint8[n, 16]. ``scratch``: from :func:`ghash_scratch`, allocated if None.
    Launches ``table.levels`` kernels. Checks nothing (the backend validates).

    ``one_key=True`` is the contract that every row of ``h_blocks`` is the same ``H``
    (all messages under one AES key): the fast table kernel (:func:`_ghash_blocks`) runs,
    with tables built from ``h_blocks[0]`` on the device (one more small launch); a row that
    differs gets a wrong tag. ``one_key=False`` (any mix of keys) runs
    :func:`_ghash_blocks_mixed_keys`. Both give the same tags for one key. The bytes of
    ``aad_buf``/``ct_buf`` index the tables: pass only public data (see the module docstring).
    """
    if n_messages == 0:
        return
    table = table.to_device(stream)
    if scratch is None:
        scratch = ghash_scratch(table, n_messages, stream, one_key=one_key)
    chunk = int(table.chunk_blocks)
    log2_chunk = chunk.bit_length() - 1
    last = table.levels - 1
    for level in range(table.levels):
        units = table.units_total[level]
        out = scratch.partials[level % 2]
        key_out = scratch.keys[level % 2]
        if level == 0 and one_key:
            tables = scratch.tables
            if tables is None:
                tables = cuda.device_array(KEY_TABLE_WORDS, dtype=np.uint32, stream=stream)
            launch(ghash_key_tables, KEY_TABLE_UNITS, (h_blocks, log2_chunk, tables), stream)
            launch(ghash_blocks, units,
                   (aad_buf, ct_buf, table.messages, table.unit_start[0], n_messages, tables,
                    chunk, out, key_out, ekj0_blocks, tags_out, level == last), stream, grid_stride=False)
        elif level == 0:
            launch(ghash_blocks_mixed_keys, units,
                   (aad_buf, ct_buf, table.messages, table.unit_start[0], n_messages, h_blocks,
                    chunk, log2_chunk, out, key_out, ekj0_blocks, tags_out, level == last), stream)
        else:
            launch(ghash_combine, units,
                   (scratch.partials[(level - 1) % 2], table.unit_start[level - 1], out,
                    table.unit_start[level], n_messages, scratch.keys[(level - 1) % 2], key_out,
                    chunk, log2_chunk, ekj0_blocks, tags_out, level == last), stream)
