"""Parallel Poly1305 for ChaCha20-Poly1305 AEAD tags (RFC 8439 §2.5, §2.8).

What is computed
----------------
For every message ``m`` of a table, the AEAD tag of RFC 8439 §2.8::

    mac_data = aad || pad16 || ct || pad16 || le64(len(aad)) || le64(len(ct))
    tag      = ((sum_i  c_i * r^(B-i+1))  mod 2^130-5  +  s)  mod 2^128

where ``c_1 .. c_B`` are the 16-byte blocks of ``mac_data`` read as little-endian
numbers plus 2^128 (every block of ``mac_data`` is full, so the pad bit is always
set), and ``r || s`` is the message's 32-byte one-time key (``r`` clamped).

Parallel evaluation
-------------------
Poly1305 is the evaluation of a polynomial at ``r``. Leading zero coefficients
do not change a polynomial, so each message's block sequence is conceptually
*left-padded with zero blocks* to a whole number of spans; the padded positions
are never loaded. This puts the one short span at the front, so every span ends
at a multiple of the span length and all spans combine with the same power.

1. ``poly1305_powers`` (one thread per (message, power)): from the clamped ``r``
   it computes ``r^1 .. r^W`` and, per combine level ``l >= 1``,
   ``rho_l = r^(W * L * G^(l-1))``.  W = ``TILE_LANES`` = 32, L = chunk blocks
   per lane, G = combine width (both powers of two, chosen in ``pack_messages``).
2. ``poly1305_aead_partial`` (the streaming kernel, reads the data once): a
   *tile* of W = 32 consecutive threads evaluates one span of W*L blocks.  In
   step j lane t reads block ``j*W + t`` of the span, so each step of a tile is
   one contiguous 512-byte read (coalesced).  Lane t runs Horner with
   ``R = r^W``: ``h_t = sum_j c_(jW+t) * R^(L-1-j)``; then
   ``span value = sum_t h_t * r^(W-t)``: one multiply per lane by its own power
   and a plain field *sum* over the tile (shared memory tree, ``syncthreads``;
   no warp intrinsics, so the simulator runs it).  A message with a single span
   is finished right there (tag written); otherwise the span value is stored.
3. ``poly1305_combine`` (levels 1, 2, ...; one launch per level, zero launches when
   every message fits one span): the span values V_0 .. V_(S-1) of a message
   form a polynomial in ``rho_1 = r^(W*L)`` (left-padded the same way); each thread
   runs Horner with ``rho_l`` over G consecutive values.  The level whose thread
   sees a single group for its message adds ``s`` and writes the tag.

Launches per call: 2 + levels, where levels = ceil(log_G(max spans per message)),
independent of the number of messages (every kernel walks a message table with
prefix sums and ``find_segment``).  With the defaults (L = 64, G = 64) a span is
32 KiB: messages whose MAC data (AAD and ciphertext, each padded to 16 bytes, plus
the 16-byte length block) fit 32 KiB need no combine launch, and 1 GiB needs 3.

Field arithmetic
----------------
Radix 2^26: five limbs in ``uint32``, products as ``uint64`` (``mul.wide.u32``),
like poly1305-donna-32.  Sums of up to 32 carried elements fit ``uint32`` limbs
(below 2^31, except limb 1: a carried limb 1 is below 2^26 + 2^7, so 32 of them
stay below 2^31 + 2^12) and are carried before any multiply.  Radix 2^44 would need 64x64-bit
products, which sm_90 emulates with several 32-bit multiplies.

Memory layout and limits
------------------------
- ``aad_buf``, ``ct_buf``: 1-D ``uint8`` device arrays.  A message's data are
  ``aad_buf[aad_off : aad_off + aad_len]`` and ``ct_buf[ct_off : ct_off + ct_len]``.
  Full blocks whose address is 8-byte aligned are read with 8-byte loads; other
  blocks (unaligned messages, the last partial block) byte by byte, zero-padded.
- ``table``: a :class:`MessageTable` from :func:`pack_messages`: ``layout`` is
  ``uint64[n, 4]`` = (aad offset, aad length, ct offset, ct length) per message,
  ``group_start`` is ``uint64[levels + 1, n + 1]``: row 0 the exclusive prefix
  sum of spans per message, row l that of level-l groups (0 for messages already
  finished at an earlier level).
- ``one_time_keys``: ``uint8[n, 32]`` or ``uint32[n, 8]`` (little-endian words
  r0..r3, s0..s3), C-contiguous; ``tags_out``: ``uint8[n, 16]`` or ``uint32[n, 4]``.
- ``scratch``: ``uint32[table.scratch_words]``: ``n * power_width * 5`` words of
  powers of r, then 5 words per span value of every level.
- Lengths up to 2^64 - 16 bytes each (the padding arithmetic adds 15); the backend
  enforces ChaCha20's own limit (2^38 - 64 bytes per message) before calling.
- Nothing is validated here: the backend validates (see ``kernels/README.md``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from numba import cuda, int64, uint32, uint64

from ._compile import device_function, kernel
from ._launch import (THREADS_PER_BLOCK, WARP_LANES, InnerLoop, ReportEntry, find_segment, launch, mac_messages,
                      unit_prefix)

#: Threads that evaluate one span together (one warp on the device). A block holds
#: ``blockDim.x // TILE_LANES`` tiles, so any multiple of it up to THREADS_PER_BLOCK works.
TILE_LANES = WARP_LANES
#: Default Horner steps per lane: a span is TILE_LANES * 64 blocks = 32 KiB.
DEFAULT_CHUNK_BLOCKS = 64
#: Default span values combined by one thread of a combine level.
DEFAULT_COMBINE_WIDTH = 64
#: uint32 words of one field element in scratch (radix 2^26 limbs).
LIMBS = 5

_MASK26 = 0x3FFFFFF


# --------------------------------------------------------------------------- #
# Field arithmetic mod 2^130 - 5, radix 2^26 (device functions).
# --------------------------------------------------------------------------- #
@device_function
def fe_mul(h0, h1, h2, h3, h4, r0, r1, r2, r3, r4, s1, s2, s3, s4):
    """``h * r`` mod 2^130-5 with one carry pass.

    Contract: limbs of h below 2^28, limbs of r below 2^26 + 2^7, ``s_i = 5 * r_i``.
    Result limbs: limb 1 below 2^26 + 2^7, the others below 2^26.
    """
    a0 = uint64(h0)
    a1 = uint64(h1)
    a2 = uint64(h2)
    a3 = uint64(h3)
    a4 = uint64(h4)
    d0 = a0 * uint64(r0) + a1 * uint64(s4) + a2 * uint64(s3) + a3 * uint64(s2) + a4 * uint64(s1)
    d1 = a0 * uint64(r1) + a1 * uint64(r0) + a2 * uint64(s4) + a3 * uint64(s3) + a4 * uint64(s2)
    d2 = a0 * uint64(r2) + a1 * uint64(r1) + a2 * uint64(r0) + a3 * uint64(s4) + a4 * uint64(s3)
    d3 = a0 * uint64(r3) + a1 * uint64(r2) + a2 * uint64(r1) + a3 * uint64(r0) + a4 * uint64(s4)
    d4 = a0 * uint64(r4) + a1 * uint64(r3) + a2 * uint64(r2) + a3 * uint64(r1) + a4 * uint64(r0)
    m = uint32(_MASK26)
    d1 = d1 + (d0 >> uint64(26))
    t0 = uint32(uint32(d0) & m)
    d2 = d2 + (d1 >> uint64(26))
    t1 = uint32(uint32(d1) & m)
    d3 = d3 + (d2 >> uint64(26))
    t2 = uint32(uint32(d2) & m)
    d4 = d4 + (d3 >> uint64(26))
    t3 = uint32(uint32(d3) & m)
    t4 = uint32(uint32(d4) & m)
    # 2^130 = 5 mod p: fold the top carry back into limb 0 (it is below 2^34).
    f0 = uint64(t0) + (d4 >> uint64(26)) * uint64(5)
    t0 = uint32(uint32(f0) & m)
    t1 = uint32(t1 + uint32(f0 >> uint64(26)))
    return t0, t1, t2, t3, t4


@device_function
def fe_carry(h0, h1, h2, h3, h4):
    """Carry limbs back to 26 bits (limb 1: 26 bits + 1) from a sum of up to 32 carried
    elements: limbs below 2^31, limb 1 below 2^31 + 2^12 (no step nears 2^32)."""
    m = uint32(_MASK26)
    h1 = uint32(h1 + (h0 >> uint32(26)))
    h0 = uint32(h0 & m)
    h2 = uint32(h2 + (h1 >> uint32(26)))
    h1 = uint32(h1 & m)
    h3 = uint32(h3 + (h2 >> uint32(26)))
    h2 = uint32(h2 & m)
    h4 = uint32(h4 + (h3 >> uint32(26)))
    h3 = uint32(h3 & m)
    h0 = uint32(h0 + (h4 >> uint32(26)) * uint32(5))
    h4 = uint32(h4 & m)
    h1 = uint32(h1 + (h0 >> uint32(26)))
    h0 = uint32(h0 & m)
    return h0, h1, h2, h3, h4


@device_function
def fe_from_block(w0, w1, w2, w3):
    """Limbs of the 16-byte block with little-endian words w0..w3, plus 2^128."""
    m = uint32(_MASK26)
    h0 = uint32(w0 & m)
    h1 = uint32(((w0 >> uint32(26)) | (w1 << uint32(6))) & m)
    h2 = uint32(((w1 >> uint32(20)) | (w2 << uint32(12))) & m)
    h3 = uint32(((w2 >> uint32(14)) | (w3 << uint32(18))) & m)
    h4 = uint32((w3 >> uint32(8)) | uint32(1 << 24))
    return h0, h1, h2, h3, h4


@device_function
def fe_clamped_r(keys, msg):
    """Limbs of the clamped r (RFC 8439 §2.5.1) from key words 0..3 of message ``msg``."""
    w0 = uint32(keys[msg, 0]) & uint32(0x0FFFFFFF)
    w1 = uint32(keys[msg, 1]) & uint32(0x0FFFFFFC)
    w2 = uint32(keys[msg, 2]) & uint32(0x0FFFFFFC)
    w3 = uint32(keys[msg, 3]) & uint32(0x0FFFFFFC)
    m = uint32(_MASK26)
    r0 = uint32(w0 & m)
    r1 = uint32(((w0 >> uint32(26)) | (w1 << uint32(6))) & m)
    r2 = uint32(((w1 >> uint32(20)) | (w2 << uint32(12))) & m)
    r3 = uint32(((w2 >> uint32(14)) | (w3 << uint32(18))) & m)
    r4 = uint32(w3 >> uint32(8))
    return r0, r1, r2, r3, r4


@device_function
def fe_load(scratch, base):
    """Five limbs stored at ``scratch[base : base + 5]``."""
    b = uint64(base)
    return (uint32(scratch[b]), uint32(scratch[b + uint64(1)]), uint32(scratch[b + uint64(2)]),
            uint32(scratch[b + uint64(3)]), uint32(scratch[b + uint64(4)]))


@device_function
def fe_store(scratch, base, h0, h1, h2, h3, h4):
    b = uint64(base)
    scratch[b] = h0
    scratch[b + uint64(1)] = h1
    scratch[b + uint64(2)] = h2
    scratch[b + uint64(3)] = h3
    scratch[b + uint64(4)] = h4


@device_function
def write_tag(keys, tags, msg, h0, h1, h2, h3, h4):
    """tags[msg] = (h mod 2^130-5 + s) mod 2^128 for limbs h as :func:`fe_carry` takes them."""
    h0, h1, h2, h3, h4 = fe_carry(h0, h1, h2, h3, h4)
    h0, h1, h2, h3, h4 = fe_carry(h0, h1, h2, h3, h4)
    m = uint32(_MASK26)
    # g = h + 5 - 2^130; keep g when it is not negative (h >= p).
    g0 = uint32(h0 + uint32(5))
    g1 = uint32(h1 + (g0 >> uint32(26)))
    g0 = g0 & m
    g2 = uint32(h2 + (g1 >> uint32(26)))
    g1 = g1 & m
    g3 = uint32(h3 + (g2 >> uint32(26)))
    g2 = g2 & m
    g4 = uint32(h4 + (g3 >> uint32(26)) - uint32(1 << 26))
    g3 = g3 & m
    keep_g = uint32((g4 >> uint32(31)) - uint32(1))  # all ones when g >= 0
    keep_h = uint32(~keep_g)
    h0 = (h0 & keep_h) | (g0 & keep_g)
    h1 = (h1 & keep_h) | (g1 & keep_g)
    h2 = (h2 & keep_h) | (g2 & keep_g)
    h3 = (h3 & keep_h) | (g3 & keep_g)
    h4 = (h4 & keep_h) | (g4 & keep_g)
    # uint32(...) around each word: on the device numba widens ``uint32 << uint32`` to 64
    # bits, and the bits above 32 would carry into the next tag word (the simulator wraps)
    w0 = uint32(h0 | (h1 << uint32(26)))
    w1 = uint32((h1 >> uint32(6)) | (h2 << uint32(20)))
    w2 = uint32((h2 >> uint32(12)) | (h3 << uint32(14)))
    w3 = uint32((h3 >> uint32(18)) | (h4 << uint32(8)))
    f = uint64(w0) + uint64(keys[msg, 4])
    tags[msg, 0] = uint32(f)
    f = uint64(w1) + uint64(keys[msg, 5]) + (f >> uint64(32))
    tags[msg, 1] = uint32(f)
    f = uint64(w2) + uint64(keys[msg, 6]) + (f >> uint64(32))
    tags[msg, 2] = uint32(f)
    f = uint64(w3) + uint64(keys[msg, 7]) + (f >> uint64(32))
    tags[msg, 3] = uint32(f)


# --------------------------------------------------------------------------- #
# Reading blocks of mac_data.
# --------------------------------------------------------------------------- #
@device_function
def _bytes_word(src, off, valid, first):
    """Little-endian word of bytes ``first .. first+3`` of ``src[off:]``; bytes at or past ``valid`` read as 0."""
    w = uint32(0)
    for k in range(4):
        pos = uint64(first) + uint64(k)
        if pos < valid:
            w = uint32(w | (uint32(src[off + pos]) << uint32(8 * k)))
    return w


@device_function
def _read_block(src_bytes, src_words, head, off, valid):
    """Words of the 16 bytes at ``src_bytes[off:]`` (only ``valid`` of them real, rest 0).

    ``src_words`` is the ``uint64`` view of ``src_bytes[head:]``; it is used when
    all 16 bytes are real and 8-byte aligned.
    """
    if valid >= uint64(16) and off >= head and ((off - head) & uint64(7)) == uint64(0):
        q = (off - head) >> uint64(3)
        lo = uint64(src_words[q])
        hi = uint64(src_words[q + uint64(1)])
        return uint32(lo), uint32(lo >> uint64(32)), uint32(hi), uint32(hi >> uint64(32))
    return (_bytes_word(src_bytes, off, valid, 0), _bytes_word(src_bytes, off, valid, 4),
            _bytes_word(src_bytes, off, valid, 8), _bytes_word(src_bytes, off, valid, 12))


@device_function
def mac_block(aad_bytes, aad_words, aad_start, ct_bytes, ct_words, ct_start, layout, msg, i):
    """Words of block ``i`` (0-based) of ``mac_data`` of message ``msg``.

    Reads the message's layout row itself: this is the cold path, and keeping
    the four lengths and offsets out of the hot loop's live registers matters more.
    """
    a_off = uint64(layout[msg, 0])
    a_len = uint64(layout[msg, 1])
    c_off = uint64(layout[msg, 2])
    c_len = uint64(layout[msg, 3])
    a_blocks = (a_len + uint64(15)) >> uint64(4)
    c_blocks = (c_len + uint64(15)) >> uint64(4)
    if i < a_blocks:
        start = i * uint64(16)
        return _read_block(aad_bytes, aad_words, aad_start, a_off + start, a_len - start)
    if i < a_blocks + c_blocks:
        start = (i - a_blocks) * uint64(16)
        return _read_block(ct_bytes, ct_words, ct_start, c_off + start, c_len - start)
    return uint32(a_len), uint32(a_len >> uint64(32)), uint32(c_len), uint32(c_len >> uint64(32))


# --------------------------------------------------------------------------- #
# Kernels.
# --------------------------------------------------------------------------- #
def _poly1305_powers(keys, n_messages, power_width, span_blocks, combine_width, scratch):
    """scratch[(m * power_width + k) * 5 ...] = r_m^(k+1) for k < TILE_LANES, then rho_1, rho_2, ..."""
    total = uint64(n_messages) * uint64(power_width)
    idx = uint64(cuda.grid(1))
    stride = uint64(cuda.gridsize(1))
    while idx < total:
        msg = idx // uint64(power_width)
        k = idx - msg * uint64(power_width)
        if k < uint64(TILE_LANES):
            e = k + uint64(1)
        else:
            e = uint64(span_blocks)
            for _ in range(k - uint64(TILE_LANES)):
                e = e * uint64(combine_width)
        r0, r1, r2, r3, r4 = fe_clamped_r(keys, msg)
        x0, x1, x2, x3, x4 = r0, r1, r2, r3, r4
        s1 = uint32(r1 * uint32(5))
        s2 = uint32(r2 * uint32(5))
        s3 = uint32(r3 * uint32(5))
        s4 = uint32(r4 * uint32(5))
        top = int64(63)
        while top > int64(0) and ((e >> uint64(top)) & uint64(1)) == uint64(0):
            top -= int64(1)
        bit = top - int64(1)
        while bit >= int64(0):
            x0, x1, x2, x3, x4 = fe_mul(x0, x1, x2, x3, x4, x0, x1, x2, x3, x4,
                                        uint32(x1 * uint32(5)), uint32(x2 * uint32(5)), uint32(x3 * uint32(5)), uint32(x4 * uint32(5)))
            if ((e >> uint64(bit)) & uint64(1)) == uint64(1):
                x0, x1, x2, x3, x4 = fe_mul(x0, x1, x2, x3, x4, r0, r1, r2, r3, r4, s1, s2, s3, s4)
            bit -= int64(1)
        fe_store(scratch, idx * uint64(LIMBS), x0, x1, x2, x3, x4)
        idx += stride


def _poly1305_aead_partial(aad_bytes, aad_words, aad_head, ct_bytes, ct_words, ct_head,
                           layout, span_start, n_messages, n_spans, chunk_blocks,
                           power_width, partial_base, scratch, keys, tags):
    """One span (TILE_LANES * chunk_blocks blocks of mac_data) per tile of TILE_LANES threads.

    Contract: blockDim.x is a multiple of TILE_LANES and at most THREADS_PER_BLOCK;
    powers of r are in scratch (``_poly1305_powers``).  Writes the tag of every
    single-span message and the span values (carried limbs) of the others at
    ``scratch[partial_base + 5 * (span_start[m] + k)]``.
    """
    acc = cuda.shared.array((THREADS_PER_BLOCK, LIMBS), dtype=uint32)
    aad_start = uint64(aad_head)
    ct_start = uint64(ct_head)
    tid = cuda.threadIdx.x
    lane = uint64(tid % TILE_LANES)
    tiles_per_block = uint64(cuda.blockDim.x // TILE_LANES)
    tile_in_block = uint64(tid // TILE_LANES)
    span_blocks = uint64(TILE_LANES) * uint64(chunk_blocks)
    total_spans = uint64(n_spans)
    # Block-uniform loop (every thread of the block runs the same rounds), so
    # the syncthreads of the tile sum are reached by all threads.
    first = uint64(cuda.blockIdx.x) * tiles_per_block
    while first < total_spans:
        span = first + tile_in_block
        active = span < total_spans
        h0 = uint32(0)
        h1 = uint32(0)
        h2 = uint32(0)
        h3 = uint32(0)
        h4 = uint32(0)
        msg = int64(0)
        spans_of_msg = uint64(0)
        k = uint64(0)
        if active:
            msg = find_segment(span_start, n_messages, span)
            k = span - uint64(span_start[msg])
            spans_of_msg = uint64(span_start[msg + 1]) - uint64(span_start[msg])
            a_blocks = (uint64(layout[msg, 1]) + uint64(15)) >> uint64(4)
            c_off = uint64(layout[msg, 2])
            c_len = uint64(layout[msg, 3])
            n_blocks = a_blocks + ((c_len + uint64(15)) >> uint64(4)) + uint64(1)
            pad = spans_of_msg * span_blocks - n_blocks  # zero blocks in front of span 0
            span_first = k * span_blocks
            j = uint64(0)
            if span_first < pad:
                j = (pad - span_first) // uint64(TILE_LANES)
            # Steps [fast_lo, fast_hi) read only full, 8-byte aligned ciphertext blocks
            # (uniform over the tile): they run a loop with nothing but loads and
            # Horner.  The other steps (aad, boundaries, the last partial block, the
            # length block) take the general path.
            first_ct = pad + a_blocks  # padded position of ciphertext block 0
            end_full_ct = first_ct + (c_len >> uint64(4))
            fast_lo = uint64(0)
            if span_first < first_ct:
                fast_lo = (first_ct - span_first + uint64(TILE_LANES - 1)) // uint64(TILE_LANES)
            fast_hi = uint64(0)
            if (c_off >= ct_start and ((c_off - ct_start) & uint64(7)) == uint64(0)
                    and end_full_ct >= span_first + uint64(TILE_LANES)):
                fast_hi = (end_full_ct - span_first - uint64(TILE_LANES)) // uint64(TILE_LANES) + uint64(1)
                if fast_hi > uint64(chunk_blocks):
                    fast_hi = uint64(chunk_blocks)
            # ct_words index of this lane's block at step 0 (modular; only used in the fast range).
            fast_q0 = ((c_off - ct_start) >> uint64(3)) + uint64(2) * (span_first + lane - first_ct)
            pbase = uint64(msg) * uint64(power_width) * uint64(LIMBS)
            R0, R1, R2, R3, R4 = fe_load(scratch, pbase + uint64((TILE_LANES - 1) * LIMBS))  # r^W
            S1 = uint32(R1 * uint32(5))
            S2 = uint32(R2 * uint32(5))
            S3 = uint32(R3 * uint32(5))
            S4 = uint32(R4 * uint32(5))
            steps = uint64(chunk_blocks)
            while j < steps:
                if j >= fast_lo and j < fast_hi:
                    q = fast_q0 + uint64(2 * TILE_LANES) * j
                    while j < fast_hi:
                        lo = uint64(ct_words[q])
                        hi = uint64(ct_words[q + uint64(1)])
                        h0, h1, h2, h3, h4 = fe_mul(h0, h1, h2, h3, h4, R0, R1, R2, R3, R4, S1, S2, S3, S4)
                        m0, m1, m2, m3, m4 = fe_from_block(uint32(lo), uint32(lo >> uint64(32)),
                                                           uint32(hi), uint32(hi >> uint64(32)))
                        h0 = uint32(h0 + m0)
                        h1 = uint32(h1 + m1)
                        h2 = uint32(h2 + m2)
                        h3 = uint32(h3 + m3)
                        h4 = uint32(h4 + m4)
                        q += uint64(2 * TILE_LANES)
                        j += uint64(1)
                else:
                    h0, h1, h2, h3, h4 = fe_mul(h0, h1, h2, h3, h4, R0, R1, R2, R3, R4, S1, S2, S3, S4)
                    pos = span_first + j * uint64(TILE_LANES) + lane
                    if pos >= pad:
                        w0, w1, w2, w3 = mac_block(aad_bytes, aad_words, aad_start, ct_bytes, ct_words, ct_start,
                                                   layout, msg, pos - pad)
                        m0, m1, m2, m3, m4 = fe_from_block(w0, w1, w2, w3)
                        h0 = uint32(h0 + m0)
                        h1 = uint32(h1 + m1)
                        h2 = uint32(h2 + m2)
                        h3 = uint32(h3 + m3)
                        h4 = uint32(h4 + m4)
                    j += uint64(1)
            # Lane t's blocks sit W - t positions (times R powers) before the span end.
            p0, p1, p2, p3, p4 = fe_load(scratch, pbase + (uint64(TILE_LANES - 1) - lane) * uint64(LIMBS))
            h0, h1, h2, h3, h4 = fe_mul(h0, h1, h2, h3, h4, p0, p1, p2, p3, p4,
                                        uint32(p1 * uint32(5)), uint32(p2 * uint32(5)), uint32(p3 * uint32(5)), uint32(p4 * uint32(5)))
        acc[tid, 0] = h0
        acc[tid, 1] = h1
        acc[tid, 2] = h2
        acc[tid, 3] = h3
        acc[tid, 4] = h4
        half = TILE_LANES // 2
        while half > 0:
            cuda.syncthreads()
            if lane < uint64(half):
                for limb in range(LIMBS):
                    acc[tid, limb] = uint32(acc[tid, limb] + acc[tid + half, limb])
            half //= 2
        if active and lane == uint64(0):
            v0, v1, v2, v3, v4 = fe_carry(acc[tid, 0], acc[tid, 1], acc[tid, 2], acc[tid, 3], acc[tid, 4])
            if spans_of_msg == uint64(1):
                write_tag(keys, tags, msg, v0, v1, v2, v3, v4)
            else:
                fe_store(scratch, uint64(partial_base) + (uint64(span_start[msg]) + k) * uint64(LIMBS),
                         v0, v1, v2, v3, v4)
        cuda.syncthreads()  # lane 0 is done reading acc before the next round overwrites it
        first += uint64(cuda.gridDim.x) * tiles_per_block


def _poly1305_combine(in_start, out_start, n_messages, n_groups, combine_width, power_index,
                      power_width, in_base, out_base, scratch, keys, tags):
    """One thread per group of ``combine_width`` values of one message: Horner with rho_level.

    ``in_start`` / ``out_start`` are the prefix sums of values per message at the
    previous / this level.  A message with one group at this level gets its tag.
    """
    g = uint64(cuda.grid(1))
    stride = uint64(cuda.gridsize(1))
    width = uint64(combine_width)
    while g < uint64(n_groups):
        msg = find_segment(out_start, n_messages, g)
        q = g - uint64(out_start[msg])
        groups = uint64(out_start[msg + 1]) - uint64(out_start[msg])
        first_in = uint64(in_start[msg])
        n_in = uint64(in_start[msg + 1]) - first_in
        pad = groups * width - n_in
        j = uint64(0)
        if q == uint64(0):
            j = pad
        R0, R1, R2, R3, R4 = fe_load(scratch, (uint64(msg) * uint64(power_width) + uint64(power_index))
                                     * uint64(LIMBS))
        S1 = uint32(R1 * uint32(5))
        S2 = uint32(R2 * uint32(5))
        S3 = uint32(R3 * uint32(5))
        S4 = uint32(R4 * uint32(5))
        h0 = uint32(0)
        h1 = uint32(0)
        h2 = uint32(0)
        h3 = uint32(0)
        h4 = uint32(0)
        while j < width:
            h0, h1, h2, h3, h4 = fe_mul(h0, h1, h2, h3, h4, R0, R1, R2, R3, R4, S1, S2, S3, S4)
            v0, v1, v2, v3, v4 = fe_load(scratch, uint64(in_base)
                                         + (first_in + q * width + j - pad) * uint64(LIMBS))
            h0 = uint32(h0 + v0)
            h1 = uint32(h1 + v1)
            h2 = uint32(h2 + v2)
            h3 = uint32(h3 + v3)
            h4 = uint32(h4 + v4)
            j += uint64(1)
        if groups == uint64(1):
            write_tag(keys, tags, msg, h0, h1, h2, h3, h4)
        else:
            h0, h1, h2, h3, h4 = fe_carry(h0, h1, h2, h3, h4)
            fe_store(scratch, uint64(out_base) + (uint64(out_start[msg]) + q) * uint64(LIMBS),
                     h0, h1, h2, h3, h4)
        g += stride


poly1305_powers = kernel(_poly1305_powers)
poly1305_aead_partial = kernel(_poly1305_aead_partial)
poly1305_combine = kernel(_poly1305_combine)


# --------------------------------------------------------------------------- #
# Host side: message table and launcher.
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class MessageTable:
    """Per-message layout and the prefix sums the kernels walk (see the module docstring).

    ``layout`` and ``group_start`` are NumPy arrays from :func:`pack_messages`, or
    device arrays after :meth:`to_device`.  The plain integers are host-side
    launch parameters.
    """

    n: int
    layout: object  # uint64[n, 4]: aad offset, aad length, ct offset, ct length
    group_start: object  # uint64[levels + 1, n + 1]
    group_totals: tuple  # groups (spans at level 0) summed over messages, per level
    chunk_blocks: int
    combine_width: int

    @property
    def levels(self) -> int:
        """Combine launches needed (0 when every message fits one span)."""
        return len(self.group_totals) - 1

    @property
    def power_width(self) -> int:
        """Powers of r kept per message: r^1 .. r^W, then one per combine level."""
        return TILE_LANES + self.levels

    @property
    def scratch_words(self) -> int:
        """uint32 words of scratch one call needs."""
        return LIMBS * (self.n * self.power_width + sum(self.group_totals))

    def to_device(self, stream=0) -> "MessageTable":
        """The same table with its arrays copied to the device (reusable across calls)."""
        if not isinstance(self.layout, np.ndarray):
            return self
        return replace(self, layout=cuda.to_device(self.layout, stream=stream),
                       group_start=cuda.to_device(self.group_start, stream=stream))


def pack_messages(aad_offsets, aad_lengths, ct_offsets, ct_lengths, *,
                  chunk_blocks: int = DEFAULT_CHUNK_BLOCKS,
                  combine_width: int = DEFAULT_COMBINE_WIDTH) -> MessageTable:
    """Build the :class:`MessageTable` for messages given as four equal-length integer sequences.

    ``chunk_blocks`` (Horner steps per lane) and ``combine_width`` must be powers
    of two >= 1 and 2 respectively; small values are for tests (they force the
    multi-span and multi-level paths on small messages). Others are refused: a width of
    1 never shrinks the group count (this loop would not end), 0 spans write no tag.
    """
    if chunk_blocks < 1 or chunk_blocks & (chunk_blocks - 1):
        raise ValueError("chunk_blocks must be a power of two >= 1")
    if combine_width < 2 or combine_width & (combine_width - 1):
        raise ValueError("combine_width must be a power of two >= 2")
    layout, blocks = mac_messages(aad_offsets, aad_lengths, ct_offsets, ct_lengths)
    n = layout.shape[0]
    span_blocks = np.uint64(TILE_LANES * chunk_blocks)
    counts = (blocks + span_blocks - np.uint64(1)) // span_blocks
    rows = [unit_prefix(counts)]
    while counts.size and counts.max() > 1:
        counts = np.where(counts > 1, (counts + np.uint64(combine_width - 1)) // np.uint64(combine_width),
                          np.uint64(0)).astype(np.uint64)
        rows.append(unit_prefix(counts))
    group_start = np.ascontiguousarray(np.stack(rows))
    return MessageTable(n=n, layout=layout, group_start=group_start,
                        group_totals=tuple(int(row[-1]) for row in rows),
                        chunk_blocks=int(chunk_blocks), combine_width=int(combine_width))


def _address(ary) -> int:
    """Address of element 0 (device pointer, or host pointer under the simulator)."""
    iface = getattr(ary, "__cuda_array_interface__", None)
    if iface is not None:
        return int(iface["data"][0])
    return int(np.asarray(getattr(ary, "_ary", ary)).ctypes.data)


def _word_view(buf, stream):
    """(uint64 view of the 8-byte-aligned part of ``buf``, byte index where it starts)."""
    head = (-_address(buf)) % 8 if len(buf) else 0
    usable = max(0, len(buf) - head) // 8 * 8
    if usable == 0:
        return cuda.device_array(2, dtype=np.uint64, stream=stream), 0
    return buf[head:head + usable].view(np.uint64), head


def poly1305_aead_tags(aad_buf, ct_buf, table, n_messages, one_time_keys, tags_out, *, stream=0, scratch=None):
    """Queue on ``stream`` everything that writes the RFC 8439 AEAD tag of every message to ``tags_out``.

    aad_buf, ct_buf: 1-D uint8 device arrays with the associated data and
    ciphertexts of all messages; table: :class:`MessageTable` from
    :func:`pack_messages` (host or device arrays); n_messages: ``table.n``;
    one_time_keys: uint8[n, 32] or uint32[n, 8] device array (r || s per message);
    tags_out: uint8[n, 16] or uint32[n, 4] device array; scratch: optional
    uint32 device array of at least ``table.scratch_words`` (allocated when None).
    Launches ``2 + table.levels`` kernels.  Checks nothing (the backend validates).
    """
    if n_messages == 0:
        return
    table = table.to_device(stream)
    keys = one_time_keys if one_time_keys.dtype.itemsize == 4 else one_time_keys.view(np.uint32)
    tags = tags_out if tags_out.dtype.itemsize == 4 else tags_out.view(np.uint32)
    if scratch is None:
        scratch = cuda.device_array(table.scratch_words, dtype=np.uint32, stream=stream)
    aad_words, aad_head = _word_view(aad_buf, stream)
    ct_words, ct_head = _word_view(ct_buf, stream)
    width = table.power_width
    span_blocks = TILE_LANES * table.chunk_blocks

    launch(poly1305_powers, n_messages * width,
           (keys, n_messages, width, span_blocks, table.combine_width, scratch), stream)

    partial_base = LIMBS * n_messages * width
    n_spans = table.group_totals[0]
    launch(poly1305_aead_partial, n_spans * TILE_LANES,
           (aad_buf, aad_words, aad_head, ct_buf, ct_words, ct_head,
            table.layout, table.group_start[0], n_messages, n_spans, table.chunk_blocks,
            width, partial_base, scratch, keys, tags), stream, multiple=TILE_LANES)

    in_base = partial_base
    for level in range(1, table.levels + 1):
        out_base = in_base + LIMBS * table.group_totals[level - 1]
        n_groups = table.group_totals[level]
        launch(poly1305_combine, n_groups,
               (table.group_start[level - 1], table.group_start[level], n_messages, n_groups,
                table.combine_width, TILE_LANES + level - 1, width, in_base, out_base, scratch, keys, tags),
               stream)
        in_base = out_base


_ARRAY_ARGS = "uint8[::1], uint64[::1], int64, uint8[::1], uint64[::1], int64, uint64[:, ::1], uint64[::1]"

KERNEL_REPORT = [
    ReportEntry(
        name="poly1305_aead_partial",
        pyfunc=_poly1305_aead_partial,
        signature=f"void({_ARRAY_ARGS}, int64, int64, int64, int64, int64, uint32[::1], uint32[:, ::1], uint32[:, ::1])",
        bytes_per_iteration=16 * DEFAULT_CHUNK_BLOCKS,
        inner_loops=(
            InnerLoop("find_segment: binary search over the span table"),
            InnerLoop("Horner steps (general path); a ciphertext span enters once and stays in the fast loop",
                      trips=1),
            InnerLoop("fast Horner loop: one full 8-byte-aligned ciphertext block per trip",
                      trips=DEFAULT_CHUNK_BLOCKS, ops=("LDG.E.64", "IMAD.WIDE.U32")),
        ),
        note=f"one iteration = one span; per lane {DEFAULT_CHUNK_BLOCKS} Horner steps of one 16-byte block; "
             "tiles of 32 lanes read 512 contiguous bytes per step",
    ),
    ReportEntry(
        name="poly1305_combine",
        pyfunc=_poly1305_combine,
        signature="void(uint64[::1], uint64[::1], int64, int64, int64, int64, int64, int64, int64, "
                  "uint32[::1], uint32[:, ::1], uint32[:, ::1])",
        bytes_per_iteration=20 * DEFAULT_COMBINE_WIDTH,
        inner_loops=(
            InnerLoop("find_segment: binary search over the group table"),
            InnerLoop("Horner over span values (20 bytes each)", trips=DEFAULT_COMBINE_WIDTH, ops=("IMAD.WIDE.U32",)),
        ),
        note=f"one iteration = {DEFAULT_COMBINE_WIDTH} span values of 20 bytes; touches ~1/1600 of the data",
    ),
]
