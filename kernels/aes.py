"""AES-CTR keystream XOR (FIPS 197, NIST SP 800-38A) over a table of segments, in one launch.

What it computes
----------------
For every segment ``s`` of the table, ``dst[dst_off + i] = src[src_off + i] ^
keystream[position + i]`` for ``0 <= i < length``, where keystream block ``b`` is
``AES_K(counter_block + b)`` and ``+`` is one of two counter rules, chosen per
segment:

* ``inc32=False``: the full 128-bit big-endian increment of SP 800-38A, carrying
  across all 128 bits and wrapping mod ``2**128`` (what ``cryptography``'s
  ``modes.CTR`` / OpenSSL do);
* ``inc32=True``: GCM's ``inc32`` (SP 800-38D): only the low 32 bits count,
  mod ``2**32``; the upper 96 bits never change.

AES-128/192/256 are supported; all keys of one launch share one round count
(10/12/14). ``src`` and ``dst`` may be the same array (in place); within one
segment the source and destination ranges must be either identical or
disjoint, and segments must not write over each other's input (they run in
parallel). A segment whose source is a zero buffer yields the raw keystream:
that is how AES-GCM obtains ``H = E_K(0^128)`` and ``E_K(J0)`` (a 16-byte
segment with ``counter_block = 0`` or ``J0`` and ``position = 0``).

Counter limits (enforced by the backend, before a launch)
---------------------------------------------------------
The kernel checks nothing. It computes block ``b`` of a segment from
``counter_block`` advanced by ``position // 16 + b`` under the segment's rule:

* full 128-bit rule: no limit; the counter wraps mod ``2**128`` as OpenSSL's does
  (a segment may cross the 64-bit and 96-bit word boundaries; the carry is exact).
* inc32: the low word wraps mod ``2**32`` *silently*. A segment that crosses
  the wrap therefore reuses keystream. GCM must refuse plaintexts over
  ``2**32 - 2`` blocks (SP 800-38D); that refusal is the caller's.
* positions and lengths are uint64 bytes; ``position + length`` must not pass
  ``2**64``.

Memory layout
-------------
* ``src``, ``dst``: 1-D ``uint8`` device arrays (C-contiguous).
* ``round_keys``: ``uint32[n_keys, 60]`` from :func:`expand_key`: the
  ``4 * (rounds + 1)`` round-key words of FIPS 197 (big-endian words, ``w[0..3]``
  is the first round key), zero-padded to 60 words. Rows are 240 bytes, so every
  round key is 16-byte aligned and is read with one 128-bit load.
* ``table``: ``uint64[n_segments, TABLE_COLUMNS]`` from :func:`pack_segments`;
  column names are the ``COL_*`` constants. ``COL_CTR_HI``/``COL_CTR_LO`` hold the
  counter block of the segment's *first* keystream block (``position // 16``
  already added on the host under the segment's rule), as two big-endian 64-bit
  halves (``w0 << 32 | w1`` and ``w2 << 32 | w3``).
* ``unit_start``: ``uint64[n_segments + 1]``, exclusive prefix sum of work units
  per segment; a unit is ``BLOCKS_PER_UNIT`` consecutive 16-byte keystream blocks
  of one segment (the last unit of a segment may be partial).

Design (why this is the fast choice on Hopper)
----------------------------------------------
Hopper has no AES instructions, so AES is table lookups and integer ALU work,
and it is compute-bound (about 0.4-0.7 TB/s against 1.5 TB/s of in-place HBM
bandwidth). The options:

* *Bitsliced AES* is constant-time but needs 128+ live state registers per
  thread plus an input/output transposition; in numba that means spills.
* *Four T-tables (4 KiB) in shared memory*, the textbook GPU AES: 32 lanes
  reading random entries collide on the 32 shared-memory banks (on average a
  3-4 way conflict per lookup), which makes the lookups, not the ALU, the limit.
* *One T-table replicated per lane* (Tezcan, "Optimized GPU implementations of
  AES", 2021), chosen here: ``T0`` (256 words) is stored 32 times, interleaved
  so that entry ``x`` of lane ``l`` is word ``x * 32 + l``; lane ``l`` then
  always reads bank ``l`` and every lookup is one conflict-free ``LDS`` (one
  shared-memory wavefront). ``T1..T3`` are ``T0`` rotated by 8/16/24 bits (one
  ``SHF``/``PRMT`` each), and the last round's S-box is a byte of ``T0``, so 32
  KiB of static shared memory (under the 48 KiB static limit) holds everything.
  The index ``x * 32 + l`` is one shift and one ``LOP3`` (mask-or) per lookup.

Per 16-byte block and round: 16 ``LDS``, about 32 address ops, 12 rotates and 8
three-input XORs. Each thread runs ``BLOCKS_PER_UNIT`` (2) blocks interleaved,
which gives the scheduler two independent dependency chains and halves the
round-key loads (one 128-bit ``LDG``, L1-resident, per round per unit). Round
keys are read from global memory rather than staged in shared memory because
segments of one launch may use different keys. Keystream is produced in
little-endian words (the last round assembles bytes in that order), so aligned
data is XORed with 128-bit loads and stores (``LDG.E.128``/``STG.E.128``);
unaligned buffers and the partial first/last block of a segment take a byte
loop. Zero local memory (no local arrays; checked with ``ptxas -v``, see
``KERNEL_REPORT``). Launch geometry: grid-stride loop; the grid is capped at the
blocks that are resident at once (the 32 KiB table limits an SM to 6 blocks),
so no second wave of blocks starts late.

Side channels: not constant-time
--------------------------------
Table lookups at secret-dependent indices are not constant-time in general.
The per-lane layout removes the known GPU AES timing channel, shared-memory bank
conflicts that depend on the data (Jiang, Fei, Kaeli 2016 recovered AES keys from
them), because a lane only ever touches its own bank. It is still a table
implementation: do not rely on it where an attacker can run code on the same GPU
at the same time (shared cloud GPUs, MPS/MIG neighbours, untrusted kernels) and
observe fine timing or power; there, use the CPU backend (AES-NI, constant-time).

The 128-bit loads and stores come from :mod:`kernels._vector_io` (shared with
ChaCha20), which swaps in simulator twins with the same contract; the shared
T-table access below has its own twins, chosen once at import.
"""
from __future__ import annotations

