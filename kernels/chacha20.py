"""ChaCha20 keystream XOR (RFC 8439) over a table of segments, in one launch.

What it computes
----------------
For every segment ``s`` of the table, ``dst[dst_off + i] = src[src_off + i] ^
keystream(key, nonce)[position + i]`` for ``0 <= i < length``. ``src`` and ``dst``
may be the same array (in place); within one segment the source and destination
ranges must be either identical or disjoint, and segments must not write over
each other's input (the kernel runs them in parallel).

Counter limits (enforced by the callers, before a launch)
---------------------------------------------------------
The ChaCha20 state words 12..15 are ``counter_lo, counter_hi_or_nonce0, nonce1,
nonce2``. The kernel always computes the block counter as the 64-bit number
``(nonce0 << 32) + (position >> 6) + block`` (mod 2**64) and writes its two halves
to words 12 and 13. That one formula serves both variants:

* ``counter_bits=32`` (RFC 8439, IETF): the block counter is 32 bits and the nonce
  96 bits. As long as ``position + length <= COUNTER32_LIMIT`` (2**38 bytes,
  256 GiB per (key, nonce)), the carry into word 13 never happens and word 13
  stays ``nonce0``. Callers refuse more, as ``cryptography`` does: the AEAD limits
  of ``gpucrypt._limits`` and ``gpucrypt.ciphers.ChaCha20``'s own position check.
* ``counter_bits=64`` (original ChaCha20 of Bernstein, libsodium's
  ``crypto_stream_chacha20``, OpenSSL's raw EVP ChaCha20 before ``cryptography``
  added its check): the counter is the 64-bit number ``word13:word12``, and the
  nonce only words 14 and 15. ``nonce0`` is then the counter's high word, and the
  counter carries into it at 2**32 blocks; it wraps at 2**64 blocks without
  touching words 14 and 15 (OpenSSL's behaviour). No limit beyond uint64
  positions.

What ``cryptography`` 50 does at the 32-bit overflow (measured): with the 16-byte
nonce ``le32(counter) || nonce12``, an ``update`` that would need a block past
counter ``2**32 - 1`` raises ``ValueError("Exceeded the maximum number of bytes
that can be encrypted with ChaCha20 for this nonce. The 32-bit counter portion of
the nonce would overflow.")`` and consumes nothing (the encryptor stays usable);
exactly ``(2**32 - counter) * 64`` bytes are allowed. OpenSSL itself (and older
``cryptography`` releases) carry into the next word, i.e. the ``counter_bits=64``
variant. So a drop-in ``ChaCha20(key, nonce16)`` uses ``counter_bits=32`` plus
that check; the same formula would serve ``counter_bits=64``, which nothing in
gpucrypt exposes.

Memory layout
-------------
* ``src``, ``dst``: 1-D ``uint8`` device arrays (C-contiguous).
* ``keys``: ``uint32[n_keys, 8]``, each key as 8 little-endian words (two
  128-bit loads per block).
* ``table``: ``uint32[n_segments, TABLE_WORDS]`` built by :func:`pack_segments`,
  one 48-byte row per segment, read with three 128-bit loads. Word names are the
  ``W_*`` constants; 64-bit fields are (low, high) word pairs. ``W_COUNTER`` holds
  the 64-bit block counter of the segment's first keystream block (``nonce0``
  already in its high half: state words 12 and 13), ``W_NONCE12`` state words 14
  and 15, ``W_HEAD`` the byte offset of the segment's start inside its first
  block (0..63).
* ``keys``, ``table``: base addresses 16-byte aligned (any fresh device
  allocation is 256-byte aligned); ``src``, ``dst``: any alignment.
* ``unit_start``: ``uint64[n_segments + 1]``, exclusive prefix sum of keystream
  blocks per segment (``ceil((head + length) / 64)``, 0 for an empty segment).

Design
------
One thread per 64-byte keystream block, grid-stride loop, geometry from
``_launch.launch`` (the occupancy of this kernel). A thread finds its segment by binary search, reads the row
and the key (8 words, L1-resident, kept in registers), runs the 20 rounds on 16
scalar registers (no local arrays, so no local memory), then:

* fast path, the whole 64 bytes inside the segment and both ``src`` and ``dst``
  addresses 16-byte aligned (checked on the real addresses, so views with odd
  base pointers are safe): four 128-bit loads and stores (``LDG.E.128`` /
  ``STG.E.128``) through small LLVM intrinsics (``kernels/_vector_io.py``), since numba would
  otherwise issue one-byte accesses;
* byte path, for a segment's unaligned or partial head and tail blocks and for
  buffers whose alignment does not allow vectors: the keystream goes to this
  thread's slot of shared memory (word-major, so no bank conflicts) and a byte
  loop XORs the covered bytes. It costs little static code and no registers.

The intrinsics live in :mod:`kernels._vector_io` (shared with AES), which swaps
in Python twins with the same contract under the simulator.
"""
from __future__ import annotations

