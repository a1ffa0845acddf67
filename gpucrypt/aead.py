"""Drop-in replacements for ``cryptography.hazmat.primitives.ciphers.aead``.

``gpucrypt.ChaCha20Poly1305``, ``gpucrypt.XChaCha20Poly1305`` and
``gpucrypt.AESGCM`` take the same arguments, return the same bytes and raise the
same exceptions as ``cryptography``'s classes (XChaCha20-Poly1305, which
``cryptography`` lacks, matches libsodium's ``crypto_aead_xchacha20poly1305_ietf``).
What they add:

- ``device="auto" | "cpu" | "gpu"`` chooses where the work runs
  (:mod:`gpucrypt.backends` holds the rules);
- any C-contiguous buffer is accepted as data and read as raw bytes (NumPy arrays
  of any dtype included);
- messages beyond ``cryptography``'s 2**31 - 1 bytes, up to each algorithm's own
  limit, and every GCM nonce length from 1 byte;
- ``decrypt_into`` zeroes its buffer when the tag is wrong.

This layer checks types, sizes and limits; the backends do the work.
"""
from __future__ import annotations

import os
from typing import Any

from cryptography.exceptions import InvalidTag

from . import _limits
from ._buffers import optional_readable, readable, writable
from ._host_primitives import hchacha20
from .backends import AeadContext, Backend, select_backend

__all__ = ["ChaCha20Poly1305", "XChaCha20Poly1305", "AESGCM", "InvalidTag"]


def _key_bytes(key: Any) -> bytes:
    try:
        return bytes(memoryview(key))
    except TypeError:
        raise TypeError(f"key must be bytes-like, not {type(key).__name__}") from None


def _nonce_bytes(nonce: Any) -> bytes:
    if isinstance(nonce, bytes):
        return nonce
    try:
        return bytes(memoryview(nonce))
    except TypeError:
        raise TypeError(f"nonce must be bytes-like, not {type(nonce).__name__}") from None


class _Aead:
    """What the three public classes share: argument rules, limits and dispatch."""

    _algorithm = ""          # backend algorithm name
    _display = ""            # the name in error messages
    _max_data = 0
    _max_aad = 0

    def __init__(self, key: Any, *, device: str = "auto"):
        self._key = _key_bytes(key)
        self._check_key(self._key)
        self._device = device
        self._contexts: dict[int, AeadContext] = {}
        select_backend(device, 0)  # fail now, with the reason, if the device can't work

    def __repr__(self) -> str:  # never shows the key
        return f"{type(self).__name__}(device={self._device!r})"

    # --- hooks for the subclasses ---
    def _check_key(self, key: bytes) -> None:
        raise NotImplementedError

    def _check_nonce(self, nonce: bytes) -> None:
        raise NotImplementedError

    def _backend_key_nonce(self, nonce: bytes) -> tuple[bytes, bytes]:
        return self._key, nonce

    # --- dispatch ---
    def _context(self, backend: Backend, key: bytes) -> AeadContext:
        if key is not self._key:  # XChaCha20: a subkey per nonce, nothing to cache
            return backend.aead(self._algorithm, key)
        ctx = self._contexts.get(id(backend))
        if ctx is None:
            ctx = self._contexts[id(backend)] = backend.aead(self._algorithm, key)
        return ctx

    def _prepare(self, nonce, data, associated_data, plaintext_len):
        nonce = _nonce_bytes(nonce)
        self._check_nonce(nonce)
        aad = optional_readable(associated_data, "associated_data")
        _limits.check_length("data", plaintext_len, self._max_data, self._display)
        _limits.check_length("associated_data", len(aad), self._max_aad, self._display)
        backend = select_backend(self._device, len(data))
        key, nonce = self._backend_key_nonce(nonce)
        return self._context(backend, key), nonce, aad

    # --- public API, as in cryptography ---
    def encrypt(self, nonce: Any, data: Any, associated_data: Any) -> bytes:
        """``ciphertext || tag`` of ``data`` under ``nonce``, authenticating ``associated_data``."""
        src = readable(data)
        out = bytearray(len(src) + _limits.TAG_SIZE)
        self._encrypt_views(nonce, src, associated_data, memoryview(out))
        return bytes(out)

    def encrypt_into(self, nonce: Any, data: Any, associated_data: Any, buf: Any) -> int:
        """Write ``ciphertext || tag`` into ``buf`` (exactly ``len(data) + 16`` bytes)."""
        src = readable(data)
        out = writable(buf)
        if len(out) != len(src) + _limits.TAG_SIZE:
            raise ValueError(f"buffer must be {len(src) + _limits.TAG_SIZE} bytes")
        self._encrypt_views(nonce, src, associated_data, out)
        return len(out)

    def decrypt(self, nonce: Any, data: Any, associated_data: Any) -> bytes:
        """The plaintext, or ``InvalidTag`` if anything was altered (nothing is returned then)."""
        src = readable(data)
        out = bytearray(max(len(src) - _limits.TAG_SIZE, 0))
        self._decrypt_views(nonce, src, associated_data, memoryview(out))
        return bytes(out)

    def decrypt_into(self, nonce: Any, data: Any, associated_data: Any, buf: Any) -> int:
        """Write the plaintext into ``buf`` (``len(data) - 16`` bytes); zeroed on ``InvalidTag``."""
        src = readable(data)
        out = writable(buf)
        if len(src) < _limits.TAG_SIZE:
            raise InvalidTag()
        if len(out) != len(src) - _limits.TAG_SIZE:
            raise ValueError(f"buffer must be {len(src) - _limits.TAG_SIZE} bytes")
        self._decrypt_views(nonce, src, associated_data, out)
        return len(out)

    def _encrypt_views(self, nonce, src, associated_data, out):
        ctx, nonce, aad = self._prepare(nonce, src, associated_data, len(src))
        ctx.seal(nonce, src, aad, out)

    def _decrypt_views(self, nonce, src, associated_data, out):
        if len(src) < _limits.TAG_SIZE:
            self._prepare(nonce, src, associated_data, 0)  # argument errors still come first
            raise InvalidTag()
        ctx, nonce, aad = self._prepare(nonce, src, associated_data, len(src) - _limits.TAG_SIZE)
        ctx.open(nonce, src, aad, out)


