"""Known-answer files of the gpucrypt stream format (tests/vectors/stream, made by its
make_vectors.py), read three ways:

- by ``gpucrypt.stream`` (decrypt, random access, header parsing);
- re-encrypted with the recorded salt and nonce prefix: the same bytes must come out;
- by an independent decoder written here from docs/FORMAT.md alone, straight on
  ``cryptography`` (and PyNaCl/libsodium for XChaCha20-Poly1305), so a bug shared by
  the encoder and decoder of gpucrypt cannot hide.
"""
from __future__ import annotations

import hashlib
import hmac
import io
import json
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gpucrypt import stream

VECTORS = Path(__file__).parent / "vectors" / "stream"
CASES = json.loads((VECTORS / "manifest.json").read_text())["cases"]


def _ids(case):
    return case["name"]


@pytest.fixture(params=CASES, ids=_ids)
def case(request):
    c = dict(request.param)
    c["key"] = bytes.fromhex(c["key"])
    c["stream_bytes"] = (VECTORS / c["stream"]).read_bytes()
    c["plain_bytes"] = (VECTORS / c["plaintext"]).read_bytes()
    return c


def test_manifest_covers_every_algorithm_and_shape():
    algs = {c["algorithm"] for c in CASES}
    assert algs == set(stream.ALGORITHMS)
    for alg in algs:
        lengths = {c["plaintext_length"] for c in CASES if c["algorithm"] == alg}
        assert 0 in lengths and any(n > 2 * 4096 for n in lengths)


def test_files_unchanged(case):
    assert hashlib.sha256(case["stream_bytes"]).hexdigest() == case["stream_sha256"]
    assert len(case["plain_bytes"]) == case["plaintext_length"]


def test_decrypts_to_recorded_plaintext(case):
    out = io.BytesIO()
    header = stream.decrypt(case["stream_bytes"], out, case["key"], device="cpu")
    assert out.getvalue() == case["plain_bytes"]
    assert header.algorithm == case["algorithm"]
    assert header.segment_size == case["segment_size"]
    assert header.key_id == case["key_id"]
    assert header.envelope == (None if case["envelope"] is None else bytes.fromhex(case["envelope"]))


def test_random_access_reads_recorded_plaintext(case):
    with stream.open(io.BytesIO(case["stream_bytes"]), case["key"]) as f:
        assert f.read() == case["plain_bytes"]


def test_reencryption_reproduces_the_bytes(case):
    out = io.BytesIO()
    stream.encrypt(case["plain_bytes"], out, case["key"], algorithm=case["algorithm"],
                   segment_size=case["segment_size"], key_id=case["key_id"],
                   envelope=None if case["envelope"] is None else bytes.fromhex(case["envelope"]),
                   device="cpu", _salt=bytes.fromhex(case["salt"]),
                   _nonce_prefix=bytes.fromhex(case["nonce_prefix"]))
    assert out.getvalue() == case["stream_bytes"]


# ---------------------------------------------------------------- independent decoder
_ALG_IDS = {1: ("chacha20-poly1305", 12), 2: ("xchacha20-poly1305", 24), 3: ("aes-256-gcm", 12)}


def _hkdf(key, salt, info):
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(key)


def _xchacha_open(key, nonce, ct, aad):
    from nacl import bindings as nacl  # in the test extra
    return nacl.crypto_aead_xchacha20poly1305_ietf_decrypt(ct, aad, nonce, key)


def reference_decode(data: bytes, key: bytes) -> tuple[bytes, dict]:
    """docs/FORMAT.md, version 1, read literally."""
    assert data[:8] == b"GPUCRYPT" and data[8] == 1
    alg, nonce_len = _ALG_IDS[data[9]]
    seg = 1 << data[10]
    salt = data[11:43]
    prefix_len = nonce_len - 5
    prefix = data[43:43 + prefix_len]
    fixed = data[:43 + prefix_len]
    pos = len(fixed)
    (kid_len,) = struct.unpack(">H", data[pos:pos + 2])
    key_id = data[pos + 2:pos + 2 + kid_len].decode()
    pos += 2 + kid_len
    (env_len,) = struct.unpack(">I", data[pos:pos + 4])
    envelope = data[pos + 4:pos + 4 + env_len]
    pos += 4 + env_len
    mac = data[pos:pos + 32]
    mac_key = _hkdf(key, salt, b"gpucrypt stream v1 header mac" + fixed)
    assert hmac.compare_digest(hmac.new(mac_key, data[:pos], hashlib.sha256).digest(), mac)
    pos += 32
    seg_key = _hkdf(key, salt, b"gpucrypt stream v1 segment key" + fixed)
    body = data[pos:]
    chunks = [body[i:i + seg + 16] for i in range(0, len(body), seg + 16)] or [b""]
    out = bytearray()
    for i, chunk in enumerate(chunks):
        nonce = prefix + struct.pack(">I", i) + (b"\x01" if i == len(chunks) - 1 else b"\x00")
        if alg == "chacha20-poly1305":
            out += ChaCha20Poly1305(seg_key).decrypt(nonce, chunk, fixed)
        elif alg == "aes-256-gcm":
            out += AESGCM(seg_key).decrypt(nonce, chunk, fixed)
        else:
            out += _xchacha_open(seg_key, nonce, chunk, fixed)
    return bytes(out), {"algorithm": alg, "segment_size": seg, "key_id": key_id or None,
                        "envelope": envelope or None}


def test_independent_decoder_reads_the_vectors(case):
    plain, fields = reference_decode(case["stream_bytes"], case["key"])
    assert plain == case["plain_bytes"]
    assert fields["algorithm"] == case["algorithm"]
    assert fields["segment_size"] == case["segment_size"]
    assert fields["key_id"] == case["key_id"]


@pytest.mark.parametrize("algorithm", stream.ALGORITHMS)
@pytest.mark.parametrize("length", [0, 1, 4095, 4096, 4097, 3 * 4096 + 5])
def test_independent_decoder_reads_fresh_streams(algorithm, length):
    import os

    key, data = os.urandom(32), os.urandom(length)
    out = io.BytesIO()
    stream.encrypt(data, out, key, algorithm=algorithm, segment_size=4096, device="cpu",
                   key_id="k", envelope=b"e" * 10)
    assert reference_decode(out.getvalue(), key)[0] == data