import numpy as np
from numba import cuda, uint8, uint32, uint64, int64

from ._compile import device_function, kernel
from ._launch import THREADS_PER_BLOCK, InnerLoop, ReportEntry, find_segment, launch, unit_prefix
from ._vector_io import address_of, load_u32x4, store_u32x4

#: Bytes of keystream per ChaCha20 block, and per thread per loop iteration.
BLOCK_BYTES = 64

#: Exclusive end of the keystream usable with the 32-bit RFC 8439 counter (bytes).
COUNTER32_LIMIT = 1 << 38

# Words of a segment-table row (uint32). 64-bit fields are (low, high) pairs.
W_SRC = 0        # byte offset of the segment in src
W_DST = 2        # byte offset of the segment in dst
W_LENGTH = 4     # bytes
W_KEY = 6        # row of `keys`
W_HEAD = 7       # position & 63: keystream bytes of the first block that the segment skips
W_COUNTER = 8    # state words 12, 13 of the first block: (nonce0 << 32) + (position >> 6), mod 2**64
W_NONCE12 = 10   # state words 14, 15: nonce1, nonce2
TABLE_WORDS = 12  # 48 bytes: three 16-byte loads


# --------------------------------------------------------------------------- host side

def key_words(key: bytes) -> np.ndarray:
    """The 32-byte key as ``uint32[8]`` little-endian words (state words 4..11)."""
    if len(key) != 32:
        raise ValueError("ChaCha20 key must be 32 bytes")
    return np.frombuffer(bytes(key), dtype="<u4").astype(np.uint32)


def nonce_words(nonce12: bytes) -> np.ndarray:
    """The 12-byte nonce as ``uint32[3]`` little-endian words (state words 13..15)."""
    if len(nonce12) != 12:
        raise ValueError("ChaCha20 nonce must be 12 bytes")
    return np.frombuffer(bytes(nonce12), dtype="<u4").astype(np.uint32)


