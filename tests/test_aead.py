"""The drop-in AEAD classes against their references, on every backend.

- Known answers: RFC 7539/8439 and BoringSSL/OpenSSL ChaCha20-Poly1305 vectors,
  NIST CAVP GCM vectors (all nonce lengths, 128-bit tags), from ``cryptography_vectors``.
- Differential: hypothesis against ``cryptography``, and against libsodium (PyNaCl)
  for XChaCha20-Poly1305.
- Tampering: any bit of ciphertext, tag, nonce or associated data.
- Go-style properties: round trip, in place, input unchanged, buffer rules.

The ``device`` fixture runs each body on the CPU and on the GPU backend (the
simulator here), where the GPU simulator gets a sample of the large vector sets.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import aead as reference
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gpucrypt
from _reference import reference_seal
from _vectors import load, unhex
from conftest import ON_CUDASIM
from gpucrypt.backends import get_backend

LENGTHS = [0, 1, 15, 16, 17, 63, 64, 65, 4095, 4096, 5000]
CLASSES = {
    "chacha20-poly1305": (gpucrypt.ChaCha20Poly1305, 32, 12),
    "xchacha20-poly1305": (gpucrypt.XChaCha20Poly1305, 32, 24),
    "aes-128-gcm": (gpucrypt.AESGCM, 16, 12),
    "aes-192-gcm": (gpucrypt.AESGCM, 24, 12),
    "aes-256-gcm": (gpucrypt.AESGCM, 32, 12),
}


def check_batch(aead, records) -> None:
    """Every record through ``encrypt_many``/``decrypt_many`` (one batch: one launch per step
    on the GPU). ``records``: (nonce, plaintext, aad, sealed, must_fail)."""
    good = [r for r in records if not r[4]]
    sealed = aead.encrypt_many([(n, p, a) for n, p, a, _, _ in good])
    assert sealed == [r[3] for r in good]
    opened = aead.decrypt_many([(n, c, a) for n, _, a, c, _ in records], allow_failures=True)
    for (nonce, pt, aad, ct, must_fail), got in zip(records, opened):
        assert got is None if must_fail else got == pt


@pytest.mark.parametrize("name", sorted(CLASSES))
@pytest.mark.parametrize("each", [True, False], ids=["each-message", "backend-batch"])
def test_cpu_batches_take_any_iterable_and_refuse_malformed_messages(name, each):
    """On the CPU a batch runs each message as encrypt()/decrypt() would (``each``), or
    through the backend's batch (what a device="auto" object does before it knows that
    it has no GPU): the same bytes, any iterable of messages, a failed tag as None or
    BatchInvalidTag, and gpucrypt's own error for a malformed message."""
    cls, key_len, nonce_len = CLASSES[name]
    aead = cls(os.urandom(key_len), device="cpu")
    aead._all_on_cpu = aead._small_on_cpu = each  # which of the two routes this body runs
    msgs = [(os.urandom(nonce_len), os.urandom(n), aad) for n, aad in ((0, None), (100, b"ad"), (5000, b""))]
    sealed = aead.encrypt_many(m for m in msgs)   # a generator: read once
    assert sealed == [aead.encrypt(*m) for m in msgs] and all(type(x) is bytes for x in sealed)
    opened = aead.decrypt_many((n, c, a) for (n, _, a), c in zip(msgs, sealed))
    assert opened == [d for _, d, _ in msgs] and all(type(x) is bytes for x in opened)
    bad = sealed[1][:-1] + bytes([sealed[1][-1] ^ 1])
    batch = [(n, c, a) for (n, _, a), c in zip(msgs, sealed)]
    assert aead.decrypt_many(batch[:1] + [(msgs[1][0], bad, b"ad")], allow_failures=True) == [b"", None]
    with pytest.raises(gpucrypt.BatchInvalidTag) as info:
        aead.decrypt_many(batch + [(msgs[1][0], bad, b"ad")])
    assert info.value.failed == [3]
    for malformed in ((msgs[0][0], b"data"), b"junk", 7):
        with pytest.raises(TypeError, match="each message must be a"):
            aead.encrypt_many(msgs + [malformed])
        with pytest.raises(TypeError, match="each message must be a"):
            aead.decrypt_many(batch + [malformed])
    with pytest.raises(ValueError, match="[Nn]once"):
        aead.encrypt_many(msgs + [(b"", b"data", None)])
    for bad_aad in (5, "text", np.zeros((4, 4), np.uint8)[:, ::2]):   # never read as bytes
        with pytest.raises((TypeError, ValueError), match="associated_data"):
            aead.encrypt_many(msgs + [(msgs[0][0], b"data", bad_aad)])
    # a message OpenSSL's one call refuses (data of wider items), which gpucrypt composes
    wide = msgs + [(os.urandom(nonce_len), np.arange(8, dtype=np.float32), None)]
    sealed = aead.encrypt_many(iter(m) for m in wide)   # each message read once
    assert sealed == [aead.encrypt(*m) for m in wide]
    assert aead.decrypt_many(iter((n, c, a)) for (n, _, a), c in zip(wide, sealed)) == \
        [bytes(memoryview(d)) for _, d, _ in wide]
    if "gcm" in name:  # cryptography's nonce lengths, in a batch as in one call
        for odd in (os.urandom(5), os.urandom(129)):
            with pytest.raises(ValueError, match="between 8 and 128"):
                aead.encrypt_many(msgs + [(odd, b"data", None)])
            with pytest.raises(ValueError, match="between 8 and 128"):
                aead.decrypt_many(batch + [(odd, bytes(20), None)])


