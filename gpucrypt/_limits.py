"""Algorithm limits, in one place. Every check is made before any keystream is produced.

ChaCha20 (RFC 8439) has a 32-bit block counter: one nonce covers 2**32 blocks of
64 bytes. In the AEAD, block 0 makes the Poly1305 key, so a message may hold
(2**32 - 1) * 64 bytes. GCM (SP 800-38D) allows 2**32 - 2 blocks of 16 bytes of
plaintext per invocation, and associated data up to 2**61 - 1 bytes; the nonce
may be any length from 1 byte to 2**61 - 1 bytes (we cap it at 2**16 bytes: a
longer IV gains nothing and only feeds GHASH).
"""
from __future__ import annotations

TAG_SIZE = 16

CHACHA20POLY1305_MAX_PLAINTEXT = (2**32 - 1) * 64
CHACHA20POLY1305_MAX_AAD = 2**64 - 1

GCM_MAX_PLAINTEXT = (2**32 - 2) * 16
GCM_MAX_AAD = 2**61 - 1
GCM_MIN_NONCE = 1
GCM_MAX_NONCE = 2**16


def check_length(what: str, length: int, limit: int, algorithm: str) -> None:
    if length > limit:
        raise OverflowError(
            f"{what} is {length} bytes, over {algorithm}'s limit of {limit} bytes for one "
            f"message: a longer message would repeat the keystream. Split it into several "
            f"messages (gpucrypt.stream does that for you).")