import numpy as np
from numba import cuda, uint8, uint32, uint64, int64

from ._compile import device_function, kernel
from ._launch import (WARP_LANES, InnerLoop, ReportEntry, find_segment, is_simulator, launch,
                      unit_prefix)
from ._vector_io import address_of, bswap32, load_u32x4, store_u32x4

#: Bytes per AES block.
BLOCK_BYTES = 16

#: Keystream blocks one thread computes per loop iteration (one work unit).
BLOCKS_PER_UNIT = 2

#: Bytes of keystream per work unit.
UNIT_BYTES = BLOCK_BYTES * BLOCKS_PER_UNIT

#: Words per row of ``round_keys`` (AES-256 needs 4 * 15 = 60).
ROUND_KEY_WORDS = 60

#: Round count by key length in bytes.
ROUNDS_FOR_KEY_BYTES = {16: 10, 24: 12, 32: 14}

# Columns of the uint64 segment table.
COL_SRC = 0        # byte offset of the segment in src
COL_DST = 1        # byte offset of the segment in dst
COL_LENGTH = 2     # bytes
COL_HEAD = 3       # position & 15: keystream bytes of the first block that the segment skips
COL_KEY = 4        # row of `round_keys`
COL_INC32 = 5      # 1: GCM inc32 rule, 0: full 128-bit increment
COL_CTR_HI = 6     # counter block of the first keystream block, words 0..1: w0 << 32 | w1
COL_CTR_LO = 7     # words 2..3: w2 << 32 | w3
TABLE_COLUMNS = 8  # one 64-byte row per segment

#: Lanes per warp (= shared-memory banks); the shared T-table holds one copy per lane,
#: whatever the block size: thread ``t`` uses copy ``t % _LANES``.
_LANES = WARP_LANES

