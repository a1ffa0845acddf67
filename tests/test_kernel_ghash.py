"""Tests of kernels/ghash.py: GPU GHASH / AES-GCM tags against `cryptography`.

The reference is `cryptography` throughout: H = AES-ECB_K(0^128) and E_K(J0) are
computed with it on the host and copied to the device, and tags are compared
with ``AESGCM(key).encrypt(...)[-16:]`` and with the NIST CAVP GCM vectors (all
three nonce lengths, non-96-bit ones through the kernel's J0 path). Small chunk
lengths (``chunk_blocks``) force several chunks and several combine levels on
messages of a few hundred bytes, which keeps the simulator fast; the default is
exercised too. Both level-0 kernels run: the mixed-key one (default) and, with
``one_key=True``, the table kernel, whose table indices are also recorded and checked
against the input's nibbles.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from numba import cuda

from _layout import pack_buffer
from _vectors import load, unhex
from gpucrypt.kernels import ghash as kg

pytestmark = pytest.mark.cudasim

EDGE_LENGTHS = (0, 1, 15, 16, 17, 63, 64, 65, 1000, 5000)


def aes_block(key: bytes, block: bytes) -> bytes:
    """AES_K(block), the reference block cipher."""
    return Cipher(algorithms.AES(key), modes.ECB()).encryptor().update(block)


def device_ghash_tags(aads, cts, h_list, ekj0_list, *, chunk_blocks=None,
                      rng=None, scratch=False, one_key=False, random_gaps=True):
    """Run ghash_aead_tags on the messages; returns the tags as a list of 16-byte strings."""
    rng = rng or np.random.default_rng(0)
    chunk_blocks = chunk_blocks or kg.DEFAULT_CHUNK_BLOCKS
    aad_buf, aad_offsets = pack_buffer(aads, rng, random_gaps=random_gaps)
    ct_buf, ct_offsets = pack_buffer(cts, rng, random_gaps=random_gaps)
    n = len(cts)
    table = kg.pack_messages(aad_offsets, [len(a) for a in aads], ct_offsets, [len(c) for c in cts],
                             chunk_blocks=chunk_blocks)
    h = np.frombuffer(b"".join(h_list), dtype=np.uint8).reshape(n, 16)
    e = np.frombuffer(b"".join(ekj0_list), dtype=np.uint8).reshape(n, 16)
    tags = cuda.to_device(np.full((n, 16), 0xA5, dtype=np.uint8))
    stream = cuda.stream()
    kwargs = {}
    if scratch:
        kwargs["scratch"] = kg.ghash_scratch(table, n, stream, one_key=one_key)
    kg.ghash_aead_tags(cuda.to_device(aad_buf), cuda.to_device(ct_buf), table, n,
                       cuda.to_device(h), cuda.to_device(e), tags, stream=stream, one_key=one_key, **kwargs)
    stream.synchronize()
    out = tags.copy_to_host()
    return [bytes(row) for row in out]


def device_j0(keys_h, ivs, *, chunk_blocks=None, one_key=False):
    """J0 for arbitrary-length IVs through the kernel: GHASH_H(IV || pad || 0^64 || be64(8|IV|))."""
    n = len(ivs)
    return device_ghash_tags([b""] * n, ivs, keys_h, [bytes(16)] * n, chunk_blocks=chunk_blocks,
                             one_key=one_key, random_gaps=False)


def reference_case(rng, key_len, aad_len, ct_len, nonce_len=12):
    """(key, nonce, aad, ct, tag) from cryptography's AESGCM."""
    key, nonce = rng.bytes(key_len), rng.bytes(nonce_len)
    aad, pt = rng.bytes(aad_len), rng.bytes(ct_len)
    sealed = AESGCM(key).encrypt(nonce, pt, aad)
    return key, nonce, aad, sealed[:-16], sealed[-16:]


def tags_for_96bit(cases, **kwargs):
    """Device tags for 96-bit-nonce cases, H and E_K(J0) from the reference AES."""
    h = [aes_block(key, bytes(16)) for key, *_ in cases]
    e = [aes_block(key, nonce + b"\x00\x00\x00\x01") for key, nonce, *_ in cases]
    return device_ghash_tags([c[2] for c in cases], [c[3] for c in cases], h, e, **kwargs)


# --------------------------------------------------------------------------- differential