def test_an_auto_object_that_may_have_a_gpu_runs_a_small_batch_message_by_message():
    """device="auto" where a CUDA driver exists (or may): a batch below the GPU threshold
    runs on the CPU message by message, as on a machine without one; a larger one, or a
    malformed one, goes through the general path."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from gpucrypt.backends import AUTO_GPU_THRESHOLD

    key = os.urandom(16)
    aead = gpucrypt.AESGCM(key, device="auto")
    aead._all_on_cpu = False   # as on a machine with a CUDA driver
    small = [(os.urandom(12), os.urandom(1000), None) for _ in range(3)]
    assert aead._runs_on_cpu(small) and aead._runs_on_cpu([(b"n" * 12, np.zeros(10, np.uint32), b"")])
    assert not aead._runs_on_cpu(small + [(os.urandom(12), bytes(AUTO_GPU_THRESHOLD), None)])
    assert not aead._runs_on_cpu(small + [7])
    sealed = aead.encrypt_many(m for m in small)
    assert sealed == [AESGCM(key).encrypt(*m) for m in small]
    assert aead.decrypt_many((n, c, a) for (n, _, a), c in zip(small, sealed)) == [d for _, d, _ in small]
    with pytest.raises(TypeError, match="each message must be a"):
        aead.encrypt_many(small + [7])


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_associated_data_is_a_buffer_and_plaintexts_are_bytes_on_every_path(name):
    """An int or str is not associated data (bytes(5) would be five zero bytes), nor is
    a non-contiguous array; an empty plaintext comes back as bytes however the call went
    (a bytearray nonce takes gpucrypt's general path)."""
    cls, key_len, nonce_len = CLASSES[name]
    aead = cls(os.urandom(key_len), device="cpu")
    nonce = os.urandom(nonce_len)
    for bad_aad in (5, "text", np.zeros((4, 4), np.uint8)[:, ::2]):
        with pytest.raises((TypeError, ValueError), match="associated_data"):
            aead.encrypt(nonce, b"data", bad_aad)
    sealed = aead.encrypt(nonce, b"", None)
    for n in (nonce, bytearray(nonce)):
        assert type(aead.decrypt(n, sealed, None)) is bytes
        assert [type(p) for p in aead.decrypt_many([(n, sealed, None)])] == [bytes]


def check_one_by_one(aead, records) -> None:
    for nonce, pt, aad, sealed, must_fail in records:
        if must_fail:
            with pytest.raises(InvalidTag):
                aead.decrypt(nonce, sealed, aad)
            continue
        assert aead.encrypt(nonce, pt, aad) == sealed
        assert aead.decrypt(nonce, sealed, aad) == pt


def check_records(aead, device: str, records, one_by_one_on_gpu: int = 3) -> None:
    """All records as one batch on every backend; one by one too (a few of them on the GPU
    simulator, where each call costs a kernel launch run in Python)."""
    assert records
    check_batch(aead, records)
    picked = records if device == "cpu" else records[:: max(1, len(records) // one_by_one_on_gpu)]
    check_one_by_one(aead, picked)


# --- known answers -------------------------------------------------------------------------

def _chacha_records():
    out = []
    for name in ("openssl.txt", "boringssl.txt"):
        for r in load("ciphers", "ChaCha20Poly1305", name):
            tag, nonce = unhex(r.get("tag")), unhex(r.get("iv") or r.get("nonce"))
            if len(tag) != 16 or len(nonce) != 12:  # truncated tags / other nonce sizes: not this API
                continue
            out.append(r)
    return out


def test_chacha20poly1305_known_answers(device):
    records = []  # (key, nonce, plaintext, aad, sealed, must_fail)
    for r in _chacha_records():
        sealed = unhex(r.get("ciphertext") or r.get("ct")) + unhex(r["tag"])
        records.append((unhex(r["key"]), unhex(r.get("iv") or r.get("nonce")),
                        unhex(r.get("plaintext") or r.get("in")), unhex(r.get("aad") or r.get("ad")),
                        sealed, r["fail"]))
    assert len(records) >= 60 and any(r[5] for r in records)
    if device == "gpu":  # every record in one batch (a key per message), plus two one by one
        _check_records_one_batch("chacha20-poly1305", records)
        for rec in records[:: len(records) // 2]:
            check_one_by_one(gpucrypt.ChaCha20Poly1305(rec[0], device="gpu"), [rec[1:]])
        return
    for rec in records:
        check_records(gpucrypt.ChaCha20Poly1305(rec[0], device=device), device, [rec[1:]])


GCM_FILES = [f"gcmEncryptExtIV{b}.rsp" for b in (128, 192, 256)] + \
            [f"gcmDecrypt{b}.rsp" for b in (128, 192, 256)]


@pytest.mark.parametrize("filename", GCM_FILES)
def test_aesgcm_nist_vectors(device, filename):
    """Every 128-bit-tag record of the file, on every backend (one batch per key on the GPU)."""
    records = [r for r in load("ciphers", "AES", "GCM", filename) if r["section"]["taglen"] == "128"]
    assert len(records) == 1125
    nonce_lengths = {len(unhex(r["iv"])) for r in records}
    # 1-byte and 128-byte nonces are outside OpenSSL's 8..128 checks: make sure they are here
    assert {1, 12, 128} <= nonce_lengths
    by_key: dict[bytes, list] = {}
    for r in records:
        ct, tag = unhex(r["ct"]), unhex(r["tag"])
        pt = None if r["fail"] else unhex(r["pt"])
        by_key.setdefault(unhex(r["key"]), []).append(
            (unhex(r["iv"]), pt, unhex(r["aad"]), ct + tag, r["fail"]))
    if device == "gpu":  # all keys in one launch: key index per message (the backend: any nonce)
        flat = [(key, *rec) for key, recs in by_key.items() for rec in recs]
        # On a real GPU all records; the simulator runs GHASH's integer carry-less multiplies
        # in Python (tens of ms per block), so there every 25th, still every nonce length.
        flat = flat[:: 1 if not ON_CUDASIM else 25]
        assert {len(f[1]) for f in flat} >= {1, 12, 128}
        _check_records_one_batch("aes-gcm", flat)
        return
    for key, recs in by_key.items():
        # the drop-in takes cryptography's 8..128-byte nonces; the CPU backend every length
        # (gpucrypt's own formats), through OpenSSL's call or composed (CTR + GHASH)
        check_one_by_one(gpucrypt.AESGCM(key, device=device),
                         [r for r in recs if 8 <= len(r[0]) <= 128])
        check_backend_one_by_one(get_backend("cpu").aead("aes-gcm", key), recs)


def check_backend_one_by_one(ctx, records) -> None:
    """Records through a backend's AEAD context (``seal``/``open`` on byte views)."""
    for nonce, pt, aad, sealed, must_fail in records:
        out = bytearray(len(sealed) - 16)
        if must_fail:
            with pytest.raises(InvalidTag):
                ctx.open(nonce, memoryview(sealed), memoryview(aad), memoryview(out))
            assert out == bytes(len(out))
            continue
        ctx.open(nonce, memoryview(sealed), memoryview(aad), memoryview(out))
        assert out == pt
        out = bytearray(len(pt) + 16)
        ctx.seal(nonce, memoryview(pt), memoryview(aad), memoryview(out))
        assert out == sealed


def _check_records_one_batch(algorithm: str, flat) -> None:
    """Records ``(key, nonce, plaintext, aad, sealed, must_fail)`` as one batch through the GPU
    backend: open in place (failures must leave the ciphertext as it was), then seal."""
    from gpucrypt.backends import get_backend

    gpu = get_backend("gpu")
    keys = [f[0] for f in flat]
    nonces = [f[1] for f in flat]
    aads = [f[3] for f in flat]
    sealed = [f[4] for f in flat]
    # device buffers (NumPy arrays under the simulator), in place
    cts = [gpu.to_device(s[:-16]) for s in sealed]
    ok = gpu.open_batch(algorithm, keys, nonces, cts, [s[-16:] for s in sealed], aads, cts)
    assert list(ok) == [not f[5] for f in flat]
    for f, ct, verified in zip(flat, cts, ok):
        assert gpu.to_host(ct).tobytes() == (f[2] if verified else f[4][:-16])
    good = [f for f in flat if not f[5]]
    bufs = [gpu.to_device(f[2]) for f in good]
    tags = gpu.to_host(gpu.seal_batch(algorithm, [f[0] for f in good], [f[1] for f in good], bufs,
                                      [f[3] for f in good], bufs))
    for f, buf, t in zip(good, bufs, tags):
        assert gpu.to_host(buf).tobytes() + t.tobytes() == f[4]


# --- differential ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CLASSES))
def test_matches_reference_at_edge_lengths(device, name):
    cls, key_len, nonce_len = CLASSES[name]
    key = os.urandom(key_len)
    records = []
    # The simulator runs GHASH at tens of ms per block in Python: there the multi-KiB lengths
    # are left to the kernel tests (tests/test_kernel_*.py), which cover them directly.
    lengths = [n for n in LENGTHS if n < 4000] if (device == "gpu" and ON_CUDASIM and "gcm" in name) else LENGTHS
    for length in lengths:
        nonce, data, aad = os.urandom(nonce_len), os.urandom(length), os.urandom(length % 37)
        records.append((nonce, data, aad, reference_seal(name, key, nonce, data, aad), False))
    check_records(cls(key, device=device), device, records)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(sorted(CLASSES)), data=st.binary(max_size=3000), aad=st.binary(max_size=200),
       seed=st.binary(min_size=56, max_size=56))
def test_hypothesis_against_reference_cpu(name, data, aad, seed):
    cls, key_len, nonce_len = CLASSES[name]
    key, nonce = seed[:key_len], seed[32:32 + nonce_len]
    expected = reference_seal(name, key, nonce, data, aad)
    assert cls(key, device="cpu").encrypt(nonce, data, aad) == expected


@settings(max_examples=40, deadline=None)
@given(data=st.binary(max_size=2000), aad=st.binary(max_size=100),
       nonce=st.binary(min_size=0, max_size=200), key=st.binary(min_size=32, max_size=32))
def test_gcm_nonce_lengths_drop_in_and_backend(data, aad, nonce, key):
    """gpucrypt.AESGCM takes exactly cryptography's nonces (8..128 bytes), encrypting and
    decrypting, with its ValueError for the others; the CPU backend takes every length
    from 1 byte (gpucrypt's formats), with cryptography's bytes where both take it."""
    aead, ref = gpucrypt.AESGCM(key, device="cpu"), reference.AESGCM(key)
    calls = (lambda a: a.encrypt(nonce, data, aad), lambda a: a.decrypt(nonce, bytes(16) + data, aad),
             lambda a: a.decrypt_into(nonce, bytes(16) + data, aad, bytearray(len(data))),
             lambda a: a.encrypt_into(nonce, data, aad, bytearray(len(data) + 16)))
    if not 8 <= len(nonce) <= 128:
        for call in calls:
            with pytest.raises(ValueError, match="between 8 and 128"):
                call(ref)
            with pytest.raises(ValueError, match="between 8 and 128"):
                call(aead)
    else:
        sealed = aead.encrypt(nonce, data, aad)
        assert sealed == ref.encrypt(nonce, data, aad)
        assert aead.decrypt(nonce, sealed, aad) == data
    if nonce:
        ctx, out = get_backend("cpu").aead("aes-gcm", key), bytearray(len(data) + 16)
        ctx.seal(nonce, memoryview(data), memoryview(aad), memoryview(out))
        if 8 <= len(nonce) <= 128:
            assert out == sealed
        back = bytearray(len(data))
        ctx.open(nonce, memoryview(out), memoryview(aad), memoryview(back))
        assert back == data


def test_gcm_long_nonce_path_matches_openssl_path():
    """The composed GCM path (CTR + GHASH oracle) equals OpenSSL's on nonces both accept."""
    from gpucrypt.backends.cpu import _AesGcm

    key, data, aad = os.urandom(32), os.urandom(1000), os.urandom(20)
    for nonce in (os.urandom(8), os.urandom(12), os.urandom(100)):
        composed = _AesGcm(key)
        out = bytearray(len(data) + 16)
        j0 = composed._j0(nonce)
        composed._ctr(j0, memoryview(data), memoryview(out)[:-16])
        out[-16:] = composed._tag(j0, memoryview(out)[:-16], memoryview(aad))
        assert bytes(out) == reference.AESGCM(key).encrypt(nonce, data, aad)


def test_gcm_ctr_wraps_low_32_bits_only():
    """With a non-96-bit nonce, J0's low word can be near 2**32: inc32 must wrap it."""
    from gpucrypt.backends.cpu import _AesGcm

    key = os.urandom(16)
    ctx = _AesGcm(key)
    j0 = os.urandom(12) + b"\xff\xff\xff\xfe"
    data = os.urandom(64)
    out = bytearray(64)
    ctx._ctr(j0, memoryview(data), memoryview(out))
    from gpucrypt._host_primitives import aes_block
    prefix = j0[:12]
    blocks = [prefix + (0xFFFFFFFF).to_bytes(4, "big")] + [prefix + i.to_bytes(4, "big") for i in range(3)]
    stream = b"".join(aes_block(key, b) for b in blocks)
    assert bytes(out) == bytes(a ^ b for a, b in zip(data, stream))


def test_long_chacha_path_matches_openssl_path():
    """The composed ChaCha20 + Poly1305 path (used past 2**31 - 1 bytes) equals OpenSSL's AEAD."""
    from gpucrypt.backends.cpu import _ChaCha20Poly1305

    key, nonce, data, aad = os.urandom(32), os.urandom(12), os.urandom(3000), os.urandom(33)
    ctx = _ChaCha20Poly1305(key)
    out = bytearray(len(data) + 16)
    ct = memoryview(out)[:-16]
    from gpucrypt.backends.cpu import _xor_into
    _xor_into(ctx._stream(nonce, 1), memoryview(data), ct)
    out[-16:] = ctx._tag(nonce, ct, memoryview(aad))
    assert bytes(out) == reference.ChaCha20Poly1305(key).encrypt(nonce, data, aad)


# --- tampering ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CLASSES))
def test_any_flipped_bit_is_rejected(device, name):
    """Every bit of ciphertext and tag, and bits of nonce and AAD: InvalidTag, no plaintext."""
    cls, key_len, nonce_len = CLASSES[name]
    key, nonce, data, aad = os.urandom(key_len), os.urandom(nonce_len), os.urandom(33), os.urandom(9)
    aead = cls(key, device=device)
    sealed = aead.encrypt(nonce, data, aad)
    forged = []
    # every bit on the CPU and a real GPU; every 7th in the simulator (a launch per step in Python)
    step = 7 if (device == "gpu" and ON_CUDASIM) else 1
    for bit in range(0, len(sealed) * 8, step):
        bad = bytearray(sealed)
        bad[bit // 8] ^= 1 << (bit % 8)
        forged.append((nonce, bytes(bad), aad))
    for field, value in (("nonce", nonce), ("aad", aad)):
        for bit in range(0, len(value) * 8, step):
            bad = bytearray(value)
            bad[bit // 8] ^= 1 << (bit % 8)
            forged.append((bytes(bad), sealed, aad) if field == "nonce" else (nonce, sealed, bytes(bad)))
    forged += [(nonce, sealed[:-1], aad), (nonce, sealed[:15], aad), (nonce, sealed + b"\x00", aad)]
    assert aead.decrypt_many(forged, allow_failures=True) == [None] * len(forged)
    with pytest.raises(gpucrypt.BatchInvalidTag) as info:
        aead.decrypt_many([(nonce, sealed, aad)] + forged[:3])
    assert info.value.failed == [1, 2, 3]
    # one by one through decrypt_into: the buffer is zeroed, never left with plaintext
    for nonce_, bad, aad_ in (forged if device == "cpu" else forged[::97]):
        if len(bad) < 16 or len(bad) - 16 != len(data):
            continue
        out = bytearray(b"\x55" * len(data))
        with pytest.raises(InvalidTag):
            aead.decrypt_into(nonce_, bad, aad_, out)
        assert out == bytes(len(data)), "decrypt_into must zero its buffer on failure"


def test_wrong_key_is_rejected(device):
    sealed = gpucrypt.ChaCha20Poly1305(bytes(32), device=device).encrypt(bytes(12), b"secret", None)
    with pytest.raises(InvalidTag):
        gpucrypt.ChaCha20Poly1305(b"\x01" + bytes(31), device=device).decrypt(bytes(12), sealed, None)


# --- properties and argument rules -----------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CLASSES))
def test_into_forms_in_place_and_input_unchanged(device, name):
    cls, key_len, nonce_len = CLASSES[name]
    key, nonce, aad = os.urandom(key_len), os.urandom(nonce_len), b"hdr"
    data = os.urandom(1000)
    aead = cls(key, device=device)
    expected = reference_seal(name, key, nonce, data, aad)

    src = bytearray(data)
    out = bytearray(len(data) + 16)
    assert aead.encrypt_into(nonce, src, aad, out) == len(out)
    assert bytes(out) == expected and bytes(src) == data

    # in place: ciphertext overwrites the plaintext, tag in the last 16 bytes
    buf = np.frombuffer(bytearray(data) + bytearray(16), dtype=np.uint8).copy()
    aead.encrypt_into(nonce, buf[:-16], aad, buf)
    assert buf.tobytes() == expected
    plain = bytearray(len(data))
    assert aead.decrypt_into(nonce, buf, aad, plain) == len(data)
    assert bytes(plain) == data


def test_numpy_arrays_of_any_dtype_are_read_as_bytes(device):
    key, nonce = os.urandom(32), os.urandom(12)
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    sealed = gpucrypt.ChaCha20Poly1305(key, device=device).encrypt(nonce, arr, None)
    assert sealed == reference.ChaCha20Poly1305(key).encrypt(nonce, arr.tobytes(), None)


def test_argument_errors_match_cryptography():
    aead = gpucrypt.ChaCha20Poly1305(bytes(32))
    with pytest.raises(ValueError, match="32 bytes"):
        gpucrypt.ChaCha20Poly1305(bytes(16))
    with pytest.raises(ValueError, match="128, 192, or 256"):
        gpucrypt.AESGCM(bytes(20))
    with pytest.raises(TypeError):
        gpucrypt.ChaCha20Poly1305("k" * 32)
    with pytest.raises(ValueError, match="Nonce must be 12 bytes"):
        aead.encrypt(bytes(8), b"x", None)
    with pytest.raises(ValueError, match="Nonce must be 24 bytes"):
        gpucrypt.XChaCha20Poly1305(bytes(32)).encrypt(bytes(12), b"x", None)
    with pytest.raises(ValueError, match="between 8 and 128"):
        gpucrypt.AESGCM(bytes(16)).encrypt(b"", b"x", None)
    with pytest.raises(TypeError):
        aead.encrypt(bytes(12), "text", None)
    with pytest.raises(TypeError):
        aead.encrypt(bytes(12), b"x", "aad")
    with pytest.raises(ValueError, match="contiguous"):
        aead.encrypt(bytes(12), np.arange(10, dtype=np.uint8)[::2], None)
    with pytest.raises(ValueError, match="buffer must be 17 bytes"):
        aead.encrypt_into(bytes(12), b"x", None, bytearray(16))
    with pytest.raises(TypeError, match="writable"):
        aead.encrypt_into(bytes(12), b"x", None, bytes(17))
    with pytest.raises(ValueError, match="buffer must be 4 bytes"):
        aead.decrypt_into(bytes(12), bytes(20), None, bytearray(5))
    with pytest.raises(InvalidTag):
        aead.decrypt(bytes(12), bytes(15), None)
    with pytest.raises(ValueError, match="128, 192, or 256"):
        gpucrypt.AESGCM.generate_key(100)
    assert len(gpucrypt.AESGCM.generate_key(192)) == 24
    assert len(gpucrypt.XChaCha20Poly1305.generate_key()) == 32
    with pytest.raises(ValueError, match="device must be one of"):
        gpucrypt.ChaCha20Poly1305(bytes(32), device="tpu")


def test_more_argument_errors_are_cryptographys():
    """Found by a differential review: the general path's errors in cryptography's
    order and kinds (argument types before lengths and sizes; a message shorter than a
    tag is InvalidTag, whatever the buffer), and generate_key's integer rules."""
    chacha, gcm = gpucrypt.ChaCha20Poly1305(bytes(32)), gpucrypt.AESGCM(bytes(16))
    xchacha = gpucrypt.XChaCha20Poly1305(bytes(32))
    ref = reference.ChaCha20Poly1305(bytes(32))
    for call in (lambda a: a.encrypt(bytes(5), b"x", "aad"),
                 lambda a: a.encrypt_into(bytes(12), b"x", "aad", bytearray(3)),
                 lambda a: a.decrypt_into(bytes(12), bytes(40), "aad", bytearray(3))):
        with pytest.raises(TypeError):
            call(ref)
        with pytest.raises(TypeError):
            call(chacha)
    # general paths: data OpenSSL refuses (signed bytes), XChaCha20 with a bytearray nonce
    signed = lambda b: memoryview(b).cast("b")  # noqa: E731
    for aead, nonce, wrap in ((gcm, bytes(12), signed), (xchacha, bytearray(24), bytes)):
        for size in (0, 15):
            buf = bytearray(b"\xaa" * 3)
            with pytest.raises(InvalidTag):
                aead.decrypt_into(nonce, wrap(bytes(size)), None, buf)
            assert buf == bytes(3)  # zeroed, as the fast path leaves it
            with pytest.raises(InvalidTag):
                aead.decrypt(nonce, wrap(bytes(size)), None)
    # ... and a GCM nonce cryptography refuses is its ValueError first, not InvalidTag
    for size in (0, 15, 40):
        for a in (reference.AESGCM(bytes(16)), gcm):
            with pytest.raises(ValueError, match="between 8 and 128"):
                a.decrypt(bytes(4), bytes(size), None)
    for nonce in (bytes(24), bytearray(24)):  # libsodium's path and the general one
        with pytest.raises(TypeError):
            xchacha.decrypt(nonce, b"short", "aad")
    assert len(gpucrypt.AESGCM.generate_key(np.int64(128))) == 16
    assert len(reference.AESGCM.generate_key(np.int64(128))) == 16
    for bad, error in ((-128, OverflowError), (2**64 + 128, OverflowError), (128.0, TypeError)):
        with pytest.raises(error):
            reference.AESGCM.generate_key(bad)
        with pytest.raises(error):
            gpucrypt.AESGCM.generate_key(bad)
    # a key or nonce that is not contiguous is refused, not copied in some order
    with pytest.raises(ValueError, match="contiguous"):
        gpucrypt.ChaCha20Poly1305(np.zeros(64, dtype=np.uint8)[::2])
    with pytest.raises(ValueError, match="contiguous"):
        xchacha.encrypt(np.zeros(48, dtype=np.uint8)[::2], b"x", None)


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_empty_buffers_of_any_shape_are_empty_bytes(name):
    """An empty array with a zero in its shape is zero bytes of data, associated data or
    output (memoryview.cast refuses such shapes): the bytes of an empty message, and a
    forged message decrypted into an empty (1, 0) buffer is InvalidTag."""
    cls, key_len, nonce_len = CLASSES[name]
    aead, key, nonce = cls(bytes(key_len), device="cpu"), bytes(key_len), bytes(nonce_len)
    empty = np.zeros((0, 4), dtype=np.float32)
    sealed = aead.encrypt(nonce, b"", None)
    assert aead.encrypt(nonce, empty, empty) == sealed
    out = np.zeros((1, 0), dtype=np.uint8)
    assert aead.decrypt_into(nonce, sealed, empty, out) == 0
    with pytest.raises(InvalidTag):
        aead.decrypt_into(nonce, bytes(16), None, out)
    with pytest.raises(ValueError, match="buffer must be 16 bytes"):
        aead.encrypt_into(nonce, b"", None, np.zeros((1, 0), dtype=np.uint8))
    del key


@pytest.mark.parametrize("name", ["chacha20-poly1305", "xchacha20-poly1305", "aes-256-gcm"])
def test_aead_objects_refuse_pickling_and_copying(name):
    """cryptography's objects cannot be pickled or copied; ours hold the key as bytes,
    which a pickle would carry in the clear (XChaCha20's libsodium object without PyNaCl
    was picklable)."""
    import copy
    import pickle

    cls, key_len, _ = CLASSES[name]
    key = os.urandom(key_len)
    for aead in (cls(key), cls(key, device="cpu")):
        for attempt in (pickle.dumps, copy.copy, copy.deepcopy):
            with pytest.raises(TypeError, match="cannot pickle"):
                attempt(aead)


@pytest.mark.parametrize("name", ["chacha20-poly1305", "xchacha20-poly1305", "aes-256-gcm"])
def test_a_message_over_openssls_one_call_decrypts_through_the_general_path(name, monkeypatch):
    """cryptography's decrypt forms check no length: a ciphertext whose message exceeds
    2**31 - 1 bytes (which encrypt composes) made rust-openssl panic, a BaseException
    that escaped. It must reach the general path instead, which composes it; that path
    is stopped at its first step here, so that nothing is allocated or read (untouched
    anonymous pages, 2 GiB of them)."""
    import mmap

    import gpucrypt.aead as aead_module

    class ReachedGeneralPath(Exception):
        pass

    real_readable = aead_module.readable

    def readable(data, *args):
        if memoryview(data).nbytes > 2**31:
            raise ReachedGeneralPath
        return real_readable(data, *args)

    monkeypatch.setattr(aead_module, "readable", readable)
    cls, key_len, nonce_len = CLASSES[name]
    aead, nonce = cls(bytes(key_len), device="cpu"), bytes(nonce_len)
    sealed, plain = mmap.mmap(-1, 2**31 + 16), mmap.mmap(-1, 2**31)  # unmapped when collected
    for call in (lambda: aead.decrypt_into(nonce, memoryview(sealed), None, memoryview(plain)),
                 lambda: aead.decrypt(nonce, memoryview(sealed), None),
                 lambda: aead.decrypt_many([(nonce, memoryview(sealed), None)])):
        with pytest.raises(ReachedGeneralPath):
            call()


@pytest.mark.parametrize("make", [lambda: gpucrypt.ChaCha20Poly1305(bytes(32), device="cpu"),
                                  lambda: gpucrypt.XChaCha20Poly1305(bytes(32), device="cpu"),
                                  lambda: gpucrypt.AESGCM(bytes(16), device="cpu")])
def test_into_forms_refuse_no_buffer(make):
    """``buf=None`` is a missing buffer, refused as cryptography refuses it, not an
    allocating call in disguise (the general path's own "no buffer" must not be None)."""
    aead = make()
    nonce = bytes(24 if isinstance(aead, gpucrypt.XChaCha20Poly1305) else 12)
    sealed = aead.encrypt(nonce, b"secret", None)
    with pytest.raises(TypeError):
        aead.encrypt_into(nonce, b"secret", None, None)
    with pytest.raises(TypeError):
        aead.decrypt_into(nonce, sealed, None, None)


@pytest.mark.parametrize("cls", [gpucrypt.AESGCM, gpucrypt.ChaCha20Poly1305,
                                 gpucrypt.XChaCha20Poly1305])
def test_decrypt_past_the_limit_is_overflow_error(tmp_path, cls):
    """A ciphertext past the algorithm's limit (a sparse file mapped, nothing read):
    OverflowError from decrypt as from decrypt_into, at once, not after cryptography's
    allocating call zero-filled an output of its size (64 GiB and more; a MemoryError
    where that cannot be had)."""
    import mmap

    from gpucrypt import _limits

    limit = _limits.GCM_MAX_PLAINTEXT if cls is gpucrypt.AESGCM else \
        _limits.CHACHA20POLY1305_MAX_PLAINTEXT
    n = limit + 16 + 1
    with open(tmp_path / "sparse", "wb") as f:
        f.truncate(n)
    with open(tmp_path / "sparse", "rb") as f:
        mapped = mmap.mmap(f.fileno(), n, prot=mmap.PROT_READ)
    aead = cls(bytes(16 if cls is gpucrypt.AESGCM else 32), device="cpu")
    nonce = bytes(24 if cls is gpucrypt.XChaCha20Poly1305 else 12)
    view = memoryview(mapped)
    try:
        for call in (lambda: aead.decrypt(nonce, view, None),
                     lambda: aead.decrypt_into(nonce, view, None, bytearray(1))):
            with pytest.raises(OverflowError, match="limit"):
                call()
    finally:
        view.release()
        mapped.close()


def test_limits_refuse_before_any_keystream(monkeypatch):
    """Past each algorithm's limit: OverflowError, checked on the length alone."""
    from gpucrypt import _limits

    aead = gpucrypt.ChaCha20Poly1305(bytes(32))
    with pytest.raises(OverflowError, match="limit.*repeat the keystream"):
        _limits.check_length("data", _limits.CHACHA20POLY1305_MAX_PLAINTEXT + 1,
                             _limits.CHACHA20POLY1305_MAX_PLAINTEXT, "ChaCha20Poly1305")
    with pytest.raises(OverflowError, match="limit") as info:  # no keystream for it to repeat
        _limits.check_length("associated_data", _limits.GCM_MAX_AAD + 1, _limits.GCM_MAX_AAD,
                             "AESGCM")
    assert "keystream" not in str(info.value) and "hash" in str(info.value)
    # through the public class: shrink the limit so a small message exceeds it, on the
    # general path (the fast path hands messages up to OpenSSL's own cap, 2**31 - 1 bytes,
    # to cryptography, which refuses more itself: far inside every algorithm's limit)
    from gpucrypt.aead import _FAST_PATH_MAX

    assert _FAST_PATH_MAX < min(_limits.GCM_MAX_PLAINTEXT, _limits.CHACHA20POLY1305_MAX_PLAINTEXT)
    import mmap

    over = mmap.mmap(-1, _FAST_PATH_MAX + 1)  # untouched pages: no memory used
    with pytest.raises(OverflowError):  # cryptography's own refusal, which the fast path relies on
        reference.ChaCha20Poly1305(bytes(32)).encrypt(bytes(12), over, None)
    over.close()
    # the classes carry the real limits (checked before they are shrunk below)
    assert gpucrypt.ChaCha20Poly1305._max_data == _limits.CHACHA20POLY1305_MAX_PLAINTEXT
    assert gpucrypt.XChaCha20Poly1305._max_data == _limits.CHACHA20POLY1305_MAX_PLAINTEXT
    assert gpucrypt.AESGCM._max_data == _limits.GCM_MAX_PLAINTEXT
    monkeypatch.setattr(gpucrypt.ChaCha20Poly1305, "_max_data", 64)
    monkeypatch.setattr(aead, "_openssl", None)  # the general path, as past OpenSSL's cap
    with pytest.raises(OverflowError):
        aead.encrypt(bytes(12), memoryview(bytes(65)), None)
    monkeypatch.setattr(gpucrypt.AESGCM, "_max_data", 32)
    gcm = gpucrypt.AESGCM(bytes(16))
    monkeypatch.setattr(gcm, "_openssl", None)
    with pytest.raises(OverflowError):
        gcm.encrypt(bytes(12), memoryview(bytes(33)), None)
    assert _limits.GCM_MAX_PLAINTEXT == (2**32 - 2) * 16
    assert _limits.CHACHA20POLY1305_MAX_PLAINTEXT == (2**32 - 1) * 64


@pytest.mark.parametrize("size", [0, 1, 15])
def test_xchacha_decrypt_of_less_than_a_tag_is_invalid_tag(size):
    """libsodium's path (PyNaCl) included: shorter than a tag is InvalidTag, as cryptography."""
    aead = gpucrypt.XChaCha20Poly1305(bytes(32))
    with pytest.raises(InvalidTag):
        aead.decrypt(bytes(24), bytes(size), None)
    with pytest.raises(InvalidTag):
        aead.decrypt(bytes(24), bytearray(size), b"aad")


@pytest.mark.parametrize("size", [16 << 10, (16 << 10) + 1])
def test_xchacha_seals_and_opens_a_message_on_the_same_engine(size, monkeypatch):
    """The libsodium cut-off is about the message: a 16 KiB message opens through the
    library that sealed it, though its ciphertext carries 16 more bytes than the bound."""
    aead = gpucrypt.XChaCha20Poly1305(bytes(range(32)))
    if aead._openssl is None:
        pytest.fail("PyNaCl is a test dependency; install the test extra")
    engines = []
    real_for = type(aead)._openssl_for

    def spy(self, nonce, data, *tag_len):
        engine, nonce_out = real_for(self, nonce, data, *tag_len)
        engines.append(type(engine).__name__)
        return engine, nonce_out

    monkeypatch.setattr(type(aead), "_openssl_for", spy)
    message = bytes(size)
    sealed = aead.encrypt(bytes(24), message, None)
    assert aead.decrypt(bytes(24), sealed, None) == message
    assert engines[0] == engines[1], engines
    assert engines[0] == ("_Libsodium" if size == 16 << 10 else "ChaCha20Poly1305")


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=300), aad=st.binary(max_size=40), kind=st.sampled_from(["bytes", "bytearray", "numpy"]),
       aad_kind=st.sampled_from(["bytes", "memoryview", "none"]), flip=st.integers(min_value=0))
def test_xchacha_libsodium_path_matches_pynacl(data, aad, kind, aad_kind, flip):
    """XChaCha20-Poly1305's small messages call libsodium's C function directly (PyNaCl's
    cffi module): PyNaCl's bytes in all four forms, for each buffer type the fast path
    takes; a flipped bit is InvalidTag, with ``decrypt_into``'s buffer zeroed."""
    from nacl import bindings

    key, nonce = bytes(range(1, 33)), bytes(range(24))
    aead = gpucrypt.XChaCha20Poly1305(key)
    assert type(aead._openssl).__name__ == "_Libsodium", "PyNaCl is a test dependency"
    wrap = {"bytes": bytes, "bytearray": bytearray,
            "numpy": lambda b: np.frombuffer(bytearray(b), dtype=np.uint8)}[kind]
    ad = {"bytes": aad, "memoryview": memoryview(aad), "none": None}[aad_kind]
    expected = bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
        data, None if ad is None else aad, nonce, key)
    assert aead.encrypt(nonce, wrap(data), ad) == expected
    buf = bytearray(len(data) + 16)
    assert aead.encrypt_into(nonce, wrap(data), ad, buf) == len(buf) and buf == expected
    assert aead.decrypt(nonce, wrap(expected), ad) == data
    out = bytearray(len(data))
    assert aead.decrypt_into(nonce, wrap(expected), ad, out) == len(data) and out == data
    forged = bytearray(expected)
    forged[flip % len(forged)] ^= 1 << (flip % 8)
    with pytest.raises(InvalidTag):
        aead.decrypt(nonce, wrap(forged), ad)
    out = bytearray(b"\x55" * len(data))
    with pytest.raises(InvalidTag):
        aead.decrypt_into(nonce, wrap(forged), ad, out)
    assert out == bytes(len(data))


def test_repr_never_shows_the_key():
    key = bytes(range(32))
    text = repr(gpucrypt.ChaCha20Poly1305(key)) + str(gpucrypt.AESGCM(key))
    assert key.hex() not in text and "\\x00\\x01" not in text


def test_gpu_request_without_gpu_says_why(monkeypatch):
    from gpucrypt import backends

    monkeypatch.setitem(backends._reasons, "gpu", "no CUDA driver (test)")
    monkeypatch.delitem(backends._instances, "gpu", raising=False)
    with pytest.raises(gpucrypt.BackendUnavailable, match="no CUDA driver"):
        gpucrypt.ChaCha20Poly1305(bytes(32), device="gpu")


def test_env_override_of_auto(monkeypatch):
    from gpucrypt.backends import select_backend

    monkeypatch.setenv("GPUCRYPT_DEVICE", "cpu")
    assert select_backend("auto", 1 << 40).name == "cpu"
    monkeypatch.setenv("GPUCRYPT_DEVICE", "quantum")
    with pytest.raises(ValueError, match="GPUCRYPT_DEVICE"):
        select_backend("auto", 0)


@pytest.mark.parametrize("driver", [False, True])
def test_auto_objects_go_straight_to_openssl_where_no_gpu_can_be(driver, monkeypatch):
    """Outside the simulator, with no CUDA driver library, select_backend can only answer
    the CPU: device="auto" objects then call OpenSSL directly from the first call on (the
    same bytes, cryptography's own cost); with a driver they keep asking per size."""
    from gpucrypt import backends
    from gpucrypt.backends import _probe

    for name in ("NUMBA_ENABLE_CUDASIM", "GPUCRYPT_DEVICE", "NUMBA_CUDA_DRIVER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(backends, "_no_driver", None)
    monkeypatch.setattr(_probe, "_cuda_driver_loadable", lambda: driver)
    for cls in (gpucrypt.ChaCha20Poly1305, gpucrypt.AESGCM):
        aead = cls(bytes(32))
        assert (aead._direct is not None) is (not driver), cls
        assert aead._direct is None or aead._direct is aead._openssl
        sealed = aead.encrypt(bytes(12), b"message", b"ad")
        assert sealed == getattr(reference, cls.__name__)(bytes(32)).encrypt(bytes(12), b"message", b"ad")
    monkeypatch.setenv("NUMBA_ENABLE_CUDASIM", "1")  # the simulator is a GPU to "auto"
    monkeypatch.setattr(backends, "_no_driver", None)
    assert gpucrypt.AESGCM(bytes(32))._direct is None


@pytest.mark.parametrize("size", [0, 1, 17, 333, 5000])
@pytest.mark.parametrize("path", ["one-shot", "composed"])
@pytest.mark.parametrize("name,nonce_len", [("chacha20-poly1305", 12), ("aes-128-gcm", 12), ("aes-256-gcm", 12),
                                            ("aes-128-gcm", 1), ("aes-256-gcm", 60)])
def test_cpu_detached_tag_form_in_place_and_out(name, nonce_len, size, path, monkeypatch):
    """The CPU backend's detached-tag form (buffers holding exactly the data, e.g. a tensor's
    own memory) gives the AEAD's bytes, verifies before writing, and keeps in-place
    ciphertext intact on failure. Both paths: OpenSSL's one-shot AEAD through a scratch
    buffer (small messages) and the composed one (larger; OpenSSL's streaming passes run
    in 64-byte pieces here, so that several pieces are checked, and GCM's one-pass
    in-place open must roll every piece back when the tag fails)."""
    from gpucrypt.backends import cpu, get_backend

    monkeypatch.setattr(cpu, "_PIECE", 64)
    if path == "composed":
        monkeypatch.setattr(cpu, "ONE_SHOT_DETACHED_MAX", -1)
        monkeypatch.setattr(cpu, "CHACHA_ONE_SHOT_SEAL_MAX", -1)
    cls, key_len, std_nonce = CLASSES[name]
    key, nonce, aad = os.urandom(key_len), os.urandom(nonce_len), os.urandom(7)
    data = os.urandom(size)
    algorithm = "aes-gcm" if "gcm" in name else name
    ctx = get_backend("cpu").aead(algorithm, key)
    if "gcm" not in name or 8 <= nonce_len <= 128:
        expected = cls(key, device="cpu").encrypt(nonce, data, aad)
    else:  # a nonce only the backend takes: its one-shot form (the NIST vectors check that one)
        sealed = bytearray(size + 16)
        ctx.seal(nonce, memoryview(data), memoryview(aad), memoryview(sealed))
        expected = bytes(sealed)
    buf = bytearray(data)
    tag = ctx.seal_detached(nonce, memoryview(buf), memoryview(aad), memoryview(buf))
    assert bytes(buf) + tag == expected
    bad_tag = bytes([tag[0] ^ 1]) + tag[1:]
    with pytest.raises(InvalidTag):
        ctx.open_detached(nonce, memoryview(buf), bad_tag, memoryview(aad), memoryview(buf))
    assert bytes(buf) == expected[:-16], "a failed in-place open must leave the ciphertext"
    if size:  # a flipped ciphertext bit, in the last piece
        buf[-1] ^= 1
        with pytest.raises(InvalidTag):
            ctx.open_detached(nonce, memoryview(buf), tag, memoryview(aad), memoryview(buf))
        buf[-1] ^= 1
        assert bytes(buf) == expected[:-16]
    out = bytearray(b"\x55" * len(data))
    with pytest.raises(InvalidTag):
        ctx.open_detached(nonce, memoryview(bytes(buf)), bad_tag, memoryview(aad), memoryview(out))
    assert out == bytes(len(data))
    for short_or_long in (tag[:15], tag + b"\x00"):  # InvalidTag, not another error
        with pytest.raises(InvalidTag):
            ctx.open_detached(nonce, memoryview(buf), short_or_long, memoryview(aad), memoryview(buf))
    assert bytes(buf) == expected[:-16]
    ctx.open_detached(nonce, memoryview(buf), tag, memoryview(aad), memoryview(buf))
    assert bytes(buf) == data


@pytest.mark.parametrize("size", [1000, 1024, 4096, 5000, 9999])
@pytest.mark.parametrize("in_place", [True, False])
@pytest.mark.parametrize("one_pass", [False, True])
def test_cpu_detached_chacha20_poly1305_on_threads(size, in_place, one_pass, monkeypatch,
                                                 workers_in_place):
    """threads=3 on one message: the keystream in 256-byte pieces on 2 workers (counters
    from each piece's offset), this thread's MAC following in order. Opening, the MAC
    runs first over everything, then the keystream on 3 workers; or, ``one_pass``, the
    MAC runs here piece by piece ahead of 2 workers decrypting, and a wrong tag undoes
    their work. The same bytes as cryptography; a failure leaves in-place ciphertext
    as it was and zeroes a separate output."""
    from concurrent.futures import ThreadPoolExecutor

    from gpucrypt.backends import cpu, get_backend

    workers = []

    class CountingPool(ThreadPoolExecutor):
        def __init__(self, n):
            workers.append(n)
            super().__init__(n)

    monkeypatch.setattr("concurrent.futures.ThreadPoolExecutor", CountingPool)
    monkeypatch.setattr(cpu, "PARALLEL_MIN", 1000)
    monkeypatch.setattr(cpu, "_PARALLEL_CHUNK", 256)
    monkeypatch.setattr(cpu, "ONE_SHOT_DETACHED_MAX", -1)
    key, nonce, aad, data = os.urandom(32), os.urandom(12), os.urandom(21), os.urandom(size)
    expected = reference.ChaCha20Poly1305(key).encrypt(nonce, data, aad)
    ctx = get_backend("cpu").aead("chacha20-poly1305", key)
    src = bytearray(data)
    dst = src if in_place else bytearray(size)
    tag = ctx.seal_detached(nonce, memoryview(src), memoryview(aad), memoryview(dst), threads=3,
                            one_pass=one_pass)
    assert bytes(dst) + tag == expected
    assert workers == [2]  # and this thread: three threads on the message
    ct = bytearray(dst)
    for bad_tag, bad_ct in ((bytes([tag[0] ^ 1]) + tag[1:], ct), (tag, ct[:-1] + bytes([ct[-1] ^ 1])),
                            (tag, bytes([ct[0] ^ 1]) + ct[1:])):
        src = bytearray(bad_ct)
        out = src if in_place else bytearray(b"\x55" * size)
        with pytest.raises(InvalidTag):
            ctx.open_detached(nonce, memoryview(src), bad_tag, memoryview(aad), memoryview(out),
                              threads=3, one_pass=one_pass)
        assert bytes(out) == (bytes(bad_ct) if in_place else bytes(size))
    workers.clear()
    src = bytearray(ct)
    out = src if in_place else bytearray(size)
    ctx.open_detached(nonce, memoryview(src), tag, memoryview(aad), memoryview(out), threads=3,
                      one_pass=one_pass)
    assert bytes(out) == data
    assert workers == [2 if one_pass else 3]


@pytest.mark.parametrize("name", sorted(CLASSES))
@pytest.mark.parametrize("kind", ["bytes", "bytearray", "uint8 array", "float32 array", "memoryview"])
def test_every_buffer_kind_gives_the_same_bytes(name, kind):
    """Whatever buffer type picks the fast path (straight to OpenSSL/libsodium) or the general
    one, the bytes and the errors are the same."""
    cls, key_len, nonce_len = CLASSES[name]
    key, nonce = os.urandom(key_len), os.urandom(nonce_len)
    raw, aad = os.urandom(64), os.urandom(8)
    expected = reference_seal(name, key, nonce, raw, aad)
    make = {"bytes": bytes, "bytearray": bytearray, "memoryview": memoryview,
            "uint8 array": lambda b: np.frombuffer(b, dtype=np.uint8).copy(),
            "float32 array": lambda b: np.frombuffer(b, dtype=np.float32).copy()}[kind]
    aead = cls(key, device="cpu")
    assert aead.encrypt(nonce, make(raw), make(aad)) == expected
    assert aead.decrypt(nonce, make(expected), make(aad)) == raw
    out = np.zeros(len(raw) + 16, dtype=np.uint8)
    aead.encrypt_into(nonce, make(raw), make(aad), out)
    assert out.tobytes() == expected
    back = bytearray(len(raw))
    aead.decrypt_into(nonce, make(expected), make(aad), back)
    assert bytes(back) == raw
    bad = bytearray(expected)
    bad[-1] ^= 1
    back = np.full(len(raw), 7, dtype=np.uint8)
    with pytest.raises(InvalidTag):
        aead.decrypt_into(nonce, make(bytes(bad)), make(aad), back)
    assert not back.any()
    with pytest.raises(InvalidTag):
        aead.decrypt(nonce, make(bytes(bad)), make(aad))


# --- found by the second differential review (/tmp/review-aead) ---------------------------------

def _arena(kind: str, size: int):
    """(view, arena): ``view(start, n)`` is ``n`` bytes at ``start`` of one shared
    bytearray ``arena``, as a NumPy array or a memoryview."""
    arena = bytearray(size)
    if kind == "numpy":
        whole = np.frombuffer(arena, dtype=np.uint8)
        return (lambda start, n: whole[start:start + n]), arena
    return (lambda start, n: memoryview(arena)[start:start + n]), arena


@pytest.mark.parametrize("name", sorted(CLASSES))
@pytest.mark.parametrize("size", [1000, 16 << 10, (16 << 10) + 1])
@pytest.mark.parametrize("kind", ["numpy", "memoryview"])
def test_into_forms_refuse_inexact_overlap_and_keep_in_place(name, size, kind):
    """Input and output that share memory from different starts are ValueError on every
    class and path (XChaCha20's libsodium one up to 16 KiB, OpenSSL's above it), before
    a byte is written: libsodium wrote wrong ciphertext under a valid tag, or plaintext
    that was not the authenticated one without InvalidTag, and cryptography's own
    ChaCha20Poly1305 is wrong for an output after its input. Exactly in place, and
    buffers that only touch, still give the reference's bytes."""
    cls, key_len, nonce_len = CLASSES[name]
    key, nonce, aad = os.urandom(key_len), os.urandom(nonce_len), b"ad"
    data = os.urandom(size)
    expected = reference_seal(name, key, nonce, data, aad)
    aead = cls(key, device="cpu")
    view, arena = _arena(kind, size + 96)
    at = 48
    for shift in (-32, -16, -1, 1, 15, 16, 32):  # the output starts ``shift`` bytes after the input
        arena[at:at + size] = data
        before = bytes(arena)
        with pytest.raises(ValueError, match="overlaps"):
            aead.encrypt_into(nonce, view(at, size), aad, view(at + shift, size + 16))
        assert arena == before, "nothing may be written before the refusal"
        arena[at:at + size + 16] = expected
        before = bytes(arena)
        with pytest.raises(ValueError, match="overlaps"):
            aead.decrypt_into(nonce, view(at, size + 16), aad, view(at + shift, size))
        assert arena == before
    # in place (the same start) and touching (adjacent, no byte shared) are fine
    arena[at:at + size] = data
    assert aead.encrypt_into(nonce, view(at, size), aad, view(at, size + 16)) == size + 16
    assert arena[at:at + size + 16] == expected
    assert aead.decrypt_into(nonce, view(at, size + 16), aad, view(at, size)) == size
    assert arena[at:at + size] == data
    view, arena = _arena(kind, 2 * size + 16)
    arena[:size] = data
    aead.encrypt_into(nonce, view(0, size), aad, view(size, size + 16))
    assert arena[size:] == expected and arena[:size] == data


def test_inexact_overlap_is_refused_on_the_general_path_too(device):
    """The same rule where the call may run on the GPU (the general path), and for a
    bytearray on one side and a view of it on the other."""
    key, nonce, data = os.urandom(32), os.urandom(24), os.urandom(200)
    aead = gpucrypt.XChaCha20Poly1305(key, device=device)
    arena = bytearray(300)
    arena[16:216] = data
    with pytest.raises(ValueError, match="overlaps"):
        aead.encrypt_into(nonce, memoryview(arena)[16:216], None, memoryview(arena)[:216])
    sealed = reference_seal("xchacha20-poly1305", key, nonce, data, b"")
    arena = bytearray(sealed)
    with pytest.raises(ValueError, match="overlaps"):
        aead.decrypt_into(nonce, arena, None, memoryview(arena)[16:])
    assert arena == sealed
    aead.decrypt_into(nonce, arena, None, memoryview(arena)[:-16])  # in place
    assert arena[:-16] == data


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_a_short_input_overlapping_buf_is_refused_before_anything_is_zeroed(name):
    """Fewer than 16 bytes cannot hold a tag (InvalidTag, buf zeroed as cryptography's
    buffer would not be): but a buf that partly overlaps such an input is refused first,
    with neither touched, as at every other length."""
    cls, key_len, nonce_len = CLASSES[name]
    aead = cls(os.urandom(key_len), device="cpu")
    region = bytearray(range(1, 65))
    before = bytes(region)
    with pytest.raises(ValueError, match="overlaps"):
        aead.decrypt_into(os.urandom(nonce_len), memoryview(region)[4:14], None,
                          memoryview(region)[:20])
    assert region == before


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_non_contiguous_buffers_raise_buffer_error_as_cryptography(name):
    """cryptography raises BufferError for a non-contiguous buffer; gpucrypt's error is a
    BufferError and still the ValueError it was, for every argument and path."""
    from gpucrypt._buffers import NonContiguousBuffer

    cls, key_len, nonce_len = CLASSES[name]
    key, nonce = os.urandom(key_len), os.urandom(nonce_len)
    aead = cls(key, device="cpu")
    nc = lambda n: memoryview(bytearray(2 * n))[::2]  # noqa: E731
    calls = [lambda c: c(key).encrypt(nonce, nc(40), None),
             lambda c: c(key).encrypt(nonce, b"x", nc(8)),
             lambda c: c(key).encrypt_into(nonce, b"x" * 24, None, nc(40)),
             lambda c: c(key).decrypt(nonce, nc(40), None),
             lambda c: c(nc(key_len)).encrypt(nonce, b"x", None),
             lambda c: c(key).encrypt(nc(nonce_len), b"x", None)]
    ref = getattr(reference, cls.__name__, None)
    for call in calls:
        if ref is not None:
            with pytest.raises(BufferError):
                call(ref)
        with pytest.raises(NonContiguousBuffer, match="C-contiguous") as info:
            call(cls)
        assert isinstance(info.value, BufferError) and isinstance(info.value, ValueError)
    del aead


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_keys_and_nonces_must_be_bytes_as_in_cryptography(name):
    """A key or nonce of wider items (float32, uint32) is TypeError, as in cryptography,
    not taken as its raw bytes; a 2-D uint8 one is its bytes, as there. Data keeps
    gpucrypt's rule (any dtype, raw bytes)."""
    cls, key_len, nonce_len = CLASSES[name]
    key, nonce = os.urandom(key_len), os.urandom(nonce_len)
    ref = getattr(reference, cls.__name__, None)
    wide_key = np.frombuffer(key, dtype=np.float32)
    wide_nonce = np.frombuffer(nonce, dtype=np.uint32)
    for call in (lambda c: c(wide_key).encrypt(nonce, b"x", None),
                 lambda c: c(key).encrypt(wide_nonce, b"x", None),
                 lambda c: c(key).decrypt(wide_nonce, bytes(20), None),
                 lambda c: c(key).encrypt_into(memoryview(nonce).cast("I"), b"x", None, bytearray(17))):
        if ref is not None:
            with pytest.raises(TypeError):
                call(ref)
        with pytest.raises(TypeError, match="must be bytes"):
            call(cls)
    as_rows = np.frombuffer(key, dtype=np.uint8).reshape(-1, 4)
    expected = reference_seal(name, key, nonce, b"x", b"")
    assert cls(as_rows, device="cpu").encrypt(nonce, b"x", None) == expected
    if ref is not None:
        assert ref(as_rows).encrypt(nonce, b"x", None) == expected


@pytest.mark.parametrize("cls", [gpucrypt.ChaCha20Poly1305, gpucrypt.AESGCM])
@pytest.mark.parametrize("nonce", ["twelve chars", None, 12])
def test_a_wrong_nonce_type_is_reported_before_the_data(cls, nonce):
    """cryptography checks its arguments in order: a nonce of the wrong type is its
    TypeError even when the data is unusable too (non-contiguous)."""
    nc = memoryview(bytearray(80))[::2]
    ref = getattr(reference, cls.__name__)
    for a in (ref(bytes(32)), cls(bytes(32), device="cpu")):
        with pytest.raises(TypeError):
            a.encrypt(nonce, nc, None)
        with pytest.raises(TypeError):
            a.decrypt(nonce, nc, None)


def test_inexact_overlap_rule_for_every_kind_of_buffer():
    """The shortcuts of the overlap test (bytes, two bytearrays, views of two bytearrays,
    owning arrays, arrays over bytes) and its address comparison agree with where the
    bytes really are: shared from different starts is True, in place or apart False."""
    from gpucrypt._buffers import inexact_overlap

    ba = bytearray(100)
    arr = np.frombuffer(ba, dtype=np.uint8)
    owner = np.zeros(100, dtype=np.uint8)
    mv = memoryview(ba)
    cases = [(b"x" * 10, ba, False), (bytearray(10), bytearray(10), False), (ba, ba, False),
             (mv[:50], memoryview(bytearray(100))[:60], False), (mv[:50], mv[:66], False),
             (mv[:50], mv[10:60], True), (mv[10:60], mv[:50], True), (mv[:50], mv[50:], False),
             (ba, mv[16:], True), (mv[16:], ba, True), (arr[:50], mv[1:51], True),
             (arr[:50], arr[:66], False), (arr[8:50], arr[:66], True), (arr[:50], arr[50:], False),
             (owner, np.zeros(100, np.uint8), False), (owner[4:], owner, True),
             (np.frombuffer(bytes(100), np.uint8), owner, False),
             (arr[:40].view(np.float32), arr[4:60], True), (arr[:0], arr, False),
             ("text", ba, False), (arr[::2], arr, False)]  # not buffers we take: the checks say why
    for data, buf, expected in cases:
        assert inexact_overlap(data, buf) is expected, (type(data), type(buf), expected)


@pytest.mark.parametrize("cls, key_len", [(gpucrypt.AESGCM, 32), (gpucrypt.ChaCha20Poly1305, 32)])
@pytest.mark.parametrize("data_type", [bytes, bytearray])
@pytest.mark.parametrize("error", [KeyboardInterrupt, TimeoutError, SystemExit])
def test_decrypt_into_zeroes_a_forgery_whatever_a_signal_handler_raises(cls, key_len, data_type,
                                                                       error, monkeypatch):
    """A Ctrl-C that came while OpenSSL decrypted a forged message is raised at the first
    Python call after it, inside the clean-up that zeroes the buffer (simulated: the
    first ``writable`` call raises it). The buffer is zeroed all the same, then the
    KeyboardInterrupt goes on. So with another signal's handler: a SIGALRM timeout
    (TimeoutError), a SIGTERM handler's sys.exit (SystemExit): the zeroing was retried
    for KeyboardInterrupt only, and on cryptography 50 the forged message's plaintext
    stayed in the buffer."""
    import gpucrypt.aead as aead_module

    key, nonce = os.urandom(key_len), os.urandom(12)
    ref = reference.AESGCM if cls is gpucrypt.AESGCM else reference.ChaCha20Poly1305
    sealed = bytearray(ref(key).encrypt(nonce, b"p" * 1000, None))
    sealed[3] ^= 1
    real, calls = aead_module.writable, []

    def raises_once(x):
        calls.append(None)
        if len(calls) == 1:
            raise error
        return real(x)
    monkeypatch.setattr(aead_module, "writable", raises_once)
    buf = bytearray(1000)
    with pytest.raises(error):
        cls(key, device="cpu").decrypt_into(nonce, data_type(sealed), None, buf)
    assert bytes(buf) == bytes(1000) and len(calls) == 2


@pytest.mark.parametrize("cls", [gpucrypt.AESGCM, gpucrypt.ChaCha20Poly1305])
def test_decrypt_into_zeroes_a_forgery_when_a_timeout_comes_during_openssls_call(cls):
    """A SIGALRM whose handler raises TimeoutError (as timeout libraries do), arriving
    while OpenSSL decrypts a forged message: the handler runs at the first call after it,
    as the zeroing begins, and on cryptography 50 (which writes the plaintext before it
    checks the tag) the buffer kept the plaintext; cryptography 51 zeroes it itself.
    Real SIGALRMs every 0.5 ms, for 0.7 s. (The general path's zeroing, the CPU
    backend's, is tested with it.)"""
    from _signals import forged_opens_cut_by_alarms

    n = 64 << 10
    key, nonce = os.urandom(32), os.urandom(12)
    aead = cls(key, device="cpu")
    forged = bytearray(aead.encrypt(nonce, b"p" * n, None))
    forged[-1] ^= 1
    forged = bytes(forged)
    interrupted, left = forged_opens_cut_by_alarms(
        lambda out: aead.decrypt_into(nonce, forged, None, out), lambda: bytearray(n), any)
    assert interrupted > 0 and left == 0, (interrupted, left)


@pytest.mark.parametrize("cls", [gpucrypt.AESGCM, gpucrypt.ChaCha20Poly1305])
def test_a_message_over_the_limit_is_refused_before_its_output_is_allocated(cls, monkeypatch):
    """The general path checks the nonce and the message limits before it allocates the
    output: at the real limits (64 GiB, 256 GiB) allocating first was a MemoryError, or
    64 GiB reserved, instead of cryptography's OverflowError. Here the limit is made
    small and the allocation spied on."""
    import gpucrypt.aead as aead_module

    allocated = []
    real_new_bytes = aead_module.new_bytes
    monkeypatch.setattr(aead_module, "new_bytes", lambda n: allocated.append(n) or real_new_bytes(n))
    monkeypatch.setattr(cls, "_max_data", 100)
    ctx = cls(os.urandom(32), device="cpu")
    nonce = os.urandom(12)
    with pytest.raises(OverflowError):
        ctx._slow("encrypt", nonce, b"x" * 101, None)
    with pytest.raises(OverflowError):
        ctx._slow("decrypt", nonce, b"x" * 117, None)
    assert allocated == []
    with pytest.raises(ValueError, match="[Nn]once"):  # the nonce before the output too
        ctx._slow("encrypt", nonce[:5], b"x" * 10, None)
    assert allocated == []


@pytest.mark.parametrize("cls", [gpucrypt.AESGCM, gpucrypt.ChaCha20Poly1305])
def test_a_short_ciphertext_reports_a_read_only_buffer_before_the_nonce(cls):
    """cryptography checks that ``buf`` is writable before the nonce's size; a ciphertext
    shorter than a tag (its own branch here) followed another order."""
    ref_cls = getattr(reference, cls.__name__)
    key, bad_nonce = os.urandom(32), os.urandom(5)
    for impl in (ref_cls(key), cls(key, device="cpu")):
        with pytest.raises(TypeError):
            impl.decrypt_into(bad_nonce, b"x" * 10, None, b"\0" * 10)


def test_device_names_as_frameworks_spell_them():
    """"cuda" and torch.device("cuda") mean the GPU backend, torch.device("cpu") the CPU;
    a GPU's index is refused (device says where the cipher runs, not on which GPU)."""
    torch = pytest.importorskip("torch", reason="torch.device objects")
    from gpucrypt.backends import check_device

    assert check_device("cuda") == check_device(torch.device("cuda")) == "gpu"
    assert check_device(torch.device("cpu")) == "cpu"
    key = os.urandom(32)
    assert gpucrypt.ChaCha20Poly1305(key, device=torch.device("cpu")).encrypt(
        b"n" * 12, b"data", None) == reference.ChaCha20Poly1305(key).encrypt(b"n" * 12, b"data",
                                                                              None)
    for indexed in ("cuda:1", torch.device("cuda", 1)):
        with pytest.raises(ValueError, match="names one GPU.*give 'gpu'"):
            gpucrypt.ChaCha20Poly1305(key, device=indexed)
    with pytest.raises(ValueError, match="device must be one of .*'cuda', the same as 'gpu'"):
        gpucrypt.AESGCM(key, device="tpu")


def test_gpucrypt_device_cuda_is_the_gpu(monkeypatch):
    """GPUCRYPT_DEVICE=cuda was refused where device="cuda" is taken."""
    from gpucrypt import backends

    monkeypatch.setenv("GPUCRYPT_DEVICE", "cuda")
    assert backends._environment_device() == "gpu"
    monkeypatch.setenv("GPUCRYPT_DEVICE", "tpu")
    with pytest.raises(ValueError, match="GPUCRYPT_DEVICE must be one of"):
        backends._environment_device()


@pytest.mark.parametrize("name", ["chacha20-poly1305", "aes-256-gcm"])
def test_a_small_bytes_message_goes_straight_to_openssl_where_a_gpu_could_take_large_ones(
        monkeypatch, name):
    """device="auto" where the GPU backend loads (numba's simulator here, a CUDA driver on
    a GPU host): small messages run on the CPU, and a bytes one is handed to cryptography
    with no choosing in between (that cost 0.3 us of a 0.5 us AES-GCM call at 1 KiB).
    Large ones and other buffer types still choose (_slow)."""
    from gpucrypt import aead as aead_module

    cls, key_len, nonce_len = CLASSES[name]
    key, nonce, data = os.urandom(key_len), os.urandom(nonce_len), os.urandom(1024)
    obj = cls(key)
    if obj._direct is not None:
        pytest.skip("every size runs on the CPU here: there is no choosing to skip")
    chosen = []
    real_slow = aead_module._Aead._slow

    def spy(self, method, *args, **kwargs):
        chosen.append(method)
        return real_slow(self, method, *args, **kwargs)

    monkeypatch.setattr(aead_module._Aead, "_slow", spy)
    ref = reference_seal(name, key, nonce, data, b"a")
    assert obj.encrypt(nonce, data, b"a") == ref
    assert obj.decrypt(nonce, ref, b"a") == data
    out = bytearray(len(ref))
    assert obj.encrypt_into(nonce, data, b"a", out) == len(ref) and bytes(out) == ref
    back = bytearray(len(data))
    obj.decrypt_into(nonce, ref, b"a", back)
    assert bytes(back) == data
    with pytest.raises(InvalidTag):
        obj.decrypt_into(nonce, ref[:-1] + bytes([ref[-1] ^ 1]), b"a", back)
    assert bytes(back) == bytes(len(data))  # zeroed, as on every path
    assert chosen == []
    obj.encrypt(nonce, bytearray(data), b"a")  # not bytes: chooses
    assert chosen == ["encrypt"]


def test_buffers_of_python_objects_and_released_views_are_type_errors():
    """A NumPy array of dtype object was read as its pointers (addresses in the ciphertext),
    and decrypting into one wrote bytes over them: Python crashed reading it back.
    cryptography raises TypeError for both, and for a released view (gpucrypt said
    ValueError)."""
    key, nonce = os.urandom(32), os.urandom(12)
    ours, theirs = gpucrypt.ChaCha20Poly1305(key), reference.ChaCha20Poly1305(key)
    objects = np.array([object(), 1, "x"], dtype=object)
    mixed = np.zeros(2, dtype=[("a", "O"), ("b", "i4")])
    named = np.zeros(2, dtype=[("Offset", "<i4")])  # an "O" in a field name is no object
    released = memoryview(bytearray(8))
    released.release()
    for bad in (objects, mixed, released):
        for obj in (ours, theirs):
            with pytest.raises(TypeError):
                obj.encrypt(nonce, bad, None)
        with pytest.raises(TypeError):
            ours.encrypt(nonce, b"data", bad)
    sealed = ours.encrypt(nonce, bytes(24), None)
    with pytest.raises(TypeError, match="holds Python objects"):
        ours.decrypt_into(nonce, sealed, None, np.empty(3, dtype=object))
    x = gpucrypt.XChaCha20Poly1305(key)  # libsodium's path (cffi took any buffer)
    long_nonce = os.urandom(24)
    with pytest.raises(TypeError, match="holds Python objects"):
        x.decrypt_into(long_nonce, x.encrypt(long_nonce, bytes(24), None), None,
                       np.empty(3, dtype=object))
    with pytest.raises(TypeError, match="holds Python objects"):
        x.encrypt_into(long_nonce, bytes(8), None, np.empty(3, dtype=object))
    assert ours.decrypt(nonce, ours.encrypt(nonce, named, None), None) == named.tobytes()


def test_a_released_view_in_the_into_forms_is_a_type_error():
    """The overlap check read the released view's .obj first: ValueError, where
    cryptography raises TypeError."""
    key, nonce = os.urandom(32), os.urandom(12)
    for cls in (gpucrypt.AESGCM, gpucrypt.ChaCha20Poly1305):
        released = memoryview(bytearray(8))
        released.release()
        with pytest.raises(TypeError):
            cls(key).encrypt_into(nonce, released, None, bytearray(24))
        with pytest.raises(TypeError):
            cls(key).encrypt_into(nonce, b"8 bytes!", None, released)


@pytest.mark.parametrize("where", ["cpu", "auto"])
@pytest.mark.parametrize("name", sorted(CLASSES))
def test_an_empty_strided_view_is_empty_as_in_cryptography(name, where):
    """memoryview(bytearray(4))[4::2] has no bytes but is not C-contiguous by CPython's
    flag: cryptography takes it as empty data, associated data or output (a forgery
    decrypted into it is InvalidTag), where gpucrypt raised NonContiguousBuffer."""
    cls, key_len, nonce_len = CLASSES[name]
    key, nonce = os.urandom(key_len), os.urandom(nonce_len)
    empty = lambda: memoryview(bytearray(4))[4::2]  # noqa: E731
    empty_read_only = lambda: memoryview(bytes(4))[4::2]  # noqa: E731
    sealed = reference_seal(name, key, nonce, b"", b"")
    forged = reference_seal(name, key, nonce, b"", b"other associated data")
    ref = getattr(reference, cls.__name__, None)
    calls = [(lambda o: o.encrypt(nonce, empty(), None), sealed),
             (lambda o: o.encrypt(nonce, empty_read_only(), empty()), sealed),
             (lambda o: o.decrypt(nonce, sealed, empty()), b""),
             (lambda o: o.decrypt_into(nonce, sealed, empty_read_only(), empty()), 0),
             (lambda o: o.decrypt_into(nonce, forged, None, empty()), InvalidTag)]
    objects = [cls(key, device=where)] + ([] if ref is None else [ref(key)])
    for call, expected in calls:
        for obj in objects:
            if expected is InvalidTag:
                with pytest.raises(InvalidTag):
                    call(obj)
            else:
                assert call(obj) == expected
    buf = bytearray(16)
    assert cls(key, device=where).encrypt_into(nonce, empty(), None, buf) == 16
    assert bytes(buf) == sealed


class _RefusingOverlap:
    """An AEAD object of cryptography 51's rule over the installed one's: an output that
    shares memory with its input, in place included, is ValueError before a byte is
    written (on 51 the rule is cryptography's own, and this changes nothing)."""

    def __init__(self, real):
        self._real = real

    def _refuse_overlap(self, data, buf):
        if np.shares_memory(np.frombuffer(data, np.uint8), np.frombuffer(buf, np.uint8)):
            raise ValueError("data and buf must not overlap")

    def encrypt_into(self, nonce, data, aad, buf):
        self._refuse_overlap(data, buf)
        return self._real.encrypt_into(nonce, data, aad, buf)

    def decrypt_into(self, nonce, data, aad, buf):
        self._refuse_overlap(data, buf)
        return self._real.decrypt_into(nonce, data, aad, buf)

    def __getattr__(self, name):
        return getattr(self._real, name)


@pytest.mark.parametrize("name", ["aes-256-gcm", "chacha20-poly1305"])
@pytest.mark.parametrize("size", [0, 1, 64, 4095, 64 << 10, (64 << 10) + 1, (1 << 20) + 17])
@pytest.mark.parametrize("kind", ["numpy", "memoryview"])
def test_in_place_into_forms_where_cryptography_refuses_in_place(name, size, kind, monkeypatch):
    """cryptography 51 refuses an exact in-place ``encrypt_into``/``decrypt_into``, which the
    drop-in classes take: such a call goes from cryptography's refusal straight to the CPU
    backend's in-place route (not through the general path's checks, which cost 6 us at
    64 bytes), with cryptography's bytes, a wrong tag zeroing ``buf``, and a bad nonce
    still cryptography's error."""
    from gpucrypt.backends import cpu

    cls, key_len, nonce_len = CLASSES[name]
    key, nonce, aad = os.urandom(key_len), os.urandom(nonce_len), b"ad"
    data = os.urandom(size)
    expected = reference_seal(name, key, nonce, data, aad)
    aead = cls(key, device="cpu")
    monkeypatch.setattr(cpu, "AEAD_INTO_IN_PLACE", False)
    aead._direct = aead._small_direct = aead._openssl = _RefusingOverlap(aead._openssl)

    general_path = []  # the calls that took it

    def slow(*args):
        general_path.append(args[0])
        return type(aead)._slow(aead, *args)

    monkeypatch.setattr(aead, "_slow", slow)
    view, arena = _arena(kind, size + 16)
    arena[:size] = data
    assert aead.encrypt_into(nonce, view(0, size), aad, view(0, size + 16)) == size + 16
    assert arena == expected
    assert aead.decrypt_into(nonce, view(0, size + 16), aad, view(0, size)) == size
    assert arena[:size] == data
    arena[:] = expected[:-1] + bytes([expected[-1] ^ 1])
    with pytest.raises(InvalidTag):
        aead.decrypt_into(nonce, view(0, size + 16), aad, view(0, size))
    assert arena[:size] == bytes(size), "no plaintext of a forged message is left in buf"
    assert general_path == [], "an in-place call that cryptography refused took the general path"
    arena[:size] = data  # a bad nonce is cryptography's error, whichever check comes first
    with pytest.raises(ValueError, match="Nonce must be"):
        aead.encrypt_into(os.urandom(5), view(0, size), aad, view(0, size + 16))
    assert arena[:size] == data


@pytest.mark.parametrize("name", ["aes-256-gcm", "chacha20-poly1305"])
def test_in_place_with_associated_data_past_openssls_call_where_cryptography_refuses(name, monkeypatch):
    """cryptography 51 refuses an in-place call for the overlap before it looks at the
    associated data's length: a message with more than 2**31 - 1 bytes of it (which
    gpucrypt composes) must not go to OpenSSL's one-shot call from there (OverflowError,
    where the same call worked on 50 and apart)."""
    from gpucrypt.backends import cpu

    cls, key_len, nonce_len = CLASSES[name]
    key, nonce, data = os.urandom(key_len), os.urandom(nonce_len), os.urandom(64)
    aad = np.zeros(2**31, np.uint8)  # untouched pages: no memory of its own
    aead = cls(key, device="cpu")
    sealed = bytearray(80)
    aead.encrypt_into(nonce, data, aad, sealed)  # apart: the composed reference
    monkeypatch.setattr(cpu, "AEAD_INTO_IN_PLACE", False)
    aead._direct = aead._small_direct = aead._openssl = _RefusingOverlap(aead._openssl)
    buf = bytearray(data + bytes(16))
    aead.encrypt_into(nonce, memoryview(buf)[:64], aad, buf)
    assert buf == sealed
    aead.decrypt_into(nonce, buf, aad, memoryview(buf)[:64])
    assert buf[:64] == data


@pytest.mark.parametrize("name", ["aes-256-gcm", "chacha20-poly1305"])
def test_in_place_where_cryptography_refuses_keeps_the_algorithms_limits(name, monkeypatch):
    """cryptography 51 refuses an in-place decryption's overlap before its length, so a
    message past OpenSSL's one call reached the in-place route unchecked: refused there by
    the algorithm's limit (OverflowError, nothing touched), as on the general path. The
    limit is lowered here so that a small message stands for one of 64 GiB."""
    from gpucrypt.backends import cpu

    cls, key_len, nonce_len = CLASSES[name]
    key, nonce, data = os.urandom(key_len), os.urandom(nonce_len), os.urandom(200)
    aead = cls(key, device="cpu")
    sealed = bytearray(aead.encrypt(nonce, data, None))
    monkeypatch.setattr(cpu, "AEAD_INTO_IN_PLACE", False)
    aead._direct = aead._small_direct = aead._openssl = _RefusingOverlap(aead._openssl)
    monkeypatch.setattr(aead, "_max_data", 100)
    before = bytes(sealed)
    with pytest.raises(OverflowError, match="limit"):
        aead.decrypt_into(nonce, sealed, None, memoryview(sealed)[:200])
    assert sealed == before
    buf = bytearray(data + bytes(16))
    with pytest.raises(OverflowError, match="limit"):
        aead.encrypt_into(nonce, memoryview(buf)[:200], None, buf)
    assert buf[:200] == data
