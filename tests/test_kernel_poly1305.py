"""Tests of kernels/poly1305.py: parallel RFC 8439 AEAD tags against `cryptography`.

The reference is `cryptography` throughout: one-time keys come from its ChaCha20
(block 0, counter 0), tags from its ChaCha20Poly1305 and Poly1305.  Small chunk
lengths (``chunk_blocks``) and combine widths force the multi-span and
multi-level paths on messages of a few hundred bytes, which keeps the simulator
fast; the defaults are exercised too.
"""
from __future__ import annotations

import struct

import numpy as np
import pytest
from cryptography.hazmat.primitives import poly1305 as reference_poly1305
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from numba import cuda

from _layout import pack_buffer
from _vectors import load, unhex
from gpucrypt.kernels import poly1305 as kp

pytestmark = pytest.mark.cudasim

EDGE_LENGTHS = (0, 1, 15, 16, 17, 63, 64, 65, 1000, 5000)
#: (chunk_blocks, combine_width): defaults (one span up to 32 KiB), then settings
#: where a 5000-byte message needs several spans and several combine levels.
GEOMETRIES = ((kp.DEFAULT_CHUNK_BLOCKS, kp.DEFAULT_COMBINE_WIDTH), (1, 2), (2, 4), (4, 64))


def one_time_key(key: bytes, nonce: bytes) -> bytes:
    """r || s of RFC 8439 §2.6: the first 32 bytes of ChaCha20 block 0 (counter 0)."""
    encryptor = Cipher(algorithms.ChaCha20(key, b"\0\0\0\0" + nonce), mode=None).encryptor()
    return encryptor.update(bytes(32))


def mac_data(aad: bytes, ct: bytes) -> bytes:
    """RFC 8439 §2.8 Poly1305 input, built independently of the kernel."""
    def pad16(x: bytes) -> bytes:
        return bytes(-len(x) % 16)
    return aad + pad16(aad) + ct + pad16(ct) + struct.pack("<QQ", len(aad), len(ct))


def device_tags(aads, cts, keys, *, chunk_blocks=kp.DEFAULT_CHUNK_BLOCKS, combine_width=kp.DEFAULT_COMBINE_WIDTH,
                rng=None, gaps=False, misalign=0, key_words=False, tag_words=False, scratch=False):
    """Run poly1305_aead_tags on the messages; returns the tags as a list of bytes.

    ``misalign`` shifts both device buffers by that many bytes from an aligned
    allocation (exercises the 8-byte-aligned fast path vs. the byte path).
    """
    rng = rng or np.random.default_rng(0)
    aad_host, aad_offsets = pack_buffer(aads, rng, random_gaps=gaps)
    ct_host, ct_offsets = pack_buffer(cts, rng, random_gaps=gaps)
    table = kp.pack_messages(aad_offsets, [len(a) for a in aads], ct_offsets, [len(c) for c in cts],
                             chunk_blocks=chunk_blocks, combine_width=combine_width)
    aad_dev = cuda.to_device(np.concatenate([np.zeros(misalign, np.uint8), aad_host]))[misalign:]
    ct_dev = cuda.to_device(np.concatenate([np.zeros(misalign, np.uint8), ct_host]))[misalign:]
    key_host = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), 32).copy()
    if key_words:
        key_host = key_host.view("<u4").astype(np.uint32)
    tags_dev = cuda.device_array((len(keys), 4), np.uint32) if tag_words else cuda.device_array((len(keys), 16), np.uint8)
    kwargs = {}
    if scratch:
        kwargs["scratch"] = cuda.to_device(np.full(table.scratch_words + 7, 0xDEADBEEF, np.uint32))
    kp.poly1305_aead_tags(aad_dev, ct_dev, table, len(keys), cuda.to_device(key_host), tags_dev, **kwargs)
    tags = tags_dev.copy_to_host()
    if tag_words:
        tags = tags.astype("<u4").view(np.uint8)
    # Inputs are left as they were.
    assert np.array_equal(aad_dev.copy_to_host(), aad_host)
    assert np.array_equal(ct_dev.copy_to_host(), ct_host)
    return [bytes(t) for t in tags]


