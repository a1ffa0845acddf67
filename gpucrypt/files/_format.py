"""The gpucrypt stream format, version 1: header layout, key derivation, segment nonces, errors.

This module knows bytes only; :mod:`gpucrypt.stream` does the I/O and the AEAD work.
``docs/FORMAT.md`` is the specification; this is its implementation, and the two
must change together.

Header (all integers big-endian)::

    offset  size  field
    0       8     magic            b"GPUCRYPT"
    8       1     version          1
    9       1     algorithm        1 chacha20-poly1305, 2 xchacha20-poly1305, 3 aes-256-gcm
    10      1     log2 segment     12 (4 KiB) .. 26 (64 MiB)
    11      32    salt             random per file
    43      P     nonce prefix     random; P = 7 (12-byte nonces) or 19 (XChaCha's 24)
    ---- fixed fields end: 50 or 62 bytes; they are every segment's associated data ----
    .       2     key id length K  0..1024 (0 = no key id)
    .       K     key id           UTF-8
    .       4     envelope length E  0..1 MiB (0 = no envelope)
    .       E     envelope         opaque bytes (wrapped keys)
    .       32    header MAC       HMAC-SHA256(header MAC key, every header byte before it)

Segment ``i`` (0-based) is an AEAD message under the segment key with nonce
``prefix || BE32(i) || last`` (``last`` is 0x01 for the final segment, else 0x00)
and associated data = the fixed fields. Every segment holds ``segment_size``
plaintext bytes except the last, which holds 1..segment_size bytes, or 0 when the
whole plaintext is empty (then it is the only segment).

Keys (HKDF-SHA256, RFC 5869, input key = the caller's 32-byte key, salt = the salt)::

    segment key    = HKDF(key, salt, info = b"gpucrypt stream v1 segment key" || fixed fields, 32)
    header MAC key = HKDF(key, salt, info = b"gpucrypt stream v1 header mac" || fixed fields, 32)
"""
from __future__ import annotations

import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.hmac import HMAC
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .._buffers import bytes_arg

MAGIC = b"GPUCRYPT"
VERSION = 1
KEY_SIZE = 32
SALT_SIZE = 32
TAG_SIZE = 16
MAC_SIZE = 32
INDEX_SIZE = 4                       # big-endian segment index in the nonce
MAX_SEGMENTS = 2 ** (8 * INDEX_SIZE)  # indices 0 .. 2**32 - 1
MIN_SEGMENT_LOG2 = 12                 # 4 KiB
MAX_SEGMENT_LOG2 = 26                 # 64 MiB
DEFAULT_SEGMENT_SIZE = 1 << 20
MAX_KEY_ID_BYTES = 1024
MAX_ENVELOPE_BYTES = 1 << 20

#: algorithm name -> (header id, nonce size)
ALGORITHMS = {
    "chacha20-poly1305": (1, 12),
    "xchacha20-poly1305": (2, 24),
    "aes-256-gcm": (3, 12),
}
_BY_ID = {ident: name for name, (ident, _) in ALGORITHMS.items()}
#: algorithm name here -> the backends' name for the same AEAD
BACKEND_NAMES = {"chacha20-poly1305": "chacha20-poly1305",
                 "xchacha20-poly1305": "xchacha20-poly1305", "aes-256-gcm": "aes-gcm"}
#: bytes of the fixed fields before the nonce prefix
_FIXED_HEAD = struct.Struct(">8sBBB32s")
#: the shortest possible header (12-byte nonce, no key id, no envelope)
MIN_HEADER_SIZE = _FIXED_HEAD.size + 7 + 2 + 4 + MAC_SIZE

_SEGMENT_INFO = b"gpucrypt stream v1 segment key"
_HEADER_MAC_INFO = b"gpucrypt stream v1 header mac"


# ----------------------------------------------------------------------------- errors
class StreamError(Exception):
    """Base class of every error about a gpucrypt stream's contents."""


class FormatError(StreamError, ValueError):
    """The data is not a gpucrypt stream, or its header is malformed."""