#: Entry ``e`` of lane ``l`` is word ``(e << _LANE_BITS) + l``, at byte ``e << _ENTRY_SHIFT``
#: from the lane's copy of entry 0.
_LANE_BITS = _LANES.bit_length() - 1
_ENTRY_SHIFT = _LANE_BITS + 2

#: Words of the replicated shared T-table: 256 entries x 32 lanes (32 KiB).
_SHARED_TABLE_WORDS = 256 * _LANES


# --------------------------------------------------------------------------- tables (host)

def _xtime(a: int) -> int:
    """Multiply by x in GF(2^8) modulo the AES polynomial x^8 + x^4 + x^3 + x + 1."""
    a <<= 1
    return (a ^ 0x11B) if a & 0x100 else a


def _sbox() -> np.ndarray:
    """The AES S-box (FIPS 197, 5.1.1) computed from its definition: inverse in GF(2^8), then the affine map."""
    exp = [0] * 255
    log = [0] * 256
    x = 1
    for i in range(255):  # 3 generates the multiplicative group
        exp[i] = x
        log[x] = i
        x ^= _xtime(x)
    box = np.zeros(256, dtype=np.uint8)
    for a in range(256):
        inv = 0 if a == 0 else exp[(255 - log[a]) % 255]
        b = inv
        for shift in (1, 2, 3, 4):
            b ^= ((inv << shift) | (inv >> (8 - shift))) & 0xFF
        box[a] = b ^ 0x63
    return box


SBOX = _sbox()


def _t0() -> np.ndarray:
    """``T0[x] = (2*S[x], S[x], S[x], 3*S[x])`` as a big-endian word (SubBytes + MixColumns column)."""
    s = SBOX.astype(np.uint32)
    s2 = np.array([_xtime(int(v)) for v in SBOX], dtype=np.uint32)
    s3 = s2 ^ s
    return ((s2 << 24) | (s << 16) | (s << 8) | s3).astype(np.uint32)


#: T0 in constant memory; the kernel copies it into the per-lane shared table.
T0 = _t0()


def expand_key(key: bytes) -> tuple[np.ndarray, int]:
    """FIPS 197 key expansion on the host.

    Returns ``(words, rounds)``: ``uint32[ROUND_KEY_WORDS]``, the ``4 * (rounds + 1)``
    round-key words as big-endian words, zero-padded to 60; and ``rounds`` (10, 12
    or 14 for 16-, 24- or 32-byte keys). Raises ``ValueError`` for other lengths
    (a programming error below the public layer).
    """
    key = bytes(key)
    if len(key) not in ROUNDS_FOR_KEY_BYTES:
        raise ValueError("AES key must be 16, 24 or 32 bytes")
    rounds = ROUNDS_FOR_KEY_BYTES[len(key)]
    nk = len(key) // 4
    total = 4 * (rounds + 1)
    w = [int.from_bytes(key[4 * i:4 * i + 4], "big") for i in range(nk)]
    rcon = 1
    for i in range(nk, total):
        t = w[i - 1]
        if i % nk == 0:
            t = ((t << 8) | (t >> 24)) & 0xFFFFFFFF  # RotWord
            t = _sub_word(t) ^ (rcon << 24)
            rcon = _xtime(rcon)
        elif nk > 6 and i % nk == 4:
            t = _sub_word(t)
        w.append(w[i - nk] ^ t)
    out = np.zeros(ROUND_KEY_WORDS, dtype=np.uint32)
    out[:total] = w
    return out, rounds


def _sub_word(t: int) -> int:
    return int.from_bytes(bytes(int(SBOX[b]) for b in t.to_bytes(4, "big")), "big")


def counter_block_words(block: bytes) -> np.ndarray:
    """A 16-byte counter block as ``uint32[4]`` big-endian words (the layout of ``counter_blocks``)."""
    if len(block) != 16:
        raise ValueError("AES counter block must be 16 bytes")
    return np.frombuffer(bytes(block), dtype=">u4").astype(np.uint32)