def random_aead_messages(rng, length_pairs):
    """(aads, cts, one-time keys, expected tags) from cryptography's ChaCha20Poly1305."""
    aads, cts, keys, expected = [], [], [], []
    for aad_len, pt_len in length_pairs:
        key, nonce = rng.bytes(32), rng.bytes(12)
        aad, pt = rng.bytes(aad_len), rng.bytes(pt_len)
        sealed = ChaCha20Poly1305(key).encrypt(nonce, pt, aad)
        aads.append(aad)
        cts.append(sealed[:-16])
        keys.append(one_time_key(key, nonce))
        expected.append(sealed[-16:])
    return aads, cts, keys, expected


def edge_length_pairs(rng):
    """Every edge length as ct length and as aad length, with a random partner from the set."""
    pairs = [(int(rng.choice(EDGE_LENGTHS[:8])), n) for n in EDGE_LENGTHS]
    pairs += [(n, int(rng.choice(EDGE_LENGTHS[:8]))) for n in EDGE_LENGTHS]
    return pairs


@pytest.mark.parametrize("chunk_blocks,combine_width", GEOMETRIES)
def test_mixed_messages_one_call_match_cryptography(chunk_blocks, combine_width):
    rng = np.random.default_rng(chunk_blocks * 100 + combine_width)
    aads, cts, keys, expected = random_aead_messages(rng, edge_length_pairs(rng))
    got = device_tags(aads, cts, keys, chunk_blocks=chunk_blocks, combine_width=combine_width, rng=rng)
    assert got == expected


@pytest.mark.parametrize("misalign", [0, 3, 8])
def test_unaligned_offsets_and_buffers(misalign):
    """Messages at odd offsets inside buffers that start at odd addresses (byte path)."""
    rng = np.random.default_rng(misalign)
    pairs = [(17, 1000), (0, 333), (5, 64), (64, 129), (3, 0)]
    aads, cts, keys, expected = random_aead_messages(rng, pairs)
    got = device_tags(aads, cts, keys, chunk_blocks=2, combine_width=2, rng=rng, gaps=True, misalign=misalign)
    assert got == expected


def test_chunk_boundaries_around_span_length():
    """ct lengths that put the last blocks exactly on, before and after span and step edges."""
    rng = np.random.default_rng(7)
    chunk_blocks = 2
    span_bytes = kp.TILE_LANES * chunk_blocks * 16  # 1 KiB
    lengths = set()
    for spans in (1, 2):
        for aad_len in (0, 16):
            # mac_data = aad blocks + ct blocks + 1 length block; hit span_bytes exactly and +-1 block/byte.
            base = spans * span_bytes - 16 - aad_len
            lengths.update((aad_len, base + d) for d in (-16, -1, 0, 1, 16) if base + d >= 0)
    aads, cts, keys, expected = random_aead_messages(rng, sorted(lengths))
    assert device_tags(aads, cts, keys, chunk_blocks=chunk_blocks, combine_width=2, rng=rng) == expected


def test_against_poly1305_reference_with_word_arrays_and_scratch():
    """Arbitrary one-time keys (not from ChaCha20) against cryptography's Poly1305 on the built mac data;
    keys and tags passed as uint32 words; caller-provided scratch full of garbage."""
    rng = np.random.default_rng(11)
    pairs = [(0, 0), (1, 1), (16, 16), (200, 700), (0, 1500)]
    aads = [rng.bytes(a) for a, _ in pairs]
    cts = [rng.bytes(c) for _, c in pairs]
    keys = [rng.bytes(32) for _ in pairs]
    expected = [reference_poly1305.Poly1305.generate_tag(k, mac_data(a, c)) for k, a, c in zip(keys, aads, cts)]
    got = device_tags(aads, cts, keys, chunk_blocks=1, combine_width=4, rng=rng,
                      key_words=True, tag_words=True, scratch=True)
    assert got == expected


