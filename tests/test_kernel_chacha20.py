"""kernels/chacha20.py against cryptography (OpenSSL) and libsodium.

Runs in numba's CUDA simulator when no GPU is present (tests/conftest.py), so
inputs stay small: a few KiB and a few segments per launch.
"""
from __future__ import annotations

import ctypes
import os
import struct

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from gpucrypt.kernels import chacha20 as cc

pytestmark = pytest.mark.cudasim

LENGTHS = [0, 1, 15, 16, 17, 63, 64, 65, 4095, 4096, 5000]


# --------------------------------------------------------------------------- references

def reference_xor(key: bytes, nonce12: bytes, position: int, data: bytes) -> bytes:
    """cryptography's ChaCha20 (32-bit counter) from keystream byte ``position``."""
    counter, skip = divmod(position, 64)
    enc = Cipher(algorithms.ChaCha20(key, struct.pack("<I", counter) + nonce12), None).encryptor()
    enc.update(bytes(skip))
    return enc.update(data)


def _libsodium():
    import nacl._sodium

    lib = ctypes.CDLL(nacl._sodium.__file__)
    fn = lib.crypto_stream_chacha20_xor_ic
    fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulonglong, ctypes.c_char_p,
                   ctypes.c_uint64, ctypes.c_char_p]
    fn.restype = ctypes.c_int
    return fn


def libsodium_djb_xor(key: bytes, counter64: int, nonce8: bytes, data: bytes) -> bytes:
    """libsodium's crypto_stream_chacha20_xor_ic: 64-bit block counter, 64-bit nonce."""
    out = ctypes.create_string_buffer(len(data))
    assert _libsodium()(out, data, len(data), nonce8, counter64, key) == 0
    return out.raw


# --------------------------------------------------------------------------- launching

def aligned_zeros(n: int, align: int = 64) -> np.ndarray:
    """uint8[n] whose first byte is ``align``-aligned, so tests choose the alignment of offsets."""
    raw = np.zeros(n + align, dtype=np.uint8)
    shift = (-raw.ctypes.data) % align
    return raw[shift:shift + n]


def to_device(a: np.ndarray):
    from numba import cuda

    return cuda.to_device(np.ascontiguousarray(a))


def launch(src: np.ndarray, dst: np.ndarray | None, keys: np.ndarray, segments: list[dict]) -> np.ndarray:
    """Run chacha20_xor once over ``segments``; returns dst (src when dst is None: in place)."""
    table, unit_start = cc.pack_segments(
        [s["src"] for s in segments], [s["dst"] for s in segments], [s["length"] for s in segments],
        [s["key"] for s in segments], np.array([s["nonce"] for s in segments], dtype=np.uint32).reshape(-1, 3),
        [s["position"] for s in segments],
    )
    d_src = to_device(src)
    d_dst = d_src if dst is None else to_device(dst)
    cc.chacha20_xor(d_src, d_dst, to_device(keys), to_device(table), to_device(unit_start),
                    len(segments), int(unit_start[-1]))
    if dst is None:
        src[:] = d_src.copy_to_host()
        return src
    # the input must be left unchanged
    assert np.array_equal(d_src.copy_to_host(), src)
    return d_dst.copy_to_host()


@pytest.fixture
def rng():
    return np.random.default_rng(int.from_bytes(os.urandom(4), "little"))


def _key_nonce(rng):
    key, nonce12 = rng.bytes(32), rng.bytes(12)
    return key, nonce12, cc.key_words(key)[None].copy(), cc.nonce_words(nonce12)


# --------------------------------------------------------------------------- tests

@pytest.mark.parametrize("in_place", [True, False], ids=["in_place", "out_of_place"])
def test_lengths_match_cryptography(rng, in_place):
    """Every length of the property kit, each as its own segment, in one launch, random positions."""
    key, nonce12, keys, nonce_w = _key_nonce(rng)
    segments, offset = [], 0
    for length in LENGTHS:
        position = int(rng.integers(0, 1 << 20)) * 64 + int(rng.integers(0, 64))
        segments.append(dict(src=offset, dst=offset, length=length, key=0, nonce=nonce_w, position=position))
        offset += length + 48  # gaps between segments must stay untouched; keeps offsets 16-aligned
    plain = aligned_zeros(offset)
    plain[:] = rng.integers(0, 256, offset, dtype=np.uint8)
    original = plain.copy()
    if in_place:
        out = launch(plain, None, keys, segments)
    else:
        canary = rng.integers(0, 256, offset, dtype=np.uint8)
        dst = aligned_zeros(offset)
        dst[:] = canary
        out = launch(plain, dst, keys, segments)
    expected = original.copy() if in_place else canary.copy()
    for s in segments:
        lo, hi = s["src"], s["src"] + s["length"]
        expected[lo:hi] = np.frombuffer(reference_xor(key, nonce12, s["position"], original[lo:hi].tobytes()), np.uint8)
    assert out.tobytes() == expected.tobytes()