def pack_segments(src_offsets, dst_offsets, lengths, key_indices, counter_blocks, positions, *, inc32):
    """Build the segment table for :func:`aes_ctr_xor` (host side, NumPy only).

    Arguments are sequences of length ``n`` (one entry per segment):
    ``src_offsets``, ``dst_offsets``, ``lengths``: bytes; ``key_indices``: row of
    ``round_keys``; ``counter_blocks``: ``uint32[n, 4]``, the initial 16-byte
    counter block as 4 big-endian words; ``positions``: uint64 keystream byte
    position of each segment's first byte (``block_index * 16 + offset``);
    ``inc32``: a bool for all segments, or a sequence of ``n`` bools.

    Returns ``(table, unit_start)``: ``uint64[n, TABLE_COLUMNS]`` and ``uint64[n + 1]``
    (``_launch.unit_prefix`` of ``BLOCKS_PER_UNIT``-block units per segment), ready to
    copy to the device. Counter limits are the backend's (see the module docstring).
    """
    src_offsets = np.asarray(src_offsets, dtype=np.uint64).reshape(-1)
    n = src_offsets.shape[0]
    dst_offsets = np.asarray(dst_offsets, dtype=np.uint64).reshape(n)
    lengths = np.asarray(lengths, dtype=np.uint64).reshape(n)
    key_indices = np.asarray(key_indices, dtype=np.uint64).reshape(n)
    words = np.asarray(counter_blocks, dtype=np.uint32).reshape(n, 4).astype(np.uint64)
    positions = np.asarray(positions, dtype=np.uint64).reshape(n)
    inc32_mask = np.broadcast_to(np.asarray(inc32, dtype=bool), (n,))

    head = positions & np.uint64(BLOCK_BYTES - 1)
    first_block = positions >> np.uint64(4)
    hi = (words[:, 0] << np.uint64(32)) | words[:, 1]
    lo = (words[:, 2] << np.uint64(32)) | words[:, 3]
    with np.errstate(over="ignore"):  # both rules wrap by design
        # full 128-bit increment: add to the low half, carry into the high half
        lo_full = lo + first_block
        hi_full = hi + (lo_full < first_block).astype(np.uint64)
        # inc32: only word 3 counts, mod 2**32
        w3_inc = (words[:, 3] + (first_block & np.uint64(0xFFFFFFFF))) & np.uint64(0xFFFFFFFF)
    lo_inc = (words[:, 2] << np.uint64(32)) | w3_inc

    table = np.zeros((n, TABLE_COLUMNS), dtype=np.uint64)
    table[:, COL_SRC] = src_offsets
    table[:, COL_DST] = dst_offsets
    table[:, COL_LENGTH] = lengths
    table[:, COL_HEAD] = head
    table[:, COL_KEY] = key_indices
    table[:, COL_INC32] = inc32_mask.astype(np.uint64)
    table[:, COL_CTR_HI] = np.where(inc32_mask, hi, hi_full)
    table[:, COL_CTR_LO] = np.where(inc32_mask, lo_inc, lo_full)

    blocks = (head + lengths + np.uint64(BLOCK_BYTES - 1)) // np.uint64(BLOCK_BYTES)
    blocks[lengths == 0] = 0
    units = (blocks + np.uint64(BLOCKS_PER_UNIT - 1)) // np.uint64(BLOCKS_PER_UNIT)
    return table, unit_prefix(units)


# --------------------------------------------------------------------------- 128-bit global I/O

@device_function
def load_round_key(round_keys, key, r):
    """Words ``4r .. 4r+3`` of row ``key`` of ``round_keys`` (C-contiguous
    ``uint32[n, ROUND_KEY_WORDS]``): one 128-bit load (rows are 240 bytes, so aligned)."""
    return load_u32x4(round_keys, int64(key) * int64(ROUND_KEY_WORDS) + int64(r) * int64(4))


# --------------------------------------------------------------------------- AES core (device)

@device_function
def _rotr(x, n):
    """32-bit rotate right by the constant ``n`` (one SHF.R.W or PRMT)."""
    return uint32((uint32(x) >> uint32(n)) | (uint32(x) << uint32(32 - n)))