class ChaCha20Poly1305(_Aead):
    """ChaCha20-Poly1305 (RFC 8439): 32-byte key, 12-byte nonce, 16-byte tag."""

    _algorithm = "chacha20-poly1305"
    _display = "ChaCha20Poly1305"
    _max_data = _limits.CHACHA20POLY1305_MAX_PLAINTEXT
    _max_aad = _limits.CHACHA20POLY1305_MAX_AAD

    @classmethod
    def generate_key(cls) -> bytes:
        return os.urandom(32)

    def _check_key(self, key):
        if len(key) != 32:
            raise ValueError(f"{self._display} key must be 32 bytes.")

    def _check_nonce(self, nonce):
        if len(nonce) != 12:
            raise ValueError("Nonce must be 12 bytes")


class XChaCha20Poly1305(ChaCha20Poly1305):
    """XChaCha20-Poly1305 (draft-irtf-cfrg-xchacha, libsodium's ``_ietf`` variant).

    A 24-byte nonce, safe to pick at random for any number of messages: the first
    16 bytes derive a subkey with HChaCha20, the last 8 make the ChaCha20-Poly1305
    nonce ``0x00000000 || nonce[16:24]``.
    """

    _display = "XChaCha20Poly1305"

    def _check_nonce(self, nonce):
        if len(nonce) != 24:
            raise ValueError("Nonce must be 24 bytes")

    def _backend_key_nonce(self, nonce):
        return hchacha20(self._key, nonce[:16]), b"\x00\x00\x00\x00" + nonce[16:]


class AESGCM(_Aead):
    """AES-GCM (NIST SP 800-38D): 16/24/32-byte key, any nonce of 1 byte or more
    (12 bytes recommended), 16-byte tag."""

    _algorithm = "aes-gcm"
    _display = "AESGCM"
    _max_data = _limits.GCM_MAX_PLAINTEXT
    _max_aad = _limits.GCM_MAX_AAD

    @classmethod
    def generate_key(cls, bit_length: int) -> bytes:
        if not isinstance(bit_length, int):
            raise TypeError("bit_length must be an integer")
        if bit_length not in (128, 192, 256):
            raise ValueError("bit_length must be 128, 192, or 256")
        return os.urandom(bit_length // 8)

    def _check_key(self, key):
        if len(key) not in (16, 24, 32):
            raise ValueError("AESGCM key must be 128, 192, or 256 bits.")

    def _check_nonce(self, nonce):
        if not _limits.GCM_MIN_NONCE <= len(nonce) <= _limits.GCM_MAX_NONCE:
            raise ValueError(f"Nonce must be between {_limits.GCM_MIN_NONCE} and "
                             f"{_limits.GCM_MAX_NONCE} bytes")