EXTREME_KEYS = {
    "r_all_clamped_bits_s_all_ones": b"\xff" * 32,  # r = clamp(2^128-1), s = 2^128-1: s carry across 2^128
    "r_zero_s_all_ones": bytes(16) + b"\xff" * 16,  # tag = 2^128-1 + (value 0) for every message
    "r_one_s_zero": b"\x01" + bytes(31),
    "r_all_clamped_bits_s_zero": b"\xff" * 16 + bytes(16),
    "r_low_s_high_bit": b"\xff" * 4 + bytes(12) + bytes(15) + b"\x80",
}


@pytest.mark.parametrize("key_name", sorted(EXTREME_KEYS))
@pytest.mark.parametrize("chunk_blocks,combine_width", [(kp.DEFAULT_CHUNK_BLOCKS, kp.DEFAULT_COMBINE_WIDTH), (1, 2)])
def test_edge_arithmetic(key_name, chunk_blocks, combine_width):
    """0xff blocks drive the accumulator towards 2^130-5 with every limb full; extreme r and s."""
    key = EXTREME_KEYS[key_name]
    pairs = [(0, 0), (16, 16), (0, 48), (255, 1024), (1, 1023), (0, 2048 + 15)]
    aads = [b"\xff" * a for a, _ in pairs]
    cts = [b"\xff" * c for _, c in pairs]
    keys = [key] * len(pairs)
    expected = [reference_poly1305.Poly1305.generate_tag(key, mac_data(a, c)) for a, c in zip(aads, cts)]
    got = device_tags(aads, cts, keys, chunk_blocks=chunk_blocks, combine_width=combine_width)
    assert got == expected


def test_accumulator_equal_to_p_reduces():
    """A message whose polynomial value is exactly p = 2^130-5 before the final reduction.

    With r = 1 (clamping keeps it) the value is the plain sum of the blocks (each + 2^128).
    Two ciphertext blocks and the length block: choose the first ct block so the sum is p.
    """
    key = b"\x01" + bytes(15) + bytes(range(16))
    ct_len = 32
    length_block = int.from_bytes(struct.pack("<QQ", 0, ct_len), "little") + 2**128
    second = 2**127 + 2**128
    p = 2**130 - 5
    first = p - length_block - second  # must be a block value c + 2^128 with c < 2^128
    assert 2**128 <= first < 2**129
    ct = (first - 2**128).to_bytes(16, "little") + (second - 2**128).to_bytes(16, "little")
    expected = reference_poly1305.Poly1305.generate_tag(key, mac_data(b"", ct))
    for chunk_blocks, combine_width in ((kp.DEFAULT_CHUNK_BLOCKS, kp.DEFAULT_COMBINE_WIDTH), (1, 2)):
        assert device_tags([b""], [ct], [key], chunk_blocks=chunk_blocks, combine_width=combine_width) == [expected]
    assert expected == key[16:]  # value p reduces to 0, so the tag is s


def _vector_records():
    records = []
    for name in ("boringssl.txt", "openssl.txt"):
        for rec in load("ciphers", "ChaCha20Poly1305", name):
            key = unhex(rec.get("key"))
            nonce = unhex(rec.get("nonce") or rec.get("iv"))
            aad = unhex(rec.get("ad") if "ad" in rec else rec.get("aad"))
            ct = unhex(rec.get("ct") if "ct" in rec else rec.get("ciphertext"))
            tag = unhex(rec["tag"])
            records.append((f"{name}:{rec['count']}", key, nonce, aad, ct, tag, rec["fail"]))
    return records


def test_chacha20poly1305_vectors():
    """All BoringSSL/OpenSSL ChaCha20-Poly1305 vectors of cryptography_vectors in one launch."""
    records = _vector_records()
    assert len(records) >= 70
    for _, key, nonce, _, _, tag, _ in records:
        assert len(key) == 32 and len(nonce) == 12 and len(tag) == 16
    got = device_tags([r[3] for r in records], [r[4] for r in records],
                      [one_time_key(r[1], r[2]) for r in records])
    for (name, *_, tag, fail), computed in zip(records, got):
        if fail:
            assert computed != tag, name  # records marked to fail carry a wrong tag
        else:
            assert computed == tag, name