class UnsupportedVersion(FormatError):
    """A gpucrypt stream of a format version this gpucrypt cannot read."""

    def __init__(self, message: str, version: int):
        super().__init__(message)
        self.version = version

    def __reduce__(self):  # errors cross process boundaries (Ray workers, multiprocessing)
        return type(self), (str(self), self.version), self.__dict__


class AuthenticationError(StreamError, InvalidTag):
    """Wrong key or tampered data. ``segment`` is the failing segment's index, or None
    when the header failed. No plaintext of that segment is released."""

    def __init__(self, message: str, segment: int | None = None):
        super().__init__(message)
        self.segment = segment


class TruncatedError(AuthenticationError):
    """The stream ends early: inside the header, before the first segment, or after a
    segment that is not marked last (whole segments were cut off the end)."""


# ----------------------------------------------------------------------------- header
class Header:
    """A parsed header. ``header_length`` is its size in bytes: the segments start there.

    ``key_id`` and ``envelope`` are None when absent (an empty value is stored as absent).
    ``header_mac`` is only checked by :func:`verify_header`, which needs the key.
    Immutable; compared field by field; its repr leaves out the salt, nonce prefix,
    envelope and MAC. (A plain class, not a dataclass: ``dataclasses`` would add a
    sixth of ``gpucrypt encrypt``'s start-up.)
    """

    _FIELDS = ("version", "algorithm", "segment_size", "salt", "nonce_prefix", "key_id",
               "envelope", "header_mac", "header_length")
    _SHOWN = ("version", "algorithm", "segment_size", "key_id", "header_length")
    __slots__ = _FIELDS
    version: int
    algorithm: str
    segment_size: int
    salt: bytes
    nonce_prefix: bytes
    key_id: str | None
    envelope: bytes | None
    header_mac: bytes
    header_length: int

    def __init__(self, version: int, algorithm: str, segment_size: int, salt: bytes,
                 nonce_prefix: bytes, key_id: str | None, envelope: bytes | None,
                 header_mac: bytes, header_length: int):
        for name, value in zip(self._FIELDS, (version, algorithm, segment_size, salt,
                                              nonce_prefix, key_id, envelope, header_mac,
                                              header_length)):
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        raise AttributeError(f"a Header is immutable (cannot set {name!r})")

    def _values(self) -> tuple:
        return tuple(getattr(self, name) for name in self._FIELDS)

    def __eq__(self, other: object) -> bool:
        return self._values() == other._values() if type(other) is Header else NotImplemented

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._SHOWN)
        return f"Header({shown})"

    @property
    def fixed_fields(self) -> bytes:
        """The header bytes every segment authenticates as associated data."""
        return fixed_fields(self.algorithm, self.segment_size, self.salt, self.nonce_prefix)


def read_at(fd: int, offset: int, view, what: str) -> None:
    """Fill ``view`` (a writable buffer) with the bytes of file ``fd`` from ``offset``
    (``os.preadv``: no shared file position, so threads may read one file at once);
    ``TruncatedError`` naming ``what`` when the file ends first."""
    mv, got = memoryview(view).cast("B"), 0
    while got < len(mv):
        n = os.preadv(fd, [mv[got:]], offset + got)
        if not n:
            raise TruncatedError(f"truncated file: {what} changed while being read")
        got += n


def nonce_size(algorithm: str) -> int:
    return ALGORITHMS[algorithm][1]


def prefix_size(algorithm: str) -> int:
    """Random bytes of the nonce before the segment index and the last flag."""
    return nonce_size(algorithm) - INDEX_SIZE - 1


#: other names for the formats' algorithms: the tensor API's (the formats' AES-GCM is
#: AES-256's alone)
ALGORITHM_ALIASES = {"aes-gcm": "aes-256-gcm"}


def check_algorithm(algorithm: str) -> str:
    """``algorithm``'s name in :data:`ALGORITHMS` (an alias resolved); ValueError for others."""
    if isinstance(algorithm, str):
        algorithm = ALGORITHM_ALIASES.get(algorithm, algorithm)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {sorted(ALGORITHMS)} (or aes-gcm, the "
                         f"same as aes-256-gcm here), not {algorithm!r}")
    return algorithm