@pytest.mark.parametrize("chunk_blocks", [2, 4])
def test_edge_lengths_many_messages_one_call(chunk_blocks):
    """Every ct length and every aad length of EDGE_LENGTHS, mixed, in one call (multi-level)."""
    rng = np.random.default_rng(chunk_blocks)
    pairs = [(0, c) for c in EDGE_LENGTHS] + [(a, 17) for a in EDGE_LENGTHS]
    pairs += [(a, c) for a in (1, 16, 65) for c in (15, 64, 1000)]
    cases = [reference_case(rng, (16, 32)[i % 2], a, c) for i, (a, c) in enumerate(pairs)]
    got = tags_for_96bit(cases, chunk_blocks=chunk_blocks, rng=rng)
    want = [c[4] for c in cases]
    bad = [(pairs[i], chunk_blocks) for i in range(len(cases)) if got[i] != want[i]]
    assert not bad


def test_chunk_boundaries():
    """Block counts n*L-1, n*L, n*L+1 around L = 8 (and total blocks incl. length block)."""
    rng = np.random.default_rng(7)
    L = 8
    # total blocks = ceil(aad/16) + ceil(ct/16) + 1
    totals = [L - 1, L, L + 1, 2 * L - 1, 2 * L, 2 * L + 1, L * L - 1, L * L, L * L + 1]
    cases = []
    for t in totals:
        ct_blocks = t - 1 - 1
        cases.append(reference_case(rng, 16, 5, ct_blocks * 16))            # aad 1 block
        cases.append(reference_case(rng, 32, 0, (t - 1) * 16 - 3))         # ct only, partial
    got = tags_for_96bit(cases, chunk_blocks=L, rng=rng)
    assert got == [c[4] for c in cases]


def test_default_chunk_and_preallocated_scratch():
    """Default L (one chunk for these), and a 5000+ byte message spanning several chunks."""
    rng = np.random.default_rng(3)
    cases = [reference_case(rng, 32, a, c) for a, c in ((0, 0), (13, 1000), (40, 5000), (3, 16 * 64 - 16))]
    assert tags_for_96bit(cases, scratch=True, rng=rng) == [c[4] for c in cases]


def test_empty_message_tag_is_ekj0():
    """No aad, no ct: GHASH of the zero length block is 0, so the tag is E_K(J0)."""
    rng = np.random.default_rng(4)
    cases = [reference_case(rng, 16, 0, 0) for _ in range(3)]
    got = tags_for_96bit(cases, chunk_blocks=2, rng=rng)
    assert got == [c[4] for c in cases]
    assert got == [aes_block(c[0], c[1] + b"\0\0\0\1") for c in cases]


def test_no_messages_is_a_no_op():
    table = kg.pack_messages([], [], [], [])
    tags = cuda.to_device(np.zeros((0, 16), dtype=np.uint8))
    empty = cuda.to_device(np.zeros(1, dtype=np.uint8))
    blocks = cuda.to_device(np.zeros((0, 16), dtype=np.uint8))
    kg.ghash_aead_tags(empty, empty, table, 0, blocks, blocks, tags)


@pytest.mark.parametrize("chunk_blocks", [2, 64])
def test_arbitrary_nonce_lengths_through_j0_path(chunk_blocks):
    """Nonces of 8..64 bytes: J0 from the kernel (A empty, C = IV, E_K(J0) = 0), then the tag."""
    rng = np.random.default_rng(11)
    nonce_lengths = (8, 13, 16, 17, 32, 64)
    cases = [reference_case(rng, (16, 32)[i % 2], int(rng.integers(0, 40)), int(rng.integers(0, 200)),
                            nonce_len=nl) for i, nl in enumerate(nonce_lengths)]
    h = [aes_block(c[0], bytes(16)) for c in cases]
    j0 = device_j0(h, [c[1] for c in cases], chunk_blocks=chunk_blocks)
    e = [aes_block(c[0], j) for c, j in zip(cases, j0)]
    got = device_ghash_tags([c[2] for c in cases], [c[3] for c in cases], h, e, chunk_blocks=chunk_blocks)
    assert got == [c[4] for c in cases]


def test_tampering_changes_the_tag():
    """A tag must depend on every ct/aad bit and on the lengths (differs from the reference)."""
    rng = np.random.default_rng(5)
    key, nonce, aad, ct, tag = reference_case(rng, 16, 20, 70)
    flipped_ct = bytearray(ct)
    flipped_ct[69] ^= 0x01
    flipped_aad = bytearray(aad)
    flipped_aad[0] ^= 0x80
    variants = [(aad, bytes(flipped_ct)), (bytes(flipped_aad), ct), (aad, ct + b"\0"), (aad + b"\0", ct)]
    h = [aes_block(key, bytes(16))] * len(variants)
    e = [aes_block(key, nonce + b"\0\0\0\1")] * len(variants)
    got = device_ghash_tags([v[0] for v in variants], [v[1] for v in variants], h, e, chunk_blocks=2)
    assert all(g != tag for g in got)
    assert len(set(got)) == len(got)