# --------------------------------------------------------------------------- shared T-table access

def _make_shared_table_intrinsics():
    """Shared-memory access by 32-bit byte address (what ``LDS`` takes).

    ``table_base(tab)``: the shared-window address of ``tab[0]`` as uint32.
    ``lds_u32(tab, addr)`` / ``lds_u8(tab, addr)``: the word / byte at shared
    address ``addr`` (``tab`` only ties the load to the table for the simulator).
    Numba's own indexing widens every index to 64 bits and rebuilds the address
    with ``mul.wide`` + 64-bit add, which costs two extra instructions per
    lookup; with a 32-bit byte address the lookup is one mask and one
    shift-add (``LOP3`` + ``LEA.HI``) in front of the ``LDS``. The loads are
    marked as having side effects so that LLVM keeps them after the barrier
    that publishes the table (ptxas still schedules them as loads).
    """
    from llvmlite import ir
    from numba import types
    from numba.cuda.extending import intrinsic

    i32 = ir.IntType(32)

    @intrinsic
    def table_base(typingctx, tab):
        def codegen(context, builder, sig, args):
            ary = context.make_array(sig.args[0])(context, builder, value=args[0])
            shared_ptr = builder.addrspacecast(ary.data, ir.IntType(8).as_pointer(3))
            return builder.ptrtoint(shared_ptr, i32)

        return types.uint32(tab), codegen

    def make_load(ptx_type):
        @intrinsic
        def load(typingctx, tab, addr):
            def codegen(context, builder, sig, args):
                address = context.cast(builder, args[1], sig.args[1], types.uint32)
                asm = ir.InlineAsm(ir.FunctionType(i32, [i32]), f"ld.shared.{ptx_type} $0, [$1];",
                                   "=r,r", side_effect=True)
                return builder.call(asm, [address])

            return types.uint32(tab, addr), codegen

        return load

    return table_base, make_load("u32"), make_load("u8")


def _make_shared_table_simulator():
    """Simulator twins: the table is its own address space, starting at 0."""

    @cuda.jit(device=True)
    def table_base(tab):
        return uint32(0)

    @cuda.jit(device=True)
    def lds_u32(tab, addr):
        return uint32(tab[uint32(addr) >> uint32(2)])

    @cuda.jit(device=True)
    def lds_u8(tab, addr):
        a = uint32(addr)
        return uint32(tab[a >> uint32(2)] >> ((a & uint32(3)) * uint32(8))) & uint32(0xFF)

    return table_base, lds_u32, lds_u8


#: The one place where the simulator twins of the shared-table access are chosen.
table_base, lds_u32, lds_u8 = _make_shared_table_simulator() if is_simulator() else _make_shared_table_intrinsics()


# T0 lookups of byte 3 (most significant) .. byte 0 of ``x`` in the per-lane table.
# Entry e of lane l is word e * 32 + l, i.e. byte address base + e * 128 + l * 4;
# ``lb`` is this lane's ``base + l * 4``, so the address is (byte << 7) + lb
# (32 = _LANES, 7 = _ENTRY_SHIFT).
@device_function
def _a3(x, lb):
    return uint32(((uint32(x) & uint32(0xFF000000)) >> uint32(24 - _ENTRY_SHIFT)) + uint32(lb))


@device_function
def _a2(x, lb):
    return uint32(((uint32(x) & uint32(0xFF0000)) >> uint32(16 - _ENTRY_SHIFT)) + uint32(lb))


@device_function
def _a1(x, lb):
    return uint32(((uint32(x) & uint32(0xFF00)) >> uint32(8 - _ENTRY_SHIFT)) + uint32(lb))


@device_function
def _a0(x, lb):
    return uint32((uint32(x) & uint32(0xFF)) * uint32(1 << _ENTRY_SHIFT) + uint32(lb))


@device_function
def _t_b3(tab, lb, x):
    return lds_u32(tab, _a3(x, lb))