def check_segment_size(segment_size: int) -> int:
    """log2 of ``segment_size``; ValueError unless it is a power of two in 4 KiB .. 64 MiB.

    Both AEADs' per-message limits (ChaCha20-Poly1305 256 GiB, GCM 64 GiB) are far
    above 64 MiB, so every allowed size is safe for every algorithm.
    """
    if isinstance(segment_size, bool) or not isinstance(segment_size, int):
        raise TypeError(f"segment_size must be an int, not {type(segment_size).__name__}")
    log2 = segment_size.bit_length() - 1
    if segment_size <= 0 or segment_size != 1 << log2 or not (
            MIN_SEGMENT_LOG2 <= log2 <= MAX_SEGMENT_LOG2):
        raise ValueError(f"segment_size must be a power of two from {1 << MIN_SEGMENT_LOG2} "
                         f"(4 KiB) to {1 << MAX_SEGMENT_LOG2} (64 MiB), not {segment_size}")
    return log2


def check_key(key) -> bytes:
    key = bytes_arg(key, "key")
    if len(key) != KEY_SIZE:
        raise ValueError(f"key must be {KEY_SIZE} bytes, not {len(key)}")
    return key


def fixed_fields(algorithm: str, segment_size: int, salt: bytes, nonce_prefix: bytes) -> bytes:
    log2 = check_segment_size(segment_size)
    return _FIXED_HEAD.pack(MAGIC, VERSION, ALGORITHMS[algorithm][0], log2, salt) + nonce_prefix


