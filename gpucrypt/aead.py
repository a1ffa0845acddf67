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
from cryptography.hazmat.primitives.ciphers import aead as _openssl

from . import _limits
from ._buffers import bytes_arg, optional_readable, plain_bytes, readable, writable
from ._host_primitives import xchacha20_key_nonce
from .backends import AUTO_GPU_THRESHOLD, AeadContext, Backend, select_backend, small_payloads_on_cpu

#: largest message the fast path hands to OpenSSL directly: below both cryptography's
#: own cap and the size from which ``auto`` may choose the GPU
_FAST_PATH_MAX = min(2**31 - 1, AUTO_GPU_THRESHOLD - 1)

__all__ = ["ChaCha20Poly1305", "XChaCha20Poly1305", "AESGCM", "InvalidTag", "BatchInvalidTag"]


class BatchInvalidTag(InvalidTag):
    """Some messages of a ``decrypt_many`` batch failed authentication.

    ``failed`` lists their indices. No plaintext of the batch was returned.
    """

    def __init__(self, failed: list[int]):
        super().__init__(f"{len(failed)} message(s) failed authentication: indices {failed[:20]}"
                         + (" ..." if len(failed) > 20 else ""))
        self.failed = failed


def _key_bytes(key: Any) -> bytes:
    return bytes_arg(key, "key")


def _nonce_bytes(nonce: Any) -> bytes:
    return nonce if isinstance(nonce, bytes) else bytes_arg(nonce, "nonce")


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
        # Fails now, with the reason, if the device can't work. GPUCRYPT_DEVICE is read
        # here, once, for small messages (os.environ costs a microsecond per lookup).
        self._small_on_cpu = small_payloads_on_cpu(device)
        self._openssl = self._make_openssl(self._key)

    # --- the CPU fast path -------------------------------------------------------------
    # For bytes in and bytes out below the GPU threshold, the public classes call
    # OpenSSL through cryptography directly: the layering costs nothing there. Everything
    # else (other buffer types, _into forms on arrays, long messages, odd GCM nonces, the
    # GPU) takes the general path below, which produces the same bytes.
    _openssl_nonce_range = (12, 12)

    def _make_openssl(self, key: bytes):
        return None

    _fast_max = _FAST_PATH_MAX

    def _fast(self, nonce, data, associated_data):
        """cryptography's AEAD object when this call may go straight to OpenSSL, else None."""
        openssl = self._openssl
        if openssl is None or type(nonce) is not bytes or not plain_bytes(data):
            return None
        if associated_data is not None and not plain_bytes(associated_data):
            return None
        lo, hi = self._openssl_nonce_range
        if not lo <= len(nonce) <= hi or len(data) > self._fast_max or not self._small_on_cpu:
            return None
        if associated_data is not None and len(associated_data) > self._fast_max:
            return None
        return openssl

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
        fast = self._fast(nonce, data, associated_data)
        if fast is not None:
            return fast.encrypt(nonce, data, associated_data)
        src = readable(data)
        out = bytearray(len(src) + _limits.TAG_SIZE)
        self._encrypt_views(nonce, src, associated_data, memoryview(out))
        return bytes(out)

    def encrypt_into(self, nonce: Any, data: Any, associated_data: Any, buf: Any) -> int:
        """Write ``ciphertext || tag`` into ``buf`` (exactly ``len(data) + 16`` bytes)."""
        fast = self._fast(nonce, data, associated_data)
        if fast is not None and plain_bytes(buf, writable=True) and hasattr(fast, "encrypt_into"):
            return fast.encrypt_into(nonce, data, associated_data, buf)
        src = readable(data)
        out = writable(buf)
        if len(out) != len(src) + _limits.TAG_SIZE:
            raise ValueError(f"buffer must be {len(src) + _limits.TAG_SIZE} bytes")
        self._encrypt_views(nonce, src, associated_data, out)
        return len(out)

    def decrypt(self, nonce: Any, data: Any, associated_data: Any) -> bytes:
        """The plaintext, or ``InvalidTag`` if anything was altered (nothing is returned then)."""
        fast = self._fast(nonce, data, associated_data)
        if fast is not None:
            return fast.decrypt(nonce, data, associated_data)
        src = readable(data)
        out = bytearray(max(len(src) - _limits.TAG_SIZE, 0))
        self._decrypt_views(nonce, src, associated_data, memoryview(out))
        return bytes(out)

    def decrypt_into(self, nonce: Any, data: Any, associated_data: Any, buf: Any) -> int:
        """Write the plaintext into ``buf`` (``len(data) - 16`` bytes); zeroed on ``InvalidTag``."""
        fast = self._fast(nonce, data, associated_data)
        if fast is not None and plain_bytes(buf, writable=True) and hasattr(fast, "decrypt_into") \
                and len(buf) == len(data) - _limits.TAG_SIZE:
            try:
                return fast.decrypt_into(nonce, data, associated_data, buf)
            except InvalidTag:
                memoryview(buf)[:] = bytes(len(buf))  # cryptography leaves unauthenticated plaintext here
                raise
        src = readable(data)
        out = writable(buf)
        if len(out) != max(len(src) - _limits.TAG_SIZE, 0):
            raise ValueError(f"buffer must be {len(src) - _limits.TAG_SIZE} bytes")
        self._decrypt_views(nonce, src, associated_data, out)
        return len(out)

    # --- batches: one launch per step on the GPU ---
    def encrypt_many(self, messages: Any) -> list[bytes]:
        """``encrypt`` over an iterable of ``(nonce, data, associated_data)``, as one batch.

        On the GPU the whole list is one host-to-device copy and one launch per step.
        Reusing a nonce under one key within (or across) batches is the caller's error
        to avoid, as with ``encrypt``.
        """
        nonces, datas, aads = self._prepare_many(messages, tag_len=0)
        backend = select_backend(self._device, sum(len(d) for d in datas))
        return [bytes(x) for x in backend.seal_many(self._batch_algorithm, self._key, nonces, datas, aads)]

    def decrypt_many(self, messages: Any, *, allow_failures: bool = False) -> list:
        """``decrypt`` over an iterable of ``(nonce, data, associated_data)``, as one batch.

        If any message fails authentication: raises :class:`BatchInvalidTag` naming them
        and returns nothing, or with ``allow_failures=True`` returns ``None`` in their
        places (their plaintext is never released).
        """
        nonces, datas, aads = self._prepare_many(messages, tag_len=_limits.TAG_SIZE)
        backend = select_backend(self._device, sum(len(d) for d in datas))
        plain = backend.open_many(self._batch_algorithm, self._key, nonces, datas, aads)
        failed = [i for i, p in enumerate(plain) if p is None]
        if failed and not allow_failures:
            raise BatchInvalidTag(failed)
        return [None if p is None else bytes(p) for p in plain]

    @property
    def _batch_algorithm(self) -> str:
        return self._algorithm

    def _prepare_many(self, messages, tag_len: int):
        nonces, datas, aads = [], [], []
        for item in messages:
            try:
                nonce, data, associated_data = item
            except (TypeError, ValueError):
                raise TypeError("each message must be a (nonce, data, associated_data) tuple") from None
            nonce = _nonce_bytes(nonce)
            self._check_nonce(nonce)
            src = readable(data)
            aad = optional_readable(associated_data, "associated_data")
            _limits.check_length("data", max(len(src) - tag_len, 0), self._max_data, self._display)
            _limits.check_length("associated_data", len(aad), self._max_aad, self._display)
            nonces.append(nonce)
            datas.append(src)
            aads.append(bytes(aad))
        return nonces, datas, aads

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

    def _make_openssl(self, key):
        return _openssl.ChaCha20Poly1305(key)

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

    _openssl_nonce_range = (24, 24)
    # Above this, the general path (HChaCha20 subkey + OpenSSL's ChaCha20-Poly1305) is
    # faster than libsodium's portable code (measured: equal at 16 KiB, 5x at 1 MiB).
    _fast_max = 16 << 10

    def _make_openssl(self, key):
        # A subkey per nonce leaves no single OpenSSL object to call; libsodium, where
        # PyNaCl is installed, is the reference itself and one C call per message.
        return _Libsodium.create(key)

    def _backend_key_nonce(self, nonce):
        return xchacha20_key_nonce(self._key, nonce)

    @property
    def _batch_algorithm(self) -> str:
        return "xchacha20-poly1305"