@device_function
def _t_b2(tab, lb, x):
    return lds_u32(tab, _a2(x, lb))


@device_function
def _t_b1(tab, lb, x):
    return lds_u32(tab, _a1(x, lb))


@device_function
def _t_b0(tab, lb, x):
    return lds_u32(tab, _a0(x, lb))


@device_function
def _round(tab, lb, s0, s1, s2, s3, k0, k1, k2, k3):
    """One full AES round (SubBytes, ShiftRows, MixColumns, AddRoundKey) on big-endian column words.

    ``T1..T3`` are ``T0`` rotated right by 8, 16, 24 bits.
    """
    t0 = _t_b3(tab, lb, s0) ^ _rotr(_t_b2(tab, lb, s1), 8) ^ _rotr(_t_b1(tab, lb, s2), 16) \
        ^ _rotr(_t_b0(tab, lb, s3), 24) ^ uint32(k0)
    t1 = _t_b3(tab, lb, s1) ^ _rotr(_t_b2(tab, lb, s2), 8) ^ _rotr(_t_b1(tab, lb, s3), 16) \
        ^ _rotr(_t_b0(tab, lb, s0), 24) ^ uint32(k1)
    t2 = _t_b3(tab, lb, s2) ^ _rotr(_t_b2(tab, lb, s3), 8) ^ _rotr(_t_b1(tab, lb, s0), 16) \
        ^ _rotr(_t_b0(tab, lb, s1), 24) ^ uint32(k2)
    t3 = _t_b3(tab, lb, s3) ^ _rotr(_t_b2(tab, lb, s0), 8) ^ _rotr(_t_b1(tab, lb, s1), 16) \
        ^ _rotr(_t_b0(tab, lb, s2), 24) ^ uint32(k3)
    return uint32(t0), uint32(t1), uint32(t2), uint32(t3)


@device_function
def _final_word_le(tab, lb, a, b, c, d):
    """``S[a>>24] | S[b>>16 & ff] << 8 | S[c>>8 & ff] << 16 | S[d & ff] << 24``.

    The last round (no MixColumns) for one output column, assembled in
    little-endian byte order so it can be XORed with data loaded as LE words.
    ``S[x]`` is byte 1 of ``T0[x]`` (byte address + 1 on a little-endian GPU).
    """
    return uint32(lds_u8(tab, _a3(a, lb) + uint32(1))
                  | (lds_u8(tab, _a2(b, lb) + uint32(1)) << uint32(8))
                  | (lds_u8(tab, _a1(c, lb) + uint32(1)) << uint32(16))
                  | (lds_u8(tab, _a0(d, lb) + uint32(1)) << uint32(24)))


@device_function
def _counter_words(ctr_hi, ctr_lo, inc32, block):
    """Counter block ``block`` blocks after (ctr_hi, ctr_lo), as 4 big-endian words."""
    if inc32:
        w3 = uint32(uint32(ctr_lo & uint64(0xFFFFFFFF)) + uint32(block & uint64(0xFFFFFFFF)))
        return (uint32(ctr_hi >> uint64(32)), uint32(ctr_hi & uint64(0xFFFFFFFF)),
                uint32(ctr_lo >> uint64(32)), w3)
    lo = uint64(ctr_lo + block)
    hi = uint64(ctr_hi + uint64(1)) if lo < block else uint64(ctr_hi)
    return (uint32(hi >> uint64(32)), uint32(hi & uint64(0xFFFFFFFF)),
            uint32(lo >> uint64(32)), uint32(lo & uint64(0xFFFFFFFF)))


@device_function
def _pick(w0, w1, w2, w3, k):
    """Keystream byte ``k`` (0..15) of a block held as 4 little-endian words."""
    q = k >> uint32(2)
    w = w0 if q == uint32(0) else (w1 if q == uint32(1) else (w2 if q == uint32(2) else w3))
    return uint32((uint32(w) >> ((k & uint32(3)) * uint32(8))) & uint32(0xFF))


