"""An HPKE (RFC 9180) base-mode opener written from the RFC, independent of gpucrypt and of
``cryptography.hazmat.primitives.hpke``: HKDF-SHA256 from ``hmac``, the KEMs from
``cryptography``'s X25519 and ML-KEM-768 primitives, ChaCha20-Poly1305 as the AEAD.

Two KEMs, the two of gpucrypt's stanzas: DHKEM(X25519, HKDF-SHA256) (0x0020) and X-Wing
(0x647A, draft-connolly-cfrg-xwing-kem: ML-KEM-768 and X25519, combined with SHA3-256).
Checked against the RFC's and the X-Wing draft's vectors as ``cryptography_vectors``
installs them (tests/test_envelope.py), then used to open gpucrypt's stanzas.
"""
from __future__ import annotations

import hashlib
import hmac

from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

DHKEM_X25519, XWING = 0x0020, 0x647A
_KDF_HKDF_SHA256, _AEAD_CHACHA20POLY1305 = 0x0001, 0x0003
_XWING_LABEL = b"\\.//^\\"


def _extract(salt: bytes, ikm: bytes) -> bytes:
    return hmac.new(salt or bytes(32), ikm, hashlib.sha256).digest()


def _expand(prk: bytes, info: bytes, length: int) -> bytes:
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out, counter = out + block, counter + 1
    return out[:length]


def _labeled_extract(suite: bytes, salt: bytes, label: bytes, ikm: bytes) -> bytes:
    return _extract(salt, b"HPKE-v1" + suite + label + ikm)


def _labeled_expand(suite: bytes, prk: bytes, label: bytes, info: bytes, length: int) -> bytes:
    return _expand(prk, length.to_bytes(2, "big") + b"HPKE-v1" + suite + label + info, length)


def xwing_keys(seed: bytes) -> tuple[bytes, bytes]:
    """(ML-KEM-768 seed d || z, X25519 private key) of an X-Wing decapsulation key: the
    32-byte seed expanded by SHAKE256 to 96 bytes."""
    expanded = hashlib.shake_256(seed).digest(96)
    return expanded[:64], expanded[64:]


def decapsulate(kem_id: int, private: tuple[bytes, bytes] | bytes, enc: bytes) -> bytes:
    """The shared secret: ``private`` is the X25519 key (DHKEM) or :func:`xwing_keys`'s pair."""
    if kem_id == DHKEM_X25519:
        key = x25519.X25519PrivateKey.from_private_bytes(private)
        dh = key.exchange(x25519.X25519PublicKey.from_public_bytes(enc))
        kem_context = enc + key.public_key().public_bytes_raw()
        suite = b"KEM" + kem_id.to_bytes(2, "big")
        return _labeled_expand(suite, _labeled_extract(suite, b"", b"eae_prk", dh),
                               b"shared_secret", kem_context, 32)
    mlkem_seed, x_private = private
    mlkem_ct, x_ct = enc[:1088], enc[1088:]
    ss_m = mlkem.MLKEM768PrivateKey.from_seed_bytes(mlkem_seed).decapsulate(mlkem_ct)
    x_key = x25519.X25519PrivateKey.from_private_bytes(x_private)
    ss_x = x_key.exchange(x25519.X25519PublicKey.from_public_bytes(x_ct))
    return hashlib.sha3_256(ss_m + ss_x + x_ct + x_key.public_key().public_bytes_raw()
                            + _XWING_LABEL).digest()


def key_schedule(kem_id: int, shared_secret: bytes, info: bytes) -> tuple[bytes, bytes]:
    """(key, base_nonce) of base mode with HKDF-SHA256 and ChaCha20-Poly1305."""
    suite = (b"HPKE" + kem_id.to_bytes(2, "big") + _KDF_HKDF_SHA256.to_bytes(2, "big")
             + _AEAD_CHACHA20POLY1305.to_bytes(2, "big"))
    context = (b"\x00" + _labeled_extract(suite, b"", b"psk_id_hash", b"")
               + _labeled_extract(suite, b"", b"info_hash", info))
    secret = _labeled_extract(suite, shared_secret, b"secret", b"")
    return (_labeled_expand(suite, secret, b"key", context, 32),
            _labeled_expand(suite, secret, b"base_nonce", context, 12))


def open_sealed(kem_id: int, private, enc: bytes, ct: bytes, info: bytes, aad: bytes,
                seq: int = 0) -> bytes:
    key, base_nonce = key_schedule(kem_id, decapsulate(kem_id, private, enc), info)
    nonce = (int.from_bytes(base_nonce, "big") ^ seq).to_bytes(12, "big")
    return ChaCha20Poly1305(key).decrypt(nonce, ct, aad)
