"""Algorithm limits, in one place. Every check is made before any keystream is produced.

ChaCha20 (RFC 8439) has a 32-bit block counter: one nonce covers 2**32 blocks of
64 bytes. In the AEAD, block 0 makes the Poly1305 key, so a message may hold
(2**32 - 1) * 64 bytes. GCM (SP 800-38D) allows 2**32 - 2 blocks of 16 bytes of
plaintext per invocation, and associated data up to 2**61 - 1 bytes; the nonce
may be any length from 1 byte to 2**61 - 1 bytes (the backends cap it at 2**16 bytes:
a longer IV gains nothing and only feeds GHASH; the public ``AESGCM`` takes
``cryptography``'s 8..128 bytes).
"""
from __future__ import annotations

TAG_SIZE = 16

CHACHA20POLY1305_MAX_PLAINTEXT = (2**32 - 1) * 64
#: raw ChaCha20's keystream for one nonce: 2**32 blocks of 64 bytes from block 0 (a 32-bit
#: counter), and cryptography's words for going past it
CHACHA20_KEYSTREAM_BYTES = 2**32 * 64
CHACHA20_OVERFLOW = ("Exceeded the maximum number of bytes that can be encrypted with ChaCha20 "
                     "for this nonce. The 32-bit counter portion of the nonce would overflow.")


def check_chacha20_keystream(iv: bytes, position: int, nbytes: int) -> None:
    """``ValueError`` (cryptography's) unless ``nbytes`` of raw ChaCha20 keystream from byte
    ``position`` fit before the 32-bit block counter that ``iv`` (counter || nonce, as
    cryptography takes it) starts from would wrap: past it, the keystream repeats (a
    32-bit counter) or becomes another nonce's (a wider one)."""
    first_block = int.from_bytes(iv[:4], "little")
    if first_block * 64 + position + nbytes > CHACHA20_KEYSTREAM_BYTES:
        raise ValueError(CHACHA20_OVERFLOW)
CHACHA20POLY1305_MAX_AAD = 2**64 - 1

GCM_MAX_PLAINTEXT = (2**32 - 2) * 16
GCM_MAX_AAD = 2**61 - 1
GCM_MIN_NONCE = 1
GCM_MAX_NONCE = 2**16
#: the GCM nonce lengths cryptography's AESGCM (OpenSSL) takes, and so gpucrypt.AESGCM, its
#: drop-in: other lengths are ValueError there. The backends take GCM_MIN_NONCE..GCM_MAX_NONCE.
OPENSSL_GCM_MIN_NONCE = 8
OPENSSL_GCM_MAX_NONCE = 128


def check_length(what: str, length: int, limit: int, algorithm: str) -> None:
    """OverflowError if ``what`` (``"associated_data"``, or the message's plaintext, which
    a ciphertext holds 16 bytes less of) is over ``algorithm``'s ``limit``."""
    if length <= limit:
        return
    if what == "associated_data":
        raise OverflowError(f"associated_data is {length} bytes, over {algorithm}'s limit of "
                            f"{limit} bytes for one message: pass a hash of it instead")
    raise OverflowError(
        f"{what} is {length} bytes (of plaintext), over {algorithm}'s limit of {limit} bytes "
        f"for one message: a longer message would repeat the keystream, so no ciphertext "
        f"this long is valid. Split data into several messages (gpucrypt.stream does that "
        f"for you).")