@device_function
def _xor_block(src, dst, src_off, dst_off, head, length, block, w0, w1, w2, w3):
    """XOR keystream block ``block`` (LE words w0..w3) into the segment bytes it covers.

    The block covers keystream offsets ``[16*block, 16*block + 16)`` of the segment's
    block-aligned keystream; the segment occupies ``[head, head + length)``.
    """
    begin = uint64(block * uint64(BLOCK_BYTES))
    end = uint64(begin + uint64(BLOCK_BYTES))
    seg_end = uint64(head + length)
    lo = begin if begin > head else head
    hi = end if end < seg_end else seg_end
    if lo >= hi:
        return
    s = uint64(src_off + lo - head)
    d = uint64(dst_off + lo - head)
    full = lo == begin and hi == end
    if full and ((address_of(src, s) | address_of(dst, d)) & uint64(15)) == uint64(0):
        a, b, c, e = load_u32x4(src, s)
        store_u32x4(dst, d, uint32(a ^ w0), uint32(b ^ w1), uint32(c ^ w2), uint32(e ^ w3))
    else:
        for i in range(int64(lo), int64(hi)):
            k = uint32(uint64(i) - begin)
            j = uint64(uint64(i) - lo)
            dst[d + j] = uint8(uint32(src[s + j]) ^ _pick(w0, w1, w2, w3, k))


# --------------------------------------------------------------------------- kernel

def _aes_ctr_xor_kernel(src, dst, round_keys, n_rounds, table, unit_start, n_segments):
    """Grid-stride loop over units of ``BLOCKS_PER_UNIT`` keystream blocks of the segment table.

    Any block size works (each thread uses the table copy of lane ``tid % _LANES``).
    """
    tab = cuda.shared.array(_SHARED_TABLE_WORDS, dtype=np.uint32)
    tid = cuda.threadIdx.x
    for i in range(tid, _SHARED_TABLE_WORDS, cuda.blockDim.x):
        tab[i] = T0[i >> _LANE_BITS]
    cuda.syncthreads()
    # this lane's copy of entry 0: table base + lane * 4 bytes
    lane_base = uint32(table_base(tab) + (uint32(tid) & uint32(_LANES - 1)) * uint32(4))

    total = uint64(unit_start[n_segments])
    unit = uint64(cuda.blockIdx.x) * uint64(cuda.blockDim.x) + uint64(tid)
    stride = uint64(cuda.gridDim.x) * uint64(cuda.blockDim.x)
    seg = int64(0)
    while unit < total:
        # Units grow along the loop: search only when we left the current segment.
        if not (uint64(unit_start[seg]) <= unit and unit < uint64(unit_start[seg + 1])):
            seg = find_segment(unit_start, n_segments, unit)
        block0 = uint64(unit - uint64(unit_start[seg])) * uint64(BLOCKS_PER_UNIT)
        block1 = uint64(block0 + uint64(1))
        key = int64(table[seg, COL_KEY])
        ctr_hi = uint64(table[seg, COL_CTR_HI])
        ctr_lo = uint64(table[seg, COL_CTR_LO])
        inc32 = uint64(table[seg, COL_INC32]) != uint64(0)

        k0, k1, k2, k3 = load_round_key(round_keys, key, 0)
        a0, a1, a2, a3 = _counter_words(ctr_hi, ctr_lo, inc32, block0)
        b0, b1, b2, b3 = _counter_words(ctr_hi, ctr_lo, inc32, block1)
        a0 = uint32(a0 ^ k0)
        a1 = uint32(a1 ^ k1)
        a2 = uint32(a2 ^ k2)
        a3 = uint32(a3 ^ k3)
        b0 = uint32(b0 ^ k0)
        b1 = uint32(b1 ^ k1)
        b2 = uint32(b2 ^ k2)
        b3 = uint32(b3 ^ k3)
        for r in range(1, n_rounds):
            k0, k1, k2, k3 = load_round_key(round_keys, key, r)
            a0, a1, a2, a3 = _round(tab, lane_base, a0, a1, a2, a3, k0, k1, k2, k3)
            b0, b1, b2, b3 = _round(tab, lane_base, b0, b1, b2, b3, k0, k1, k2, k3)
        k0, k1, k2, k3 = load_round_key(round_keys, key, n_rounds)
        k0 = bswap32(k0)
        k1 = bswap32(k1)
        k2 = bswap32(k2)
        k3 = bswap32(k3)
        x0 = uint32(_final_word_le(tab, lane_base, a0, a1, a2, a3) ^ k0)
        x1 = uint32(_final_word_le(tab, lane_base, a1, a2, a3, a0) ^ k1)
        x2 = uint32(_final_word_le(tab, lane_base, a2, a3, a0, a1) ^ k2)
        x3 = uint32(_final_word_le(tab, lane_base, a3, a0, a1, a2) ^ k3)
        y0 = uint32(_final_word_le(tab, lane_base, b0, b1, b2, b3) ^ k0)
        y1 = uint32(_final_word_le(tab, lane_base, b1, b2, b3, b0) ^ k1)
        y2 = uint32(_final_word_le(tab, lane_base, b2, b3, b0, b1) ^ k2)
        y3 = uint32(_final_word_le(tab, lane_base, b3, b0, b1, b2) ^ k3)

        src_off = uint64(table[seg, COL_SRC])
        dst_off = uint64(table[seg, COL_DST])
        length = uint64(table[seg, COL_LENGTH])
        head = uint64(table[seg, COL_HEAD])
        _xor_block(src, dst, src_off, dst_off, head, length, block0, x0, x1, x2, x3)
        _xor_block(src, dst, src_off, dst_off, head, length, block1, y0, y1, y2, y3)
        unit += stride