def test_block_aligned_positions_and_offsets(rng):
    """Block-aligned position and 16-aligned buffers: the 128-bit path, plus partial tail."""
    key, nonce12, keys, nonce_w = _key_nonce(rng)
    n = 64 * 20 + 37
    src = aligned_zeros(n)
    src[:] = rng.integers(0, 256, n, dtype=np.uint8)
    out = launch(src.copy(), aligned_zeros(n), keys,
                 [dict(src=0, dst=0, length=n, key=0, nonce=nonce_w, position=64 * 5)])
    assert out.tobytes() == reference_xor(key, nonce12, 64 * 5, src.tobytes())


@pytest.mark.parametrize("src_shift,dst_shift,head", [(1, 1, 0), (3, 7, 0), (0, 16, 5), (5, 0, 13), (16, 32, 0), (8, 8, 8)])
def test_unaligned_offsets(rng, src_shift, dst_shift, head):
    """src/dst offsets and keystream positions at every kind of misalignment."""
    key, nonce12, keys, nonce_w = _key_nonce(rng)
    n = 700
    src = aligned_zeros(n + 64)
    src[:] = rng.integers(0, 256, n + 64, dtype=np.uint8)
    canary = rng.integers(0, 256, n + 64, dtype=np.uint8)
    dst = aligned_zeros(n + 64)
    dst[:] = canary
    position = 64 * 3 + head
    out = launch(src, dst, keys, [dict(src=src_shift, dst=dst_shift, length=n, key=0, nonce=nonce_w, position=position)])
    expected = canary.copy()
    expected[dst_shift:dst_shift + n] = np.frombuffer(
        reference_xor(key, nonce12, position, src[src_shift:src_shift + n].tobytes()), np.uint8)
    assert out.tobytes() == expected.tobytes()


def test_many_segments_one_launch(rng):
    """Different keys, nonces, offsets and positions, including empty segments, packed tightly."""
    n_keys = 5
    keys_b = [rng.bytes(32) for _ in range(n_keys)]
    keys = np.stack([cc.key_words(k) for k in keys_b])
    segments, expected_parts = [], []
    src_off = 0
    for i in range(24):
        length = int(rng.choice([0, 1, 17, 63, 64, 65, 130, 200, 333]))
        key = int(rng.integers(0, n_keys))
        nonce12 = rng.bytes(12)
        position = int(rng.integers(0, 1 << 30))
        segments.append(dict(src=src_off, dst=None, length=length, key=key, nonce=cc.nonce_words(nonce12),
                             position=position))
        expected_parts.append((src_off, key, nonce12, position, length))
        src_off += length + int(rng.integers(0, 3))
    total = src_off
    # destination in reversed order of segments, to exercise independent dst offsets
    dst_off = 0
    for s in reversed(segments):
        s["dst"] = dst_off
        dst_off += s["length"]
    src = aligned_zeros(total)
    src[:] = rng.integers(0, 256, total, dtype=np.uint8)
    canary = rng.integers(0, 256, max(dst_off, 1), dtype=np.uint8)
    dst = aligned_zeros(max(dst_off, 1))
    dst[:] = canary
    out = launch(src, dst, keys, segments)
    expected = canary.copy()
    for s, (so, key, nonce12, position, length) in zip(segments, expected_parts):
        expected[s["dst"]:s["dst"] + length] = np.frombuffer(
            reference_xor(keys_b[key], nonce12, position, src[so:so + length].tobytes()), np.uint8)
    assert out.tobytes() == expected.tobytes()


def test_chunked_equals_whole(rng):
    """Consecutive slices of one message as separate segments equal the whole message."""
    key, nonce12, keys, nonce_w = _key_nonce(rng)
    n = 1000
    src = aligned_zeros(n)
    src[:] = rng.integers(0, 256, n, dtype=np.uint8)
    cuts = [0, 1, 64, 100, 129, 500, 999, n]
    segments = [dict(src=a, dst=a, length=b - a, key=0, nonce=nonce_w, position=7 + a) for a, b in zip(cuts, cuts[1:])]
    out = launch(src, aligned_zeros(n), keys, segments)
    assert out.tobytes() == reference_xor(key, nonce12, 7, src.tobytes())


