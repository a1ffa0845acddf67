"""Raw stream ciphers, drop-ins for ``cryptography``'s ``Cipher(...).encryptor()`` use.

    # Cipher(algorithms.ChaCha20(key, nonce16), None).encryptor()
    enc = gpucrypt.ciphers.ChaCha20(key, nonce16, device="auto").encryptor()
    # Cipher(algorithms.AES(key), modes.CTR(nonce16)).encryptor()
    enc = gpucrypt.ciphers.AESCTR(key, nonce16).encryptor()
    out = enc.update(data); n = enc.update_into(data, buf); enc.finalize()

The contexts behave as if all ``update`` calls had been one call over the
concatenated data, byte-identical to ``cryptography`` however the data is cut.
There is no authentication here: use the AEAD classes unless you add your own MAC.

ChaCha20's 16-byte ``nonce`` is ``cryptography``'s: a little-endian 32-bit block
counter, then the 96-bit nonce (RFC 8439). As in ``cryptography``, encrypting past
block 2**32 - 1 raises ``ValueError`` before any byte is produced, since the
keystream would repeat. AES-CTR's ``nonce`` is the initial 128-bit counter block,
incremented as one big-endian 128-bit integer (SP 800-38A).
"""
from __future__ import annotations

import struct
from typing import Any

from cryptography.exceptions import AlreadyFinalized

from ._buffers import bytes_arg, plain_bytes, readable, writable
from .backends import AUTO_GPU_THRESHOLD, get_backend, select_backend, small_payloads_on_cpu

__all__ = ["ChaCha20", "AESCTR"]

_CHACHA20_OVERFLOW = ("Exceeded the maximum number of bytes that can be encrypted with ChaCha20 "
                      "for this nonce. The 32-bit counter portion of the nonce would overflow.")


def _cpu_backend():
    return get_backend("cpu")


class _StreamCipher:
    _algorithm = ""

    def __init__(self, key: Any, nonce: Any, *, device: str = "auto"):
        self._key = bytes_arg(key, "key")
        self._nonce = bytes_arg(nonce, "nonce")
        self._check(self._key, self._nonce)
        self._device = device
        self._small_on_cpu = small_payloads_on_cpu(device)  # as in the AEAD classes

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={self._device!r})"

    def _check(self, key: bytes, nonce: bytes) -> None:
        raise NotImplementedError

    def _max_position(self) -> int | None:
        """Keystream bytes available from this nonce, or None when unbounded in practice."""
        return None

    def encryptor(self) -> "StreamContext":
        return StreamContext(self)

    # XOR is its own inverse: decryption is the same keystream.
    decryptor = encryptor


class ChaCha20(_StreamCipher):
    """ChaCha20 (RFC 8439) with ``cryptography``'s 16-byte counter || nonce."""

    _algorithm = "chacha20"

    def _check(self, key, nonce):
        if len(key) != 32:
            raise ValueError(f"Invalid key size ({len(key) * 8}) for ChaCha20.")
        if len(nonce) != 16:
            raise ValueError("nonce must be 128-bits (16 bytes)")

    def _max_position(self):
        first_block = struct.unpack("<I", self._nonce[:4])[0]
        return (2**32 - first_block) * 64


class AESCTR(_StreamCipher):
    """AES in counter mode (SP 800-38A): 16/24/32-byte key, 16-byte initial counter block."""

    _algorithm = "aes-ctr"

    def _check(self, key, nonce):
        if len(key) not in (16, 24, 32):
            raise ValueError(f"Invalid key size ({len(key) * 8}) for AES.")
        if len(nonce) != 16:
            raise ValueError(f"Invalid nonce size ({len(nonce)}) for CTR.")


class StreamContext:
    """An encryption (or decryption) in progress; ``update`` calls continue the keystream."""

    def __init__(self, cipher: _StreamCipher):
        self._cipher = cipher
        self._position = 0
        self._finalized = False
        self._limit = cipher._max_position()  # keystream bytes this nonce allows, or None
        self._cpu = None          # a positioned cryptography encryptor, reused across calls
        self._cpu_position = -1
        if cipher._small_on_cpu:  # small updates will run on the CPU: be ready for the first
            self._cpu = _cpu_backend().keystream_encryptor(cipher._algorithm, cipher._key, cipher._nonce, 0)
            self._cpu_position = 0

    def update(self, data: Any) -> bytes:
        src = readable(data, "data")
        out = bytearray(len(src))
        self._xor(src, memoryview(out))
        return bytes(out)

    def update_into(self, data: Any, buf: Any) -> int:
        cpu = self._cpu
        if cpu is not None and self._cpu_position == self._position and plain_bytes(data) \
                and plain_bytes(buf, writable=True) and len(data) < AUTO_GPU_THRESHOLD \
                and (self._limit is None or self._position + len(data) <= self._limit) \
                and not self._finalized:
            # the common case of a CPU stream in progress: OpenSSL reads these buffers as they are
            n = cpu.update_into(data, buf)
            self._position += n
            self._cpu_position = self._position
            return n
        src = readable(data, "data")
        out = writable(buf, "buf")
        if len(out) < len(src):
            raise ValueError(f"buffer must be at least {len(src)} bytes for this payload")
        self._xor(src, out[: len(src)])
        return len(src)

    def finalize(self) -> bytes:
        self._ensure_open()
        self._finalized = True
        self._cpu = None
        return b""

    def _ensure_open(self) -> None:
        if self._finalized:
            raise AlreadyFinalized("Context was already finalized.")

    def _xor(self, src: memoryview, out: memoryview) -> None:
        self._ensure_open()
        cipher = self._cipher
        limit = self._limit
        if limit is not None and self._position + len(src) > limit:
            raise ValueError(_CHACHA20_OVERFLOW)
        if not src:
            return
        if cipher._small_on_cpu and len(src) < AUTO_GPU_THRESHOLD:
            backend = _cpu_backend()
        else:
            backend = select_backend(cipher._device, len(src))
        if backend.name == "cpu":
            self._xor_cpu(backend, src, out)
        else:
            backend.xor_keystream(cipher._algorithm, cipher._key, cipher._nonce, self._position, src, out)
        self._position += len(src)

    def _xor_cpu(self, backend, src: memoryview, out: memoryview) -> None:
        if self._cpu is None or self._cpu_position != self._position:
            self._cpu = backend.keystream_encryptor(self._cipher._algorithm, self._cipher._key,
                                                    self._cipher._nonce, self._position)
        self._cpu.update_into(src, out)
        self._cpu_position = self._position + len(src)