# --------------------------------------------------------------------------- one key: the table kernel

#: Lengths around the table path's edges (S = 4 blocks per group): nothing, partial blocks, one
#: group, a group and remainders, groups across chunks (L = 4 and 8 below), a partial last block.
ONE_KEY_CT = (0, 1, 15, 16, 17, 64, 65, 16 * 5, 16 * 7 + 9, 16 * 9, 16 * 17 + 3, 16 * 40)
ONE_KEY_AAD = (0, 1, 13, 16, 64, 16 * 6 + 5)


def one_key_cases(rng, pairs, key_len=32, nonce_len=12):
    key = rng.bytes(key_len)
    return [reference_case_with_key(rng, key, a, c, nonce_len) for a, c in pairs]


def reference_case_with_key(rng, key, aad_len, ct_len, nonce_len=12):
    nonce, aad, pt = rng.bytes(nonce_len), rng.bytes(aad_len), rng.bytes(ct_len)
    sealed = AESGCM(key).encrypt(nonce, pt, aad)
    return key, nonce, aad, sealed[:-16], sealed[-16:]


@pytest.mark.parametrize("chunk_blocks", [4, 64])
def test_one_key_table_kernel_edge_lengths(chunk_blocks):
    """One key, fields 16-byte aligned (the table path) and not (byte path), every edge length,
    several chunks and combine levels at L = 4; tags equal cryptography's."""
    rng = np.random.default_rng(40 + chunk_blocks)
    pairs = [(0, c) for c in ONE_KEY_CT] + [(a, 16 * 9) for a in ONE_KEY_AAD] + [(65, 16 * 17 + 3)]
    cases = one_key_cases(rng, pairs)
    h = [aes_block(cases[0][0], bytes(16))] * len(cases)
    e = [aes_block(c[0], c[1] + b"\0\0\0\1") for c in cases]
    want = [c[4] for c in cases]
    for gaps in (False, True):
        got = device_ghash_tags([c[2] for c in cases], [c[3] for c in cases], h, e, chunk_blocks=chunk_blocks,
                                rng=rng, one_key=True, random_gaps=gaps, scratch=gaps)
        assert [pairs[i] for i in range(len(cases)) if got[i] != want[i]] == [], gaps


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=st.lists(st.tuples(st.integers(0, 90), st.integers(0, 16 * 24)), min_size=1, max_size=4),
       key_len=st.sampled_from([16, 24, 32]), chunk_blocks=st.sampled_from([4, 8]),
       seed=st.integers(0, 2**32 - 1))
def test_one_key_table_kernel_matches_cryptography(lengths, key_len, chunk_blocks, seed):
    rng = np.random.default_rng(seed)
    cases = one_key_cases(rng, lengths, key_len)
    h = [aes_block(cases[0][0], bytes(16))] * len(cases)
    e = [aes_block(c[0], c[1] + b"\0\0\0\1") for c in cases]
    got = device_ghash_tags([c[2] for c in cases], [c[3] for c in cases], h, e, chunk_blocks=chunk_blocks,
                            rng=rng, one_key=True, random_gaps=bool(seed % 2))
    assert got == [c[4] for c in cases]


def test_one_key_non_96_bit_nonces_through_j0():
    """J0 = GHASH_H(IV ..) by the table kernel (IVs of 8..80 bytes: groups in the IV), then the tags."""
    rng = np.random.default_rng(12)
    key = rng.bytes(16)
    cases = [reference_case_with_key(rng, key, int(rng.integers(0, 40)), int(rng.integers(0, 300)), nl)
             for nl in (8, 13, 16, 17, 64, 80)]
    h = [aes_block(key, bytes(16))] * len(cases)
    j0 = device_j0(h, [c[1] for c in cases], chunk_blocks=4, one_key=True)
    e = [aes_block(key, j) for j in j0]
    got = device_ghash_tags([c[2] for c in cases], [c[3] for c in cases], h, e, chunk_blocks=4, one_key=True)
    assert got == [c[4] for c in cases]


