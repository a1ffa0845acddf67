"""Test helpers shared by several test modules: the reference AEADs, the tensor
metadata written by hand from docs/TENSOR_FORMAT.md, and the GPU backend or a skip.

Kept out of the test modules so that importing them runs no test module's code.
"""
from __future__ import annotations

import os
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from nacl import bindings as sodium


def reference_seal(algorithm: str, key: bytes, nonce: bytes, data: bytes, aad: bytes) -> bytes:
    """``ciphertext || tag`` from the reference: libsodium for XChaCha20-Poly1305,
    cryptography for ChaCha20-Poly1305 and AES-GCM (any name with "gcm")."""
    if algorithm == "xchacha20-poly1305":
        return sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(data, aad, nonce, key)
    if algorithm == "chacha20-poly1305":
        return ChaCha20Poly1305(key).encrypt(nonce, data, aad)
    assert "gcm" in algorithm, algorithm
    return AESGCM(key).encrypt(nonce, data, aad)


def hand_metadata(*, algorithm, framework, dtype, shape, nbytes, key_id=None, name=None) -> bytes:
    """The tensor metadata block written from the table in docs/TENSOR_FORMAT.md."""
    alg = {"chacha20-poly1305": 1, "xchacha20-poly1305": 2, "aes-gcm": 3}[algorithm]
    fwk = {"numpy": 1, "torch": 2, "cupy": 3, "jax": 4, "numba": 5}[framework]
    if key_id is None:
        kid_kind, kid = 0, b""
    elif isinstance(key_id, str):
        kid_kind, kid = 2, key_id.encode()
    else:
        kid_kind, kid = 1, key_id
    name_kind, nm = (0, b"") if name is None else (1, name.encode())
    out = b"GCTENS" + bytes([1, alg, fwk, len(shape), len(dtype), kid_kind])
    out += struct.pack("<H", len(kid)) + bytes([name_kind, 0]) + struct.pack("<H", len(nm))
    out += struct.pack("<Q", nbytes) + b"".join(struct.pack("<Q", d) for d in shape)
    return out + dtype.encode() + kid + nm


def check_tensor_is_reference_aead(x, *, framework, dtype, shape, nbytes, algorithm, key,
                                   as_bytes) -> None:
    """``encrypt_tensor(x)`` is the reference AEAD over ``x``'s bytes, with the
    hand-written metadata (and a key id and user aad) as associated data."""
    import gpucrypt

    enc = gpucrypt.encrypt_tensor(x, key, algorithm=algorithm, key_id="kms/1", aad=b"x")
    aad = hand_metadata(algorithm=algorithm, framework=framework, dtype=dtype, shape=shape,
                        nbytes=nbytes, key_id="kms/1") + b"x"
    assert enc.associated_data() == aad
    assert as_bytes(enc.ciphertext) + enc.tag == reference_seal(algorithm, key, enc.nonce,
                                                                as_bytes(x), aad)


def require_gpu_backend():
    """The GPU backend, or a skip with the reason (a failure under GPUCRYPT_REQUIRE_GPU=1)."""
    from gpucrypt.backends import BackendUnavailable, get_backend

    try:
        return get_backend("gpu")
    except BackendUnavailable as exc:
        if os.environ.get("GPUCRYPT_REQUIRE_GPU") == "1":
            pytest.fail(f"GPUCRYPT_REQUIRE_GPU=1 but the gpu backend is unavailable: {exc}")
        pytest.skip(f"gpu backend unavailable: {exc}")