_SIGNATURE = "void(uint8[::1], uint8[::1], uint32[:, ::1], int64, uint64[:, ::1], uint64[::1], int64)"

# Lazy (compiled at the first launch, then cached on disk): an eager signature would
# need a device at import time, and the kernel report imports this module without one.
_kernel = kernel(_aes_ctr_xor_kernel)


def aes_ctr_xor(src, dst, round_keys, n_rounds, table, unit_start, n_segments, n_units, *, stream=0):
    """Queue the AES-CTR keystream XOR of every segment on ``stream``.

    ``src``, ``dst``: 1-D uint8 device arrays (may be the same array);
    ``round_keys``: ``uint32[n_keys, 60]`` device array of :func:`expand_key` rows,
    all with ``n_rounds`` (10/12/14) rounds; ``table``, ``unit_start``: device
    copies of :func:`pack_segments`' output; ``n_segments``: rows of the table;
    ``n_units``: ``unit_start[-1]`` as a host integer (the launch geometry needs it,
    and reading it from the device would synchronise). Checks nothing: the backend
    validates offsets, lengths and counter limits before calling.
    """
    launch(_kernel, int(n_units),
           (src, dst, round_keys, np.int64(n_rounds), table, unit_start, np.int64(n_segments)), stream)


def _report_entry(key_bytes: int) -> ReportEntry:
    rounds = ROUNDS_FOR_KEY_BYTES[key_bytes]
    return ReportEntry(
        name="aes_ctr_xor",
        variant=f"AES-{8 * key_bytes}",
        pyfunc=_aes_ctr_xor_kernel,
        signature=_SIGNATURE,
        bytes_per_iteration=UNIT_BYTES,
        data_path_ops=("STG.E.128",),  # full aligned blocks are written 16 bytes at a time
        inner_loops=(
            InnerLoop("find_segment: binary search, only when a unit leaves its segment"),
            InnerLoop(f"round loop, rounds 1..{rounds - 1} of both blocks", trips=rounds - 1, ops=("LDS", "LDG.E.128")),
            InnerLoop("byte loop of block 0 (unaligned or partial block)"),
            InnerLoop("byte loop of block 1 (unaligned or partial block)"),
        ),
        note=f"per-lane replicated T0 in shared memory (32 KiB, conflict-free), 2 blocks per thread; "
             f"{rounds} rounds: the round loop counted {rounds - 1} times",
    )


KERNEL_REPORT = [_report_entry(16), _report_entry(24), _report_entry(32)]