def hkdf_sha256(key: bytes, salt: bytes, info: bytes) -> bytes:
    """The 32-byte HKDF-SHA256 (RFC 5869) output for ``key``, ``salt`` and ``info``."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(key)


def segment_key(key: bytes, header: Header) -> bytes:
    return hkdf_sha256(key, header.salt, _SEGMENT_INFO + header.fixed_fields)


def header_mac_key(key: bytes, header: Header) -> bytes:
    return hkdf_sha256(key, header.salt, _HEADER_MAC_INFO + header.fixed_fields)


def segment_nonce(nonce_prefix: bytes, index: int, last: bool) -> bytes:
    return nonce_prefix + index.to_bytes(INDEX_SIZE, "big") + (b"\x01" if last else b"\x00")


def segment_cipher(algorithm: str, seg_key: bytes, nonce_prefix: bytes) -> tuple[str, bytes, bytes]:
    """``(name, key, nonce_head)`` of a 12-byte-nonce AEAD that seals segment ``i`` exactly
    as ``algorithm`` under ``seg_key`` with nonce ``segment_nonce(nonce_prefix, i, last)``:
    the nonce is then ``segment_nonce(nonce_head, i, last)``. ``name`` is a backend name.

    XChaCha20-Poly1305's first 16 nonce bytes (the prefix's) are the same for every
    segment, so its HChaCha20 subkey is computed once per file and the segments are
    ChaCha20-Poly1305 messages under it (nonce 0x00000000 || prefix[16:] || ...).
    """
    if algorithm == "xchacha20-poly1305":
        from .._host_primitives import xchacha20_key_nonce  # here: only XChaCha20 files need it

        subkey, head = xchacha20_key_nonce(seg_key, nonce_prefix)
        return "chacha20-poly1305", subkey, head
    return BACKEND_NAMES[algorithm], seg_key, nonce_prefix


def variable_fields(key_id: str | None, envelope: bytes | None) -> bytes:
    kid = (key_id or "").encode("utf-8")
    env = bytes(envelope or b"")
    return struct.pack(">H", len(kid)) + kid + struct.pack(">I", len(env)) + env


def check_key_id_envelope(key_id, envelope) -> tuple[str | None, bytes | None]:
    """Validate and normalise (empty -> None) the optional header fields."""
    if key_id is not None:
        if not isinstance(key_id, str):
            raise TypeError(f"key_id must be a str, not {type(key_id).__name__}")
        if len(key_id.encode("utf-8")) > MAX_KEY_ID_BYTES:
            raise ValueError(f"key_id must be at most {MAX_KEY_ID_BYTES} bytes of UTF-8")
    if envelope is not None:
        try:
            envelope = bytes(memoryview(envelope))
        except TypeError:
            raise TypeError(f"envelope must be bytes-like, not {type(envelope).__name__}") from None
        if len(envelope) > MAX_ENVELOPE_BYTES:
            raise ValueError(f"envelope must be at most {MAX_ENVELOPE_BYTES} bytes")
    return key_id or None, envelope or None


def new_header(key: bytes, algorithm: str, segment_size: int, *, key_id=None, envelope=None,
               salt: bytes | None = None, nonce_prefix: bytes | None = None) -> tuple[Header, bytes]:
    """A fresh header (random salt and prefix unless given, for known-answer tests) and its bytes."""
    algorithm = check_algorithm(algorithm)
    check_segment_size(segment_size)
    key_id, envelope = check_key_id_envelope(key_id, envelope)
    # bytes_arg, not bytes(): bytes(32) would be 32 zero bytes, of exactly the salt's size
    salt = os.urandom(SALT_SIZE) if salt is None else bytes_arg(salt, "salt")
    nonce_prefix = os.urandom(prefix_size(algorithm)) if nonce_prefix is None else \
        bytes_arg(nonce_prefix, "nonce_prefix")
    if len(salt) != SALT_SIZE or len(nonce_prefix) != prefix_size(algorithm):
        raise ValueError("salt must be 32 bytes and nonce_prefix "
                         f"{prefix_size(algorithm)} bytes for {algorithm}")
    unsigned = Header(VERSION, algorithm, segment_size, salt, nonce_prefix, key_id, envelope,
                      b"", 0)
    return seal_header(key, unsigned)


def _header_mac(key: bytes, header: Header, body: bytes) -> bytes:
    # HMAC-SHA256 through OpenSSL's binding in cryptography, already loaded: the
    # standard library's hmac/hashlib would load a second OpenSSL binding at start-up
    mac = HMAC(header_mac_key(key, header), hashes.SHA256())
    mac.update(body)
    return mac.finalize()


def seal_header(key: bytes, header: Header) -> tuple[Header, bytes]:
    """``header`` with a fresh MAC over its fields under ``key``, and its encoding."""
    body = header.fixed_fields + variable_fields(header.key_id, header.envelope)
    mac = _header_mac(key, header, body)
    sealed = Header(header.version, header.algorithm, header.segment_size, header.salt,
                    header.nonce_prefix, header.key_id, header.envelope, mac,
                    len(body) + MAC_SIZE)
    return sealed, body + mac


def encode_header(header: Header) -> bytes:
    """The exact bytes of a parsed header (including its recorded MAC)."""
    return header.fixed_fields + variable_fields(header.key_id, header.envelope) + header.header_mac


def verify_header(key: bytes, header: Header) -> None:
    """AuthenticationError unless ``header``'s MAC verifies under ``key``."""
    body = header.fixed_fields + variable_fields(header.key_id, header.envelope)
    expected = _header_mac(key, header, body)
    # here, not at the top: constant_time imports the standard hmac and hashlib (which
    # load OpenSSL's shared library, about 6 ms), and encrypting never compares a MAC
    from cryptography.hazmat.primitives import constant_time

    if not constant_time.bytes_eq(expected, bytes(header.header_mac)):
        raise AuthenticationError("header authentication failed: wrong key, or the header "
                                  "(key id, envelope or parameters) was tampered with")


def read_up_to(read, n: int) -> bytes:
    """``n`` bytes from ``read(n)``, fewer only at the end of the input: one read may
    legally return less (a raw file, a pipe) without the input having ended."""
    chunk = bytearray()
    while len(chunk) < n:
        piece = read(n - len(chunk))
        if not piece:
            break
        chunk += piece
    return bytes(chunk)


