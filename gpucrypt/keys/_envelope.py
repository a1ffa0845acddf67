"""The envelope byte string: a versioned list of stanzas, each wrapping one file's data key.

Layout, version 1 (all integers big-endian; docs/KEYS.md has the same table)::

    offset  size  field
    0       4     magic b"GCEV"
    4       1     version = 1
    5       1     number of stanzas, 1..255
    6       ...   stanzas, one after the other:
                    1   type (see STANZA_TYPES)
                    1   recipient id length L (1..255)
                    L   recipient id
                    2   body length B (1..65535)
                    B   body (the wrapped data key)

Nothing may follow the last stanza, and no two stanzas may have the same type and
recipient id: a writer wraps once per recipient, and a reader would otherwise ask one
key (perhaps a KMS) to unwrap again and again before anything is authenticated. This
module only encodes and decodes; it knows nothing of keys. The envelope is authenticated
as a whole by the stream header's MAC (under a key derived from the data key), and each
body by its own wrapping (AES-KWP's integrity check, HPKE's AEAD tag).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

MAGIC = b"GCEV"
VERSION = 1
MAX_STANZAS = 255

#: stanza type byte -> name
STANZA_TYPES = {
    1: "aes-kwp",                 # symmetric KEK, RFC 5649; id = keyset key id (UTF-8)
    2: "hpke-x25519",             # RFC 9180 base mode, DHKEM(X25519, HKDF-SHA256); id = fingerprint
    3: "hpke-mlkem768-x25519",    # RFC 9180 with the ML-KEM-768 + X25519 hybrid KEM; id = fingerprint
    4: "key-ref",                 # a key inside a provider (HSM, KMS); id = its reference URI,
                                  # body = the provider's wrapped form (keys.references)
    5: "scrypt",                  # a passphrase (keys.passphrase); id = salt || log2(N)
}
STANZA_CODES = {name: code for code, name in STANZA_TYPES.items()}


class EnvelopeFormatError(ValueError):
    """The bytes are not a well-formed envelope of a version this code reads."""


@dataclass(frozen=True)
class Stanza:
    """One wrapped copy of the data key. ``kind`` is a name from :data:`STANZA_TYPES`."""

    kind: str
    recipient_id: bytes
    body: bytes

    def __repr__(self) -> str:  # the body is a wrapped key: public, but no use in a repr
        return f"Stanza({self.kind!r}, id={self.recipient_id.hex()}, {len(self.body)} bytes)"


def _duplicate(kind: str) -> str:
    return f"two {kind} stanzas for the same recipient id"


def encode(stanzas: list[Stanza]) -> bytes:
    """The envelope bytes for ``stanzas`` (1..255 of them, no two with the same type and
    recipient id)."""
    if not 1 <= len(stanzas) <= MAX_STANZAS:
        raise ValueError(f"an envelope holds 1 to {MAX_STANZAS} stanzas, not {len(stanzas)}")
    out, seen = bytearray(MAGIC + bytes([VERSION, len(stanzas)])), set()
    for stanza in stanzas:
        if stanza.kind not in STANZA_CODES:
            raise ValueError(f"unknown stanza type {stanza.kind!r}")
        if not 1 <= len(stanza.recipient_id) <= 255:
            raise ValueError("a stanza's recipient id must be 1 to 255 bytes")
        if not 1 <= len(stanza.body) <= 0xFFFF:
            raise ValueError("a stanza's body must be 1 to 65535 bytes")
        if (stanza.kind, stanza.recipient_id) in seen:
            raise ValueError(_duplicate(stanza.kind))
        seen.add((stanza.kind, stanza.recipient_id))
        out += bytes([STANZA_CODES[stanza.kind], len(stanza.recipient_id)]) + stanza.recipient_id
        out += struct.pack(">H", len(stanza.body)) + stanza.body
    return bytes(out)


def decode(envelope: bytes) -> list[Stanza]:
    """The stanzas of ``envelope``; :class:`EnvelopeFormatError` if it is malformed (two
    stanzas with the same type and recipient id included)."""
    data = bytes(envelope)
    if len(data) < 6 or data[:4] != MAGIC:
        raise EnvelopeFormatError("not a gpucrypt envelope (bad magic)")
    if data[4] != VERSION:
        raise EnvelopeFormatError(f"envelope version {data[4]} is not supported (this gpucrypt "
                                  f"reads version {VERSION})")
    count, pos, stanzas, seen = data[5], 6, [], set()
    if count == 0:
        raise EnvelopeFormatError("envelope holds no stanza")
    for _ in range(count):
        if pos + 2 > len(data):
            raise EnvelopeFormatError("envelope truncated")
        code, id_len = data[pos], data[pos + 1]
        if code not in STANZA_TYPES:
            raise EnvelopeFormatError(f"unknown stanza type {code}")
        pos += 2
        recipient_id = data[pos:pos + id_len]
        pos += id_len
        if id_len == 0 or len(recipient_id) != id_len or pos + 2 > len(data):
            raise EnvelopeFormatError("envelope truncated")
        (body_len,) = struct.unpack_from(">H", data, pos)
        pos += 2
        body = data[pos:pos + body_len]
        pos += body_len
        if body_len == 0 or len(body) != body_len:
            raise EnvelopeFormatError("envelope truncated")
        if (code, recipient_id) in seen:
            raise EnvelopeFormatError(_duplicate(STANZA_TYPES[code]))
        seen.add((code, recipient_id))
        stanzas.append(Stanza(STANZA_TYPES[code], recipient_id, body))
    if pos != len(data):
        raise EnvelopeFormatError("trailing bytes after the last stanza")
    return stanzas