class _Libsodium:
    """XChaCha20-Poly1305 through PyNaCl (libsodium), with cryptography's interface."""

    def __init__(self, key: bytes, bindings):
        self._key = key
        self._b = bindings

    @classmethod
    def create(cls, key: bytes):
        try:
            from nacl import bindings
        except ImportError:
            return None
        return cls(key, bindings)

    # PyNaCl takes bytes only; the fast path sends at most 16 KiB here, so copies are cheap.
    def encrypt(self, nonce, data, associated_data):
        aad = None if associated_data is None else bytes(associated_data)
        return self._b.crypto_aead_xchacha20poly1305_ietf_encrypt(bytes(data), aad, nonce, self._key)

    def decrypt(self, nonce, data, associated_data):
        from nacl.exceptions import CryptoError

        if len(data) < 16:  # PyNaCl fails on these with ValueError before libsodium runs
            raise InvalidTag()
        try:
            aad = None if associated_data is None else bytes(associated_data)
            return self._b.crypto_aead_xchacha20poly1305_ietf_decrypt(bytes(data), aad, nonce, self._key)
        except CryptoError:
            raise InvalidTag() from None

    def encrypt_into(self, nonce, data, associated_data, buf):
        if len(buf) != len(data) + 16:
            raise ValueError(f"buffer must be {len(data) + 16} bytes")
        buf[:] = memoryview(self.encrypt(nonce, data, associated_data))
        return len(buf)

    def decrypt_into(self, nonce, data, associated_data, buf):
        buf[:] = memoryview(self.decrypt(nonce, data, associated_data))
        return len(buf)


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

    _openssl_nonce_range = (8, 128)  # what OpenSSL accepts; other lengths take the general path

    def _check_key(self, key):
        if len(key) not in (16, 24, 32):
            raise ValueError("AESGCM key must be 128, 192, or 256 bits.")

    def _make_openssl(self, key):
        return _openssl.AESGCM(key)

    def _check_nonce(self, nonce):
        if not _limits.GCM_MIN_NONCE <= len(nonce) <= _limits.GCM_MAX_NONCE:
            raise ValueError(f"Nonce must be between {_limits.GCM_MIN_NONCE} and "
                             f"{_limits.GCM_MAX_NONCE} bytes")