def pack_segments(src_offsets, dst_offsets, lengths, key_indices, nonces, positions):
    """Build the segment table for :func:`chacha20_xor` (host side, NumPy only).

    Arguments are sequences of length ``n`` (one entry per segment):
    ``src_offsets``, ``dst_offsets``, ``lengths``: bytes; ``key_indices``: row of
    ``keys``; ``nonces``: ``uint32[n, 3]``, the 12-byte nonce as 3 little-endian
    words (with ``counter_bits=64`` word 0 is the counter's high word);
    ``positions``: uint64 keystream byte position of each segment's first byte
    (``counter * 64 + offset inside the block``).

    Returns ``(table, unit_start)``: ``uint32[n, TABLE_WORDS]`` and
    ``uint64[n + 1]`` (``_launch.unit_prefix`` of 64-byte blocks per segment),
    ready to copy to the device. The table is the same for both counter
    variants; the counter check is the callers'.
    """
    src_offsets = np.asarray(src_offsets, dtype=np.uint64).reshape(-1)
    n = src_offsets.shape[0]
    dst_offsets = np.asarray(dst_offsets, dtype=np.uint64).reshape(n)
    lengths = np.asarray(lengths, dtype=np.uint64).reshape(n)
    key_indices = np.asarray(key_indices, dtype=np.uint64).reshape(n)
    nonces = np.asarray(nonces, dtype=np.uint32).reshape(n, 3)
    positions = np.asarray(positions, dtype=np.uint64).reshape(n)

    head = positions & np.uint64(BLOCK_BYTES - 1)
    with np.errstate(over="ignore"):  # the 64-bit counter wraps mod 2**64 by design
        counter = (nonces[:, 0].astype(np.uint64) << np.uint64(32)) + (positions >> np.uint64(6))
    table = np.zeros((n, TABLE_WORDS), dtype=np.uint32)
    for word, values in ((W_SRC, src_offsets), (W_DST, dst_offsets), (W_LENGTH, lengths), (W_COUNTER, counter)):
        table[:, word] = (values & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        table[:, word + 1] = (values >> np.uint64(32)).astype(np.uint32)
    table[:, W_KEY] = key_indices.astype(np.uint32)
    table[:, W_HEAD] = head.astype(np.uint32)
    table[:, W_NONCE12] = nonces[:, 1]
    table[:, W_NONCE12 + 1] = nonces[:, 2]

    blocks = (head + lengths + np.uint64(BLOCK_BYTES - 1)) // np.uint64(BLOCK_BYTES)
    blocks[lengths == 0] = 0
    return table, unit_prefix(blocks)


# --------------------------------------------------------------------------- ChaCha20 core

@device_function
def _rotl(x, n):
    """32-bit rotate left by the constant ``n`` (one SHF.L.W or PRMT on the device)."""
    return uint32((uint32(x) << uint32(n)) | (uint32(x) >> uint32(32 - n)))


@device_function
def _quarter_round(a, b, c, d):
    """RFC 8439 section 2.1 quarter round on four uint32 values."""
    a = uint32(a + b)
    d = _rotl(uint32(d ^ a), 16)
    c = uint32(c + d)
    b = _rotl(uint32(b ^ c), 12)
    a = uint32(a + b)
    d = _rotl(uint32(d ^ a), 8)
    c = uint32(c + d)
    b = _rotl(uint32(b ^ c), 7)
    return a, b, c, d


@device_function
def _double_round(x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15):
    """One column round and one diagonal round (RFC 8439 section 2.3)."""
    x0, x4, x8, x12 = _quarter_round(x0, x4, x8, x12)
    x1, x5, x9, x13 = _quarter_round(x1, x5, x9, x13)
    x2, x6, x10, x14 = _quarter_round(x2, x6, x10, x14)
    x3, x7, x11, x15 = _quarter_round(x3, x7, x11, x15)
    x0, x5, x10, x15 = _quarter_round(x0, x5, x10, x15)
    x1, x6, x11, x12 = _quarter_round(x1, x6, x11, x12)
    x2, x7, x8, x13 = _quarter_round(x2, x7, x8, x13)
    x3, x4, x9, x14 = _quarter_round(x3, x4, x9, x14)
    return x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15


@device_function
def chacha20_block(k0, k1, k2, k3, k4, k5, k6, k7, c12, c13, n14, n15):
    """RFC 8439 block function: the 16 keystream words for state words 4..15.

    Words 0..3 are the "expand 32-byte k" constants. Returns a 16-tuple of uint32
    (little-endian words of the 64-byte keystream block).
    """
    x0 = uint32(0x61707865)
    x1 = uint32(0x3320646E)
    x2 = uint32(0x79622D32)
    x3 = uint32(0x6B206574)
    x4, x5, x6, x7 = uint32(k0), uint32(k1), uint32(k2), uint32(k3)
    x8, x9, x10, x11 = uint32(k4), uint32(k5), uint32(k6), uint32(k7)
    x12, x13, x14, x15 = uint32(c12), uint32(c13), uint32(n14), uint32(n15)
    # Ten double rounds, unrolled by hand: numba has no unroll pragma and NVVM keeps
    # a `for _ in range(10)` loop rolled (measured), which costs a branch and a
    # counter per double round and hides the real instruction count.
    x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = _double_round(
        x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15)
    x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = _double_round(
        x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15)
    x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = _double_round(
        x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15)
    x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = _double_round(
        x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15)
    x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = _double_round(
        x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15)
    x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = _double_round(
        x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15)
    x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = _double_round(
        x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15)
    x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = _double_round(
        x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15)
    x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = _double_round(
        x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15)
    x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = _double_round(
        x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15)
    return (
        uint32(x0 + uint32(0x61707865)), uint32(x1 + uint32(0x3320646E)),
        uint32(x2 + uint32(0x79622D32)), uint32(x3 + uint32(0x6B206574)),
        uint32(x4 + uint32(k0)), uint32(x5 + uint32(k1)), uint32(x6 + uint32(k2)), uint32(x7 + uint32(k3)),
        uint32(x8 + uint32(k4)), uint32(x9 + uint32(k5)), uint32(x10 + uint32(k6)), uint32(x11 + uint32(k7)),
        uint32(x12 + uint32(c12)), uint32(x13 + uint32(c13)), uint32(x14 + uint32(n14)), uint32(x15 + uint32(n15)),
    )


@device_function
def _xor_64_bytes(src, s, dst, d, x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15):
    """dst[d:d+64] = src[s:s+64] ^ keystream block, with four 128-bit loads then four stores.

    All loads are issued before any store: src and dst may alias, so the compiler
    could not move a load above an earlier store, and interleaving would expose
    four memory latencies in a row instead of one.
    """
    a0, a1, a2, a3 = load_u32x4(src, s)
    b0, b1, b2, b3 = load_u32x4(src, s + 16)
    c0, c1, c2, c3 = load_u32x4(src, s + 32)
    e0, e1, e2, e3 = load_u32x4(src, s + 48)
    store_u32x4(dst, d, uint32(a0 ^ x0), uint32(a1 ^ x1), uint32(a2 ^ x2), uint32(a3 ^ x3))
    store_u32x4(dst, d + 16, uint32(b0 ^ x4), uint32(b1 ^ x5), uint32(b2 ^ x6), uint32(b3 ^ x7))
    store_u32x4(dst, d + 32, uint32(c0 ^ x8), uint32(c1 ^ x9), uint32(c2 ^ x10), uint32(c3 ^ x11))
    store_u32x4(dst, d + 48, uint32(e0 ^ x12), uint32(e1 ^ x13), uint32(e2 ^ x14), uint32(e3 ^ x15))


# --------------------------------------------------------------------------- kernel

#: Shared keystream slots of the byte path: 16 words per thread, word-major
#: (word ``w`` of thread ``t`` at ``w * THREADS_PER_BLOCK + t``).
_SPILL_WORDS = 16 * THREADS_PER_BLOCK


def _chacha20_xor_kernel(src, dst, keys, table, unit_start, n_segments):
    """One thread per 64-byte keystream block of the segment table (grid-stride loop).

    ``keys`` and ``table`` are the flat (1-D) views of ``uint32[n_keys, 8]`` and
    ``uint32[n_segments, TABLE_WORDS]``. Launch with at most ``THREADS_PER_BLOCK``
    threads per block (the shared keystream slots are sized for it); any block
    size up to that works. Indices are unsigned
    so that numba emits no negative-index wrap-around code.
    """
    spill = cuda.shared.array(_SPILL_WORDS, dtype=np.uint32)  # byte path only
    tid = uint64(cuda.threadIdx.x)
    total = uint64(unit_start[uint64(n_segments)])
    unit = uint64(cuda.blockIdx.x) * uint64(cuda.blockDim.x) + tid
    stride = uint64(cuda.gridDim.x) * uint64(cuda.blockDim.x)
    while unit < total:
        seg = uint64(find_segment(unit_start, n_segments, unit))
        block = uint64(unit - uint64(unit_start[seg]))
        row = seg * uint64(TABLE_WORDS)
        src_lo, src_hi, dst_lo, dst_hi = load_u32x4(table, row)
        len_lo, len_hi, key, head = load_u32x4(table, row + uint64(4))
        ctr_lo, ctr_hi, n14, n15 = load_u32x4(table, row + uint64(8))
        k0, k1, k2, k3 = load_u32x4(keys, uint64(key) * uint64(8))
        k4, k5, k6, k7 = load_u32x4(keys, uint64(key) * uint64(8) + uint64(4))
        counter = ((uint64(ctr_hi) << uint64(32)) | uint64(ctr_lo)) + block
        x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = chacha20_block(
            k0, k1, k2, k3, k4, k5, k6, k7,
            uint32(counter & uint64(0xFFFFFFFF)), uint32(counter >> uint64(32)), n14, n15,
        )

        # Segment bytes [lo, hi) meet this keystream block; segment byte i uses
        # keystream byte i - begin of the block.
        length = int64((uint64(len_hi) << uint64(32)) | uint64(len_lo))
        begin = int64(block * uint64(BLOCK_BYTES)) - int64(head)
        lo = max(begin, int64(0))
        hi = min(begin + int64(BLOCK_BYTES), length)
        s = uint64((uint64(src_hi) << uint64(32)) | uint64(src_lo)) + uint64(lo)
        d = uint64((uint64(dst_hi) << uint64(32)) | uint64(dst_lo)) + uint64(lo)
        aligned = ((address_of(src, s) | address_of(dst, d)) & uint64(15)) == uint64(0)
        if aligned and hi - lo == int64(BLOCK_BYTES):
            _xor_64_bytes(src, s, dst, d, x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15)
        else:
            stripe = uint64(THREADS_PER_BLOCK)
            spill[0 * stripe + tid] = x0
            spill[1 * stripe + tid] = x1
            spill[2 * stripe + tid] = x2
            spill[3 * stripe + tid] = x3
            spill[4 * stripe + tid] = x4
            spill[5 * stripe + tid] = x5
            spill[6 * stripe + tid] = x6
            spill[7 * stripe + tid] = x7
            spill[8 * stripe + tid] = x8
            spill[9 * stripe + tid] = x9
            spill[10 * stripe + tid] = x10
            spill[11 * stripe + tid] = x11
            spill[12 * stripe + tid] = x12
            spill[13 * stripe + tid] = x13
            spill[14 * stripe + tid] = x14
            spill[15 * stripe + tid] = x15
            k_lo = uint32(lo - begin)
            for k in range(k_lo, uint32(hi - begin)):
                k = uint32(k)
                word = uint32(spill[uint64(k >> uint32(2)) * stripe + tid])
                byte = uint32(word >> ((k & uint32(3)) * uint32(8))) & uint32(0xFF)
                i = uint64(k - k_lo)
                dst[d + i] = uint8(uint32(src[s + i]) ^ byte)
        unit += stride


_SIGNATURE = "void(uint8[::1], uint8[::1], uint32[::1], uint32[::1], uint64[::1], int64)"
# Lazy (compiled at the first launch, then cached on disk): an eager signature would
# need a device at import time, and the kernel report imports this module without one.
_kernel = kernel(_chacha20_xor_kernel)


def chacha20_xor(src, dst, keys, table, unit_start, n_segments, n_units, *, stream=0):
    """Queue the keystream XOR of every segment on ``stream``.

    ``src``, ``dst``: 1-D uint8 device arrays (may be the same array);
    ``keys``: ``uint32[n_keys, 8]`` device array, 16-byte aligned; ``table``, ``unit_start``: device
    copies of :func:`pack_segments`' output; ``n_segments``: rows of the table;
    ``n_units``: ``unit_start[-1]`` as a host integer (the launch geometry needs
    it, and reading it from the device would synchronise). Checks nothing: the
    backend validates offsets, lengths and counter limits before calling.
    """
    launch(_kernel, int(n_units), (src, dst, _flat(keys), _flat(table), unit_start, np.int64(n_segments)),
           stream)


def _flat(array):
    """``array`` as 1-D: itself when it is (the backend's tables are), since every reshape of a
    device array makes a new one, which costs the host tens of microseconds."""
    return array if array.ndim == 1 else array.reshape(-1)


KERNEL_REPORT = [
    ReportEntry(
        name="chacha20_xor",
        pyfunc=_chacha20_xor_kernel,
        signature=_SIGNATURE,
        bytes_per_iteration=BLOCK_BYTES,
        data_path_ops=("STG.E.128",),  # full aligned blocks are written 16 bytes at a time
        inner_loops=(
            InnerLoop("find_segment: binary search over the segment table"),
            InnerLoop("byte path: unaligned or partial blocks at a segment's edges"),
        ),
        note="one thread per 64-byte block; 128-bit path for aligned full blocks, byte path via shared memory",
    ),
]