def test_pack_messages_levels_and_scratch():
    table = kp.pack_messages([0, 0, 0], [0, 0, 0], [0, 0, 0], [0, 2048 * 16, 5000],
                             chunk_blocks=2, combine_width=4)
    # spans of 64 blocks: 1, ceil(2049/64) = 33, ceil(314/64) = 5
    assert table.group_totals == (39, 9 + 2, 3 + 1, 1)
    assert table.levels == 3
    assert table.power_width == kp.TILE_LANES + 3
    assert table.scratch_words == kp.LIMBS * (3 * table.power_width + 39 + 11 + 4 + 1)
    assert kp.pack_messages([0], [10], [0], [10]).levels == 0


def test_no_messages_is_a_no_op():
    table = kp.pack_messages([], [], [], [])
    tags = cuda.device_array((0, 16), np.uint8)
    empty = cuda.to_device(np.zeros(1, np.uint8))
    kp.poly1305_aead_tags(empty, empty, table, 0, cuda.device_array((0, 32), np.uint8), tags)


@cuda.jit
def _write_tag_kernel(keys, tags, msg, limbs):
    kp.write_tag(keys, tags, msg, limbs[0], limbs[1], limbs[2], limbs[3], limbs[4])


def _write_tag_on_the_gpu(keys, tags, msg, *limbs):
    """``write_tag`` run by a kernel: on the device where there is one, else in the simulator."""
    out = cuda.to_device(tags)
    _write_tag_kernel[1, 1](cuda.to_device(keys), out, msg, cuda.to_device(np.array(limbs, np.uint32)))
    tags[...] = out.copy_to_host()


def test_write_tag_with_the_devices_integer_typing():
    """The simulator runs device code on NumPy scalars, which wrap at 32 bits; on the
    device numba widens ``uint32 << uint32`` to 64 bits. ``numba.njit`` types integers
    as the device compiler does, so ``write_tag``'s body compiled with it must give
    what a kernel gives (the simulator's NumPy answer, or the device's), and both that
    of Python integers: (h + s) mod 2^128."""
    compiled = _njit_device_function(kp, "write_tag")
    rng = np.random.default_rng(5)
    for _ in range(50):
        limbs = rng.integers(0, 1 << 26, 5, dtype=np.uint32)
        keys = rng.integers(0, 1 << 32, (1, 8), dtype=np.uint64).astype(np.uint32)
        h = sum(int(v) << (26 * i) for i, v in enumerate(limbs)) % (2**130 - 5)
        s = sum(int(keys[0, 4 + i]) << (32 * i) for i in range(4))
        want = ((h + s) % 2**128).to_bytes(16, "little")
        for run in (_write_tag_on_the_gpu, compiled):
            tags = np.zeros((1, 4), np.uint32)
            run(keys, tags, 0, *[np.uint32(v) for v in limbs])
            assert tags.tobytes() == want, run


def _njit_device_function(module, name: str):
    """``module.name`` with every device function of ``module`` compiled by ``numba.njit``
    (CPU), each calling the others: the device's integer typing, on the CPU."""
    import types

    import numba

    scope = dict(vars(module))
    device = {n: f for n, f in vars(module).items() if hasattr(f, "py_func")}
    for n, f in device.items():
        scope[n] = numba.njit(types.FunctionType(f.py_func.__code__, scope, n))
    return scope[name]


@pytest.mark.parametrize("chunk_blocks,combine_width,why", [
    (0, 2, "chunk_blocks"), (3, 2, "chunk_blocks"), (1, 1, "combine_width"),
    (1, 3, "combine_width")])
def test_pack_messages_refuses_geometries_it_cannot_use(chunk_blocks, combine_width, why):
    """As ghash.pack_messages refuses its own: combine_width=1 looped forever (the group
    count never shrinks), chunk_blocks=0 made a table with no span to write the tag."""
    with pytest.raises(ValueError, match=f"{why} must be a power of two"):
        kp.pack_messages([0], [0], [0], [16 * 200], chunk_blocks=chunk_blocks,
                         combine_width=combine_width)