def test_table_indices_are_the_public_input_nibbles(monkeypatch):
    """Every table index the kernel uses is a nibble of the ciphertext/associated data at its
    position, for whichever key: recorded at the one lookup function, compared with the
    nibbles of the blocks that take the table path (blocks 2..4 of each group of 4), and
    identical under two different keys (an index that depended on H or the accumulator would
    differ)."""
    from conftest import ON_CUDASIM

    if not ON_CUDASIM:
        pytest.skip("the spy appends to a Python list from inside the device function, which only the "
                    "simulator runs; tests/test_kernels_device.py types the same lookups as the device does")
    recorded = []
    real_lookup = kg.table_lookup

    @cuda.jit(device=True)
    def recording_lookup(tables, index):
        recorded.append(int(index))
        return real_lookup(tables, index)

    monkeypatch.setattr(kg, "table_lookup", recording_lookup)
    rng = np.random.default_rng(21)
    n_blocks = 13   # 3 groups of 4 (9 table blocks) and one block on the product path, one chunk (L = 64)
    aad, ct = b"", rng.bytes(16 * n_blocks)
    logs = []
    for key in (rng.bytes(16), rng.bytes(16)):
        recorded.clear()
        h = [aes_block(key, bytes(16))]
        nonce = rng.bytes(12)
        tag = device_ghash_tags([aad], [ct], h, [aes_block(key, nonce + b"\0\0\0\1")], one_key=True,
                                random_gaps=False)
        pt = Cipher(algorithms.AES(key), modes.CTR(nonce + b"\0\0\0\2")).decryptor().update(ct)
        assert tag == [AESGCM(key).encrypt(nonce, pt, aad)[-16:]]
        logs.append(list(recorded))
    assert logs[0] == logs[1]
    expected = []
    for g in range(n_blocks // 4):
        for j, power in ((1, 3), (2, 2), (3, 1)):
            block = ct[16 * (4 * g + j):16 * (4 * g + j + 1)]
            words = np.frombuffer(block, dtype="<u4")
            for i, w in enumerate(words):
                for q in range(8):
                    row = (power - 1) * 32 + 8 * i + q
                    expected.append(row * 64 + ((int(w) >> (4 * q)) & 15) * 4)
    assert sorted(logs[0]) == sorted(expected)
    assert max(logs[0]) < kg.TABLES_WORDS


# --------------------------------------------------------------------------- NIST CAVP


def cavp_sample(bits: int, every: int):
    """Every ``every``-th record of gcmEncryptExtIV<bits>.rsp (all IV/PT/AAD/tag-length sections)."""
    records = load("ciphers", "AES", "GCM", f"gcmEncryptExtIV{bits}.rsp")
    return [r for i, r in enumerate(records) if i % every == 0]


@pytest.mark.parametrize("bits", [128, 192, 256])
def test_nist_cavp_gcm_encrypt_vectors(bits):
    """NIST GCM vectors (IV 8, 96, 1024 bits; truncated tags compare as prefixes), one call each."""
    records = cavp_sample(bits, 97)
    assert {int(r["section"]["ivlen"]) for r in records} == {8, 96, 1024}
    keys = [unhex(r["key"]) for r in records]
    ivs = [unhex(r["iv"]) for r in records]
    h = [aes_block(k, bytes(16)) for k in keys]
    # J0: 96-bit IVs the standard way, others through the kernel.
    odd = [i for i, iv in enumerate(ivs) if len(iv) != 12]
    j0_odd = device_j0([h[i] for i in odd], [ivs[i] for i in odd], chunk_blocks=2)
    j0 = [iv + b"\0\0\0\1" for iv in ivs]
    for i, j in zip(odd, j0_odd):
        j0[i] = j
    e = [aes_block(k, j) for k, j in zip(keys, j0)]
    got = device_ghash_tags([unhex(r.get("aad")) for r in records], [unhex(r.get("ct")) for r in records],
                            h, e, chunk_blocks=4)
    want = [unhex(r["tag"]) for r in records]
    bad = [i for i in range(len(records)) if got[i][: len(want[i])] != want[i]]
    assert not bad, [records[i] for i in bad[:3]]


# --------------------------------------------------------------------------- host table


def test_pack_messages_levels():
    """Level unit counts: blocks -> ceil(/L) repeatedly until one unit per message."""
    t = kg.pack_messages([0, 0], [0, 16], [0, 0], [16 * 30, 0], chunk_blocks=4)
    # message 0: 30 + 1 = 31 blocks -> 8 -> 2 -> 1; message 1: 1 + 1 = 2 -> 1 -> 1 -> 1
    assert t.units_total == (9, 3, 2)
    assert t.unit_start.tolist() == [[0, 8, 9], [0, 2, 3], [0, 1, 2]]
    with pytest.raises(ValueError):
        kg.pack_messages([0], [0], [0], [0], chunk_blocks=3)