def test_counter_near_32_bit_limit(rng):
    """The last blocks before the 32-bit counter would wrap, up to the exact limit."""
    key, nonce12, keys, nonce_w = _key_nonce(rng)
    n = 64 * 3
    position = cc.COUNTER32_LIMIT - n  # ends exactly at counter 2**32 - 1's last byte
    src = aligned_zeros(n)
    src[:] = rng.integers(0, 256, n, dtype=np.uint8)
    out = launch(src, aligned_zeros(n), keys, [dict(src=0, dst=0, length=n, key=0, nonce=nonce_w, position=position)])
    assert out.tobytes() == reference_xor(key, nonce12, position, src.tobytes())
    # cryptography refuses one byte more: that is the limit the backend must enforce
    with pytest.raises(ValueError):
        reference_xor(key, nonce12, position, bytes(n + 1))



def test_counter_64_bit_carry_matches_libsodium(rng):
    """counter_bits=64: the counter carries into state word 13 (libsodium / OpenSSL raw ChaCha20)."""
    key = rng.bytes(32)
    nonce8 = rng.bytes(8)
    high = int(rng.integers(0, 2**32 - 1))
    counter64 = (high << 32) | (2**32 - 2)  # two blocks before the low word wraps
    n = 64 * 4 + 9
    position = ((2**32 - 2) * 64) + 0
    nonce_w = np.array([high, *struct.unpack("<2I", nonce8)], dtype=np.uint32)
    src = aligned_zeros(n)
    src[:] = rng.integers(0, 256, n, dtype=np.uint8)
    out = launch(src, aligned_zeros(n), cc.key_words(key)[None].copy(),
                 [dict(src=0, dst=0, length=n, key=0, nonce=nonce_w, position=position)])
    assert out.tobytes() == libsodium_djb_xor(key, counter64, nonce8, src.tobytes())


def test_rfc7539_vectors():
    """RFC 7539 (8439) appendix A.2, from cryptography_vectors, all in one launch."""
    import cryptography_vectors

    path = os.path.join("ciphers", "ChaCha20", "rfc7539.txt")
    vectors, cur = [], {}
    with cryptography_vectors.open_vector_file(path, "r") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, _, value = (p.strip() for p in line.partition("="))
            if name == "COUNT" and cur:
                vectors.append(cur)
                cur = {}
            cur[name] = value
    vectors.append(cur)
    assert len(vectors) >= 3

    keys_b = [bytes.fromhex(v["KEY"]) for v in vectors]
    keys = np.stack([cc.key_words(k) for k in keys_b])
    plains = [bytes.fromhex(v["PLAINTEXT"]) for v in vectors]
    total = sum(len(p) for p in plains)
    src = aligned_zeros(total)
    segments, off = [], 0
    for i, (v, p) in enumerate(zip(vectors, plains)):
        src[off:off + len(p)] = np.frombuffer(p, np.uint8)
        segments.append(dict(src=off, dst=off, length=len(p), key=i, nonce=cc.nonce_words(bytes.fromhex(v["NONCE"])),
                             position=int(v["INITIAL_BLOCK_COUNTER"]) * 64))
        off += len(p)
    out = launch(src, None, keys, segments)
    off = 0
    for v, p in zip(vectors, plains):
        assert out[off:off + len(p)].tobytes().hex() == v["CIPHERTEXT"].lower()
        off += len(p)


def test_empty_launch():
    """No work: no launch, nothing touched."""
    table, unit_start = cc.pack_segments([0], [0], [0], [0], np.zeros((1, 3), np.uint32), [17])
    assert unit_start.tolist() == [0, 0]
    buf = to_device(np.arange(16, dtype=np.uint8))  # src and dst: nothing may change it
    cc.chacha20_xor(buf, buf, to_device(np.zeros((1, 8), np.uint32)),
                    to_device(table), to_device(unit_start), 1, 0)
    assert buf.copy_to_host().tolist() == list(range(16))


def test_pack_segments_layout():
    table, unit_start = cc.pack_segments([1 << 33], [5], [130], [3], np.array([[7, 8, 9]], np.uint32), [64 * 10 + 60])
    row = table[0]
    assert table.dtype == np.uint32 and table.shape == (1, cc.TABLE_WORDS)
    assert (int(row[cc.W_SRC]) | int(row[cc.W_SRC + 1]) << 32) == 1 << 33
    assert int(row[cc.W_HEAD]) == 60 and int(row[cc.W_KEY]) == 3
    assert (int(row[cc.W_COUNTER]), int(row[cc.W_COUNTER + 1])) == (10, 7)
    assert (int(row[cc.W_NONCE12]), int(row[cc.W_NONCE12 + 1])) == (8, 9)
    assert unit_start.tolist() == [0, 3]  # 60 + 130 = 190 bytes of keystream: 3 blocks