class HeaderReader:
    """Reads exactly ``n`` bytes from ``read(n)``, turning a short read into TruncatedError.

    ``consumed`` holds every byte taken so far (starting with ``consumed``, bytes the
    caller read before), so its length is the header's length once parsing is done.
    """

    def __init__(self, read, consumed: bytes = b""):
        self._read = read
        self.consumed = bytearray(consumed)

    def take(self, n: int, what: str) -> bytes:
        chunk = read_up_to(self._read, n)
        self.consumed += chunk
        if len(chunk) < n:  # the callers took the magic bytes first: not an empty file
            raise TruncatedError(f"truncated file: it ends inside the header ({what})")
        return chunk


def algorithm_and_segment_size(algorithm_id: int, log2: int) -> tuple[str, int]:
    """The algorithm name and segment size a header's id and log2 bytes stand for;
    FormatError for an unknown id or a size out of range."""
    algorithm = _BY_ID.get(algorithm_id)
    if algorithm is None:
        raise FormatError(f"malformed header: unknown algorithm id {algorithm_id}")
    if not MIN_SEGMENT_LOG2 <= log2 <= MAX_SEGMENT_LOG2:
        raise FormatError(f"malformed header: segment size 2**{log2} is out of range")
    return algorithm, 1 << log2


def read_key_id_and_envelope(reader: HeaderReader) -> tuple[str | None, bytes | None]:
    """Parse the key id and envelope fields (their lengths, then their bytes) from
    ``reader``; empty ones come back as None. FormatError when a length is over its
    limit or the key id is not UTF-8, TruncatedError when the bytes run out."""
    (kid_len,) = struct.unpack(">H", reader.take(2, "key id length"))
    if kid_len > MAX_KEY_ID_BYTES:
        raise FormatError(f"malformed header: key id of {kid_len} bytes (at most {MAX_KEY_ID_BYTES})")
    try:
        key_id = reader.take(kid_len, "key id").decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError("malformed header: key id is not UTF-8") from None
    (env_len,) = struct.unpack(">I", reader.take(4, "envelope length"))
    if env_len > MAX_ENVELOPE_BYTES:
        raise FormatError(f"malformed header: envelope of {env_len} bytes "
                          f"(at most {MAX_ENVELOPE_BYTES})")
    envelope = reader.take(env_len, "envelope")
    return key_id or None, envelope or None


def parse_header(read) -> Header:
    """Parse a header from ``read(n) -> bytes`` (a file's ``read``), consuming exactly its bytes.

    Raises FormatError (not a gpucrypt stream, malformed), UnsupportedVersion or
    TruncatedError; never anything else for any input bytes. No key is needed: the
    MAC is recorded, not checked (see :func:`verify_header`).
    """
    magic = read_up_to(read, len(MAGIC))
    if not magic:
        raise FormatError("not a gpucrypt file: it is empty")
    if magic != MAGIC:
        # a short input is truncated only if it could be the start of one: any other
        # (a 6-byte text file) is simply not ours, not a tampered file
        if MAGIC.startswith(magic):
            raise TruncatedError("truncated file: it ends inside the header (magic)")
        if magic == b"GPUCMODL":  # gpucrypt.models.MAGIC (models imports this module)
            raise FormatError("this is a gpucrypt model file, not a stream file: decrypt it "
                              "with 'gpucrypt decrypt-model' or gpucrypt.models")
        raise FormatError("not a gpucrypt file (wrong magic bytes)")
    reader = HeaderReader(read, magic)
    version = reader.take(1, "version")[0]
    if version != VERSION:
        raise UnsupportedVersion(f"unsupported gpucrypt format version {version} (this gpucrypt "
                                 f"reads version {VERSION}); a newer gpucrypt may read it", version)
    algorithm, segment_size = algorithm_and_segment_size(
        *reader.take(2, "algorithm and segment size"))
    salt = reader.take(SALT_SIZE, "salt")
    prefix = reader.take(prefix_size(algorithm), "nonce prefix")
    key_id, envelope = read_key_id_and_envelope(reader)
    mac = reader.take(MAC_SIZE, "header MAC")
    return Header(version, algorithm, segment_size, salt, prefix, key_id, envelope, mac,
                  len(reader.consumed))
