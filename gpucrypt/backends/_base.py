"""The contract every backend implements.

A backend does the bulk work for the public classes, which have already checked
types, sizes and limits. Two AEADs are enough at this level: XChaCha20-Poly1305
is ChaCha20-Poly1305 under an HChaCha20 subkey, derived in the public layer.

Algorithm names: ``"chacha20-poly1305"`` and ``"aes-gcm"`` for AEADs,
``"chacha20"`` and ``"aes-ctr"`` for raw keystreams.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

AEAD_ALGORITHMS = ("chacha20-poly1305", "aes-gcm")
STREAM_ALGORITHMS = ("chacha20", "aes-ctr")


class AeadContext(ABC):
    """One AEAD under one key, ready to use (keys expanded, library objects made).

    Buffers are flat ``uint8`` memoryviews. ``out`` never overlaps ``data`` unless
    it is the very same memory (in place), which both methods support.
    """

    @abstractmethod
    def seal(self, nonce: bytes, data: memoryview, aad: memoryview, out: memoryview) -> None:
        """Write ``ciphertext || tag`` (``len(data) + 16`` bytes) into ``out``."""

    @abstractmethod
    def open(self, nonce: bytes, data: memoryview, aad: memoryview, out: memoryview) -> None:
        """Verify the tag at the end of ``data``, then write the plaintext into ``out``.

        Raises ``cryptography.exceptions.InvalidTag`` on failure, with ``out`` zeroed:
        no unauthenticated plaintext is ever left in it.
        """


    def seal_detached(self, nonce: bytes, data: memoryview, aad: memoryview, out: memoryview,
                      threads: int = 1) -> bytes:
        """Encrypt ``data`` into ``out`` (``len(data)`` bytes; the same memory for in place)
        and return the 16-byte tag separately: for buffers that hold exactly the data.
        ``threads``: how many threads one large message may use (1: this one only)."""
        raise NotImplementedError(f"{type(self).__name__} has no detached-tag form")

    def open_detached(self, nonce: bytes, data: memoryview, tag: bytes, aad: memoryview,
                      out: memoryview, threads: int = 1) -> None:
        """Verify ``tag`` over ``data``, then decrypt into ``out`` (may be ``data`` itself).

        On ``InvalidTag`` no plaintext is left behind when the call returns: an in-place
        buffer holds exactly its ciphertext again, and a separate ``out`` is zeroed. A
        backend may get there by verifying before it writes, or (the CPU backend's
        ``one_pass`` form) by decrypting while it verifies and then restoring the
        ciphertext or zeroing ``out``; in that form another thread reading ``out`` during
        the call can see unauthenticated plaintext, so ``out`` must be private to the
        caller until the call returns. ``threads`` as for sealing.
        """
        raise NotImplementedError(f"{type(self).__name__} has no detached-tag form")


class Backend(ABC):
    """Bulk AEAD and keystream operations on host buffers."""

    #: registry name, e.g. ``"cpu"``
    name: str = ""

    @abstractmethod
    def aead(self, algorithm: str, key: bytes) -> AeadContext:
        """A context for ``algorithm`` (one of :data:`AEAD_ALGORITHMS`) under ``key``."""

    def seal_many(self, algorithm: str, key: bytes, nonces: list, datas: list, aads: list) -> list:
        """``ciphertext || tag`` (bytes-like) of each message; ``algorithm`` may also be
        ``"xchacha20-poly1305"``. This default runs the messages one by one; batching
        backends (the GPU) override it with one launch per step for the whole list."""
        contexts = self._contexts(algorithm, key)
        return [self._seal_one(*contexts(nonce), data, aad)
                for nonce, data, aad in zip(nonces, datas, aads)]

    def _seal_one(self, ctx: AeadContext, nonce: bytes, data: Any, aad: bytes) -> Any:
        """``ciphertext || tag`` of one message of a batch (bytes-like)."""
        buf = bytearray(len(data) + 16)
        ctx.seal(nonce, data, aad, memoryview(buf))
        return buf

    def _open_one(self, ctx: AeadContext, nonce: bytes, data: Any, aad: bytes) -> Any:
        """The plaintext of one message of a batch (bytes-like); ``InvalidTag`` if it fails."""
        buf = bytearray(len(data) - 16)
        ctx.open(nonce, data, aad, memoryview(buf))
        return buf

    def open_many(self, algorithm: str, key: bytes, nonces: list, datas: list, aads: list) -> list:
        """The plaintext (bytes-like) of each message, or ``None`` where its tag failed."""
        from cryptography.exceptions import InvalidTag

        out, contexts = [], self._contexts(algorithm, key)
        for nonce, data, aad in zip(nonces, datas, aads):
            if len(data) < 16:
                out.append(None)
                continue
            try:
                out.append(self._open_one(*contexts(nonce), data, aad))
            except InvalidTag:
                out.append(None)
        return out

    def _contexts(self, algorithm: str, key: bytes):
        """nonce -> (context, nonce) for a batch under one key: one context for the
        batch, except for XChaCha20-Poly1305, whose subkey depends on the nonce."""
        if algorithm == "xchacha20-poly1305":
            return lambda nonce: self.aead_for_nonce(algorithm, key, nonce)
        ctx = self.aead(algorithm, key)
        return lambda nonce: (ctx, nonce)

    def aead_for_nonce(self, algorithm: str, key: bytes, nonce: bytes) -> tuple[AeadContext, bytes]:
        """(context, nonce) for one message of ``algorithm``, which may also be
        ``"xchacha20-poly1305"``: then the context is ChaCha20-Poly1305 under the
        HChaCha20 subkey and the nonce is the 12-byte one it takes."""
        if algorithm == "xchacha20-poly1305":
            from .._host_primitives import xchacha20_key_nonce

            subkey, nonce = xchacha20_key_nonce(key, nonce)
            return self.aead("chacha20-poly1305", subkey), nonce
        return self.aead(algorithm, key), nonce

    @abstractmethod
    def xor_keystream(self, algorithm: str, key: bytes, iv: bytes, position: int,
                      data: memoryview, out: memoryview) -> None:
        """XOR the keystream, from byte ``position`` on, into ``data`` -> ``out``.

        ``iv`` is ``cryptography``'s 16-byte value: for ChaCha20 the little-endian
        32-bit block counter followed by the 96-bit nonce, for AES-CTR the initial
        counter block (full 128-bit big-endian increment).
        """

    def describe(self) -> dict:
        """What ``gpucrypt.info()`` shows about this backend."""
        return {"name": self.name}
