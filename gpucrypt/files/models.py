"""Encrypted model files: a safetensors-style file whose tensor data are encrypted.

``save_encrypted`` writes a state dict (torch, NumPy, CuPy, ... tensors) to one file;
``load_encrypted`` reads it back as torch CPU/CUDA tensors, CuPy arrays or NumPy
arrays. ``docs/MODEL_FORMAT.md`` specifies the bytes; in short::

    header  = fixed fields || key id || envelope || tensor table || header MAC
    data    = each tensor's ciphertext, tensor after tensor, cut into segments
    tags    = one 16-byte tag per segment, after the data

Public API::

    save_encrypted(tensors, path, key=None, metadata=None, *, algorithm="chacha20-poly1305",
                   encrypt_names=False, segment_size=1 MiB, device="auto", key_id=None,
                   envelope=None, recipients=None, keyset=None, threads=None) -> ModelHeader
    load_encrypted(path, key=None, device="auto", *, framework="torch", threads=None,
                   names=None, keyset=None, identity=None) -> dict
    read_header(path, key=None) -> ModelHeader
    replace_envelope(path, key, envelope, key_id=<keep>) -> ModelHeader
    safe_open(path, framework, device="cpu", *, key=None, keyset=None, identity=None)
        safetensors.safe_open's API over a model file (gpucrypt/files/_safe_open.py)

Design choices (the reasons are in docs/MODEL_FORMAT.md):

- Segments never cross a tensor boundary (a tensor of ``L`` bytes is ``ceil(L / S)``
  segments, the last one short), so every tensor is its own allocation and is
  decrypted where it lies; segment indices run on across tensors, so no nonce
  repeats within a file. The ciphertext of the data region is exactly as long as the
  plaintext and the tags sit apart, so one file read + one host-to-device copy puts
  a tensor's ciphertext where its plaintext will be.
- The table (names, dtypes, shapes, offsets, the user's metadata) is covered by the
  header MAC, which is checked before any data is touched; each segment's associated
  data is the fixed fields and the SHA-256 of the stored table, so a segment is bound
  to its file and to the layout that says where it goes.

Loading on a GPU (``device="cuda"``): file -> pinned host staging buffer (two of them,
one filled by a reader thread while the other is copied) -> the tensor's device
memory -> ``open_batch`` in place, one call per batch of segments (about 32 MiB).
Host memory holds at most those two staging buffers of *ciphertext*; the plaintext
exists only on the device. A segment that fails leaves its ciphertext where it was,
every output is zeroed and ``AuthenticationError`` is raised: no tensor is returned.
Under numba's CUDA simulator, NumPy arrays stand in for device memory (as everywhere
in the GPU backend), so ``framework="numpy", device="cuda"`` runs this very path.

Loading on the CPU (``device="cpu"``): each tensor is allocated once and the file is
read straight into it; the segments are then decrypted in place (verify, then
decrypt) on a thread pool. No other copy of the data is made.

Limits:

- ``save_encrypted`` seals device tensors on the GPU (their plaintext stays there);
  with ``device="cpu"`` it copies them to the host a tensor at a time (the copies of
  the tensors the two batches in flight touch are alive at once);
- the table is at most 100 MiB, a tensor name at most 64 KiB of UTF-8, a file at most
  2**32 segments; metadata is a ``dict[str, str]`` (as in safetensors);
- little-endian hosts (the bytes are the tensors' in-memory bytes, as in the tensor API).

Errors are those of :mod:`gpucrypt.stream`: ``FormatError`` (not a gpucrypt model file:
a stream file, a plain safetensors file, garbage; malformed header or table),
``UnsupportedVersion``, ``AuthenticationError`` (wrong key, tampered header, table or
data; ``.segment`` names the failing segment, None for the header) and
``TruncatedError``.
"""
from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Mapping

import numpy as np
from cryptography.exceptions import InvalidTag

from . import _format
from ..tensors import _frameworks as fw
from ._atomic import AtomicFile, open_output, open_regular, streamed_path, write_atomically_with
from ._safetensors import StoredTensor, load_json
from ._format import (ALGORITHMS, AuthenticationError, FormatError, TruncatedError,
                      UnsupportedVersion)
from .. import pipeline
from .._buffers import bytes_arg
from ..tensors.api import _host_open, _host_seal

__all__ = ["save_encrypted", "load_encrypted", "export_safetensors", "read_header", "safe_open",
           "replace_envelope", "ModelHeader", "TensorInfo", "NotSafetensorsDtype",
           "MAGIC", "VERSION", "DEFAULT_SEGMENT_SIZE", "FRAMEWORKS"]

MAGIC = b"GPUCMODL"
VERSION = 1
DEFAULT_SEGMENT_SIZE = _format.DEFAULT_SEGMENT_SIZE
TAG_SIZE = _format.TAG_SIZE
MAC_SIZE = _format.MAC_SIZE
MAX_TABLE_BYTES = 100 << 20          # safetensors' own header limit
#: the largest readable table that read_header decodes without a key (unauthenticated);
#: about 150,000 tensors of typical names, and about 0.5 GB of Python objects at worst
MAX_UNVERIFIED_TABLE_BYTES = 16 << 20
MAX_NAME_BYTES = 1 << 16
MAX_NDIM = 64
FRAMEWORKS = ("torch", "cupy", "numpy")
#: safetensors' names for them (``safe_open(path, "pt")``)
_FRAMEWORK_ALIASES = {"pt": "torch", "np": "numpy"}
FLAG_NAMES_ENCRYPTED = 0x01

#: magic, version, algorithm id, log2 segment size, flags, salt, table length, data length
_FIXED_HEAD = struct.Struct(">8sBBBB32sQQ")
_SEGMENT_INFO = b"gpucrypt model v1 segment key"
_HEADER_MAC_INFO = b"gpucrypt model v1 header mac"
_TABLE_INFO = b"gpucrypt model v1 table key"
_METADATA_KEY = "__metadata__"

#: GPU loads: plaintext bytes per batch, small enough that two pinned staging buffers
#: stay modest (the other paths take the pipeline's batch sizes)
_GPU_BATCH_BYTES = 32 << 20
#: batches started and not finished while the next is prepared (CPU)
_DEPTH = 1


class _UnknownTensor(KeyError):
    """A tensor name the model file does not hold (``load_encrypted(names=...)``; the base
    of ``safe_open``'s ``UnknownTensorError``)."""

    def __str__(self) -> str:  # KeyError's own prints the message inside a second pair of quotes
        return str(self.args[0]) if self.args else ""


class NotSafetensorsDtype(ValueError):
    """:func:`export_safetensors` of a valid model file that holds a tensor whose dtype
    a safetensors file cannot hold (``numpy:<U5``, ...): the data are fine, the target
    format is not; :func:`load_encrypted` with ``framework="numpy"`` reads such dtypes."""


# ============================================================================ header
@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the table: ``data[begin:end]`` of the data region holds its bytes."""

    name: str
    dtype: str            # portable dtype name (docs/TENSOR_FORMAT.md), e.g. "bfloat16"
    shape: tuple
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class ModelHeader:
    """A parsed model-file header.

    ``metadata`` is the table's ``__metadata__``, ``{}`` when it has none or an empty one;
    :attr:`stored_metadata` tells the two apart (as safetensors does, and an export of
    the file). ``tensors`` and ``metadata`` are None when the table is encrypted and no
    key was given. ``verified`` is True only when the header MAC was checked with a key.
    """

    version: int
    algorithm: str
    segment_size: int
    names_encrypted: bool
    salt: bytes = field(repr=False)
    nonce_prefix: bytes = field(repr=False)
    data_length: int
    key_id: str | None
    envelope: bytes | None = field(repr=False)
    stored_table: bytes = field(repr=False)
    header_mac: bytes = field(repr=False)
    header_length: int
    tensors: tuple | None = field(repr=False, default=None)
    metadata: dict | None = None
    verified: bool = False
    #: whether the table holds a ``__metadata__`` (an empty one included)
    metadata_stored: bool = False

    @property
    def stored_metadata(self) -> dict | None:
        """The table's ``__metadata__`` as stored: None when it has none, ``{}`` when it
        has an empty one (what safetensors' ``metadata()`` says of the plain file)."""
        return self.metadata if self.metadata_stored else None

    @property
    def fixed_fields(self) -> bytes:
        return _fixed_fields(self.algorithm, self.segment_size, self.names_encrypted, self.salt,
                             len(self.stored_table), self.data_length, self.nonce_prefix)

    @cached_property
    def segment_count(self) -> int:
        """Counted, not listed: a forged header's table can ask for 2**32 segments, and the
        file's length (which this gives) is checked before any list is made. Counted once
        per header (a walk over the whole table): every ``get_tensor`` of ``safe_open``
        asks for it, and a loop over 16000 tensors that recounted each time took 22 s.
        ``dataclasses.replace`` makes a new header, which counts again."""
        if self.tensors is None:
            return -1
        try:
            return _segment_count(self.tensors, self.segment_size)
        except OverflowError:  # the writers' limit: a file that claims more is none of theirs
            raise FormatError(f"the file's table asks for more than {_format.MAX_SEGMENTS} "
                              f"segments: not a file gpucrypt wrote") from None

    @property
    def file_length(self) -> int:
        """The exact size of the file. It needs the table, for the segment count:
        ``ValueError`` for a header read without a key whose table is encrypted (its
        segment count of -1 gave a length 16 bytes a segment short)."""
        if self.tensors is None:
            raise ValueError("the file's length depends on its tensor table, which is "
                             "encrypted (encrypt_names) and was read without a key: pass "
                             "the key, read_header(path, key)")
        return self.header_length + self.data_length + TAG_SIZE * self.segment_count


def _fixed_fields(algorithm: str, segment_size: int, names_encrypted: bool, salt: bytes,
                  table_length: int, data_length: int, nonce_prefix: bytes) -> bytes:
    log2 = _format.check_segment_size(segment_size)
    flags = FLAG_NAMES_ENCRYPTED if names_encrypted else 0
    return _FIXED_HEAD.pack(MAGIC, VERSION, ALGORITHMS[algorithm][0], log2, flags, salt,
                            table_length, data_length) + nonce_prefix


def _derive(key: bytes, salt: bytes, info: bytes, fixed: bytes) -> bytes:
    return _format.hkdf_sha256(key, salt, info + fixed)


def _segment_aad(fixed: bytes, stored_table: bytes) -> bytes:
    return fixed + hashlib.sha256(stored_table).digest()


def _header_body(header: ModelHeader) -> bytes:
    return (header.fixed_fields + _format.variable_fields(header.key_id, header.envelope)
            + header.stored_table)


# ---------------------------------------------------------------------------- the table
def _encode_table(infos: list[TensorInfo], metadata: dict | None) -> bytes:
    """Canonical JSON (sorted keys, no spaces, UTF-8): safetensors' own header layout.
    An empty ``metadata`` is written (``"__metadata__":{}``), None is not: safetensors
    tells the two apart, and a file converted from one comes back the same."""
    doc: dict[str, Any] = {i.name: {"dtype": i.dtype, "shape": list(i.shape),
                                     "data_offsets": [i.begin, i.end]} for i in infos}
    if metadata is not None:
        doc[_METADATA_KEY] = dict(metadata)
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


#: the largest size in bytes, and dimension, that NumPy, torch and CuPy can represent
#: (signed 64-bit sizes and strides)
MAX_TENSOR_BYTES = 2**63 - 1


def _unrepresentable(shape, itemsize: int) -> str | None:
    """Why no framework could represent a tensor of ``shape`` (ints >= 0) and ``itemsize``,
    or None when it fits. Zero dimensions are left out of the product: an empty tensor of
    shape ``[0, 2**70]`` holds no bytes, yet NumPy refuses it ("Maximum allowed dimension
    exceeded"), torch cannot take the size (TypeError), and a safetensors file of it is
    refused by the package. NumPy's own rule is the strictest: every dimension, and the
    nonzero ones' product times the item size, at most 2**63 - 1 (torch's strides are
    products of these)."""
    span = itemsize
    for d in shape:
        if d > MAX_TENSOR_BYTES:
            return f"a dimension of {d} is over 2**63 - 1"
        span *= d or 1
    if span > MAX_TENSOR_BYTES:
        return (f"its nonzero dimensions times the item size ({itemsize}) come to {span} "
                f"bytes, over 2**63 - 1")
    return None


def _short(shape) -> str:
    text = str(list(shape))
    return text if len(text) <= 120 else text[:117] + "..."


def _bad_table(why: str) -> FormatError:
    return FormatError(f"malformed tensor table: {why}")


def _decode_table(raw: bytes, data_length: int) -> tuple[tuple, dict | None]:
    """(tensors in data order, metadata: None when the table has no ``__metadata__``, as
    in every file an earlier gpucrypt wrote without metadata or with an empty one);
    FormatError for anything but a table we write: valid dtypes, shapes whose byte count
    matches the offsets, and offsets that tile ``[0, data_length)`` exactly, in order,
    with no gap or overlap."""
    doc = load_json(raw, "malformed tensor table")  # unauthenticated without a key
    if not isinstance(doc, dict):
        raise _bad_table("not a JSON object")
    metadata = doc.pop(_METADATA_KEY, None)
    if metadata is not None and (not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise _bad_table("__metadata__ must map strings to strings")
    infos = []
    for name, entry in doc.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise _bad_table(f"entry {name!r} must hold exactly dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        try:
            itemsize = fw.dtype_itemsize(dtype) if isinstance(dtype, str) else None
        except ValueError:
            itemsize = None
        if itemsize is None:
            raise _bad_table(f"entry {name!r} has an unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and len(shape) <= MAX_NDIM and all(
                type(d) is int and d >= 0 for d in shape)):
            raise _bad_table(f"entry {name!r} has an invalid shape")
        too_large = _unrepresentable(shape, itemsize)
        if too_large:
            raise _bad_table(f"entry {name!r} has shape {_short(shape)}: {too_large}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(
                type(o) is int and o >= 0 for o in offsets)):
            raise _bad_table(f"entry {name!r} has invalid data_offsets")
        info = TensorInfo(name, dtype, tuple(shape), offsets[0], offsets[1])
        if info.nbytes != int(np.prod(shape, dtype=object)) * itemsize:
            raise _bad_table(f"entry {name!r}: data_offsets do not match its shape and dtype")
        infos.append(info)
    infos.sort(key=lambda i: (i.begin, i.end))
    cursor = 0
    for info in infos:
        if info.begin != cursor:
            raise _bad_table(f"entry {info.name!r} does not start where the previous one ends")
        cursor = info.end
    if cursor != data_length:
        raise _bad_table(f"the tensors cover {cursor} bytes, the header says {data_length}")
    return tuple(infos), metadata


# ---------------------------------------------------------------------------- segments
@dataclass(frozen=True)
class _Segment:
    index: int       # global: the nonce's counter
    tensor: int      # position in the table (data order)
    start: int       # offset inside the tensor
    length: int

    def data_offset(self, infos) -> int:
        return infos[self.tensor].begin + self.start


def _segment_count(infos, segment_size: int) -> int:
    """How many segments :func:`_segments` makes of ``infos``; OverflowError past the
    format's limit, before any is made."""
    count = sum(-(-info.nbytes // segment_size) for info in infos)
    if count > _format.MAX_SEGMENTS:
        raise OverflowError(f"the model needs more than {_format.MAX_SEGMENTS} segments of "
                            f"{segment_size} bytes; use a larger segment_size")
    return count


def _segments(infos, segment_size: int) -> list[_Segment]:
    """Every tensor cut into segments of ``segment_size`` (the last one of each tensor
    short); empty tensors have none. Indices run on across tensors."""
    _segment_count(infos, segment_size)  # the limit, checked before the list is made
    out: list[_Segment] = []
    for t, info in enumerate(infos):
        for start in range(0, info.nbytes, segment_size):
            out.append(_Segment(len(out), t, start, min(segment_size, info.nbytes - start)))
    return out


def _batches(segments: list[_Segment], batch_bytes: int, infos=None) -> list[list[_Segment]]:
    """Consecutive segments grouped up to ``batch_bytes`` of data (at least one each);
    with ``infos``, also cut where the next segment does not follow the previous one in
    the file (a subset of the tensors), so that each batch is one range of the file."""
    batches, current, size = [], [], 0
    for seg in segments:
        gap = infos is not None and current and \
            seg.data_offset(infos) != current[-1].data_offset(infos) + current[-1].length
        if current and (gap or size + seg.length > batch_bytes):
            batches.append(current)
            current, size = [], 0
        current.append(seg)
        size += seg.length
    if current:
        batches.append(current)
    return batches


def _nonce(prefix: bytes, seg: _Segment, count: int) -> bytes:
    return _format.segment_nonce(prefix, seg.index, seg.index == count - 1)


def _describe(seg: _Segment, infos) -> str:
    info = infos[seg.tensor]
    return (f"segment {seg.index} (tensor {info.name!r}, bytes {seg.start}..{seg.start + seg.length} "
            f"of its {info.nbytes})")


def _segment_failure(seg: _Segment, infos) -> AuthenticationError:
    return AuthenticationError(f"{_describe(seg, infos)} failed authentication: tampered, "
                               f"reordered or swapped data, or data from another file; "
                               f"no tensor is returned", seg.index)


# ---------------------------------------------------------------------------- parsing
def _wrong_magic(magic: bytes, f) -> FormatError:
    if magic == _format.MAGIC:
        return FormatError("this is a gpucrypt stream file, not a model file: decrypt it with "
                           "gpucrypt.stream.decrypt or 'gpucrypt decrypt'")
    if len(magic) == 8 and f.read(1) == b"{" and _fits(int.from_bytes(magic, "little"), f):
        return FormatError("not a gpucrypt model file: it looks like a plain (unencrypted) "
                           "safetensors file; encrypt it with 'gpucrypt encrypt-model'")
    return FormatError("not a gpucrypt model file (wrong magic bytes)")


def _fits(header_length: int, f) -> bool:
    """Whether a safetensors header of ``header_length`` bytes (its first 8 bytes, little
    endian) fits in the file ``f``: one byte in 256 of random data is the ``{`` that starts
    its JSON, and such garbage is not to be called a safetensors file."""
    try:
        size = os.fstat(f.fileno()).st_size
    except (AttributeError, OSError, ValueError):  # not a file: the length cannot be checked
        return False
    return 2 <= header_length <= size - 8


def _refuse_model_file(fd: int, name: str) -> None:
    """FormatError when the file open at ``fd`` (to be encrypted) is a model file already:
    read as safetensors its magic is a header length of exabytes, and the error said "not
    a readable safetensors file (header too large)", which hid what it is."""
    try:
        magic = os.pread(fd, len(MAGIC), 0)
    except OSError:  # a pipe (ESPIPE): not told here; reading it as safetensors says why
        return
    if magic == MAGIC:
        raise FormatError(f"{name} is already a gpucrypt model file (encrypted); "
                          f"'gpucrypt decrypt-model' (or gpucrypt.models.load_encrypted) reads it")


def _parse(f) -> ModelHeader:
    """Parse the header at ``f``'s position, consuming exactly its bytes (MAC not checked).
    Raises only FormatError, UnsupportedVersion and TruncatedError."""
    first = f.read(len(MAGIC))
    if not first:
        raise FormatError("not a gpucrypt model file: it is empty")
    if first != MAGIC[:len(first)] or len(first) < len(MAGIC):
        if first == MAGIC[:len(first)]:
            raise TruncatedError("truncated file: it ends inside the header (magic)")
        raise _wrong_magic(first, f)
    reader = _format.HeaderReader(f.read, first)
    rest = reader.take(_FIXED_HEAD.size - len(MAGIC), "fixed fields")
    _, version, alg_id, log2, flags, salt, table_len, data_len = _FIXED_HEAD.unpack(first + rest)
    if version != VERSION:
        raise UnsupportedVersion(f"unsupported gpucrypt model format version {version} (this "
                                 f"gpucrypt reads version {VERSION})", version)
    algorithm, segment_size = _format.algorithm_and_segment_size(alg_id, log2)
    if flags & ~FLAG_NAMES_ENCRYPTED:
        raise FormatError(f"malformed header: unknown flags {flags:#04x}")
    if table_len > MAX_TABLE_BYTES:
        raise FormatError(f"malformed header: tensor table of {table_len} bytes "
                          f"(at most {MAX_TABLE_BYTES})")
    prefix = reader.take(_format.prefix_size(algorithm), "nonce prefix")
    key_id, envelope = _format.read_key_id_and_envelope(reader)
    table = reader.take(table_len, "tensor table")
    mac = reader.take(MAC_SIZE, "header MAC")
    return ModelHeader(version, algorithm, segment_size, bool(flags & FLAG_NAMES_ENCRYPTED), salt,
                       prefix, data_len, key_id, envelope, table, mac, len(reader.consumed))


def _verify(header: ModelHeader, key: bytes) -> ModelHeader:
    """The header with its MAC checked and its table decrypted (if encrypted) and parsed."""
    fixed = header.fixed_fields
    expected = hmac.new(_derive(key, header.salt, _HEADER_MAC_INFO, fixed), _header_body(header),
                        hashlib.sha256).digest()
    if not hmac.compare_digest(expected, header.header_mac):
        raise AuthenticationError("header authentication failed: wrong key, or the header (tensor "
                                  "table, names, metadata, key id or envelope) was tampered with")
    raw = header.stored_table
    if header.names_encrypted:
        raw = _open_table(key, header, fixed)
    tensors, metadata = _decode_table(raw, header.data_length)
    return _replace(header, tensors=tensors, verified=True, **_metadata_fields(metadata))


def _replace(header: ModelHeader, **changes) -> ModelHeader:
    from dataclasses import replace

    return replace(header, **changes)


def _table_cipher(algorithm: str, key: bytes):
    """(algorithm name for tensor's host AEAD, key, nonce) of the table's one message: a key
    used for nothing else, so a fixed all-zero nonce is safe."""
    nonce = bytes(_format.nonce_size(algorithm))
    return _format.BACKEND_NAMES[algorithm], key, nonce


def _seal_table(key: bytes, algorithm: str, salt: bytes, fixed: bytes, table: bytes) -> bytes:
    name, tkey, nonce = _table_cipher(algorithm, _derive(key, salt, _TABLE_INFO, fixed))
    plain = np.frombuffer(table, dtype=np.uint8)
    out = np.empty_like(plain)
    tag = _host_seal(name, tkey, nonce, fixed, plain, out)
    return out.tobytes() + tag


def _open_table(key: bytes, header: ModelHeader, fixed: bytes) -> bytes:
    stored = header.stored_table
    if len(stored) < TAG_SIZE:
        raise FormatError("malformed header: encrypted tensor table shorter than its tag")
    name, tkey, nonce = _table_cipher(header.algorithm, _derive(key, header.salt, _TABLE_INFO, fixed))
    ct = np.frombuffer(stored[:-TAG_SIZE], dtype=np.uint8)
    out = np.empty_like(ct)
    if not _host_open(name, tkey, nonce, fixed, ct, stored[-TAG_SIZE:], out):
        raise AuthenticationError("the encrypted tensor table failed authentication")
    return out.tobytes()


def read_header(path: Any, key: Any = None) -> ModelHeader:
    """The header of the model file at ``path``.

    Without ``key``: parsed, *not* authenticated (``verified`` False), with the table
    when it is readable (None when ``encrypt_names`` was used); enough to find the
    envelope or key id. A readable table over ``MAX_UNVERIFIED_TABLE_BYTES`` (16 MiB) is
    a ``FormatError`` then: unauthenticated JSON that anyone can write, which Python
    holds in about 30 times its size (100 MiB of ``{}`` took 3 GB); pass the key to read
    it once its MAC has been checked. With ``key``: MAC checked, table decrypted,
    ``verified`` True.
    """
    with _open_model(path) as f:
        header = _parse(f)
    if key is not None:
        return _verify(header, _format.check_key(key))
    if header.names_encrypted:
        return header
    if len(header.stored_table) > MAX_UNVERIFIED_TABLE_BYTES:
        raise FormatError(f"the tensor table is {len(header.stored_table)} bytes, over the "
                          f"{MAX_UNVERIFIED_TABLE_BYTES} read without a key (it is not "
                          f"authenticated then): pass the key, read_header(path, key), to "
                          f"read it after its MAC is checked")
    tensors, metadata = _decode_table(header.stored_table, header.data_length)
    return _replace(header, tensors=tensors, **_metadata_fields(metadata))


def _metadata_fields(stored: dict | None) -> dict:
    """A header's ``metadata`` fields for a table's ``__metadata__`` (None: it has none):
    ``metadata`` a dict either way, as it always was, and whether one was stored."""
    return {"metadata": {} if stored is None else stored, "metadata_stored": stored is not None}


def _open_model(path: Any, buffering: int = -1):
    """The model file at ``path`` opened for reading, ``FormatError`` for a FIFO or a
    device there (a FIFO's open waited for a writer forever: a checkpoint folder's shard
    swapped for one after its check hung ``load_encrypted`` and ``hf.from_pretrained``)."""
    return open_regular(path, _not_regular(path), buffering)


def _not_regular(path: Any) -> Callable[[str], FormatError]:
    def not_regular(kind: str) -> FormatError:
        return FormatError(f"{os.fspath(path)} is a {kind}, not a regular file: give the path "
                           f"of the model file itself")
    return not_regular


def _parse_path(path: Any) -> ModelHeader:
    """The header of the model file at ``path`` as stored, its MAC not checked and its
    table not decoded (``tensors`` None): the fixed fields, salt, key id and envelope,
    which is all a reader needs to find the key. Unlike :func:`read_header` it never
    parses the table, JSON that whoever made the file chose, before a key has checked it."""
    with _open_model(path) as f:
        return _parse(f)


# ============================================================================ arguments
def _check_metadata(metadata: Any) -> dict | None:
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("metadata must be a dict of str to str (as in safetensors)")
    return dict(metadata)


def _tensor_infos(tensors: Any) -> tuple[list[TensorInfo], list[Any]]:
    """The table entries (data order = the mapping's order) and the contiguous tensors
    (or :class:`~gpucrypt.files._safetensors.StoredTensor` handles, read when sealed)."""
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a dict of name to tensor, not {type(tensors).__name__}")
    infos, values, cursor = [], [], 0
    for name, x in tensors.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"tensor names must be non-empty str, not {name!r}")
        if name == _METADATA_KEY:
            raise ValueError(f"{_METADATA_KEY!r} cannot be a tensor name (it holds the metadata)")
        if len(name.encode("utf-8")) > MAX_NAME_BYTES:
            raise ValueError(f"tensor name {name[:40]!r}... is over {MAX_NAME_BYTES} bytes of UTF-8")
        if isinstance(x, StoredTensor):
            dtype, shape = x.dtype, x.shape
        else:
            from ..tensors.api import _not_a_tensor

            try:
                adapter = fw.adapter_for(x)
                adapter.place(x)  # sparse, nested, meta: said there, before any copy
            except TypeError as exc:
                raise _not_a_tensor(name, x, exc) from None
            except ValueError as exc:
                raise ValueError(f"tensor {name!r}: {exc}") from None
            if adapter.needs_copy(x):
                x = adapter.contiguous_copy(x)  # saving never changes the caller's tensors
            dtype, shape = adapter.dtype_name(x), adapter.shape(x)
        if len(shape) > MAX_NDIM:
            raise ValueError(f"tensor {name!r} has {len(shape)} dimensions (at most {MAX_NDIM})")
        too_large = _unrepresentable(shape, fw.dtype_itemsize(dtype))
        if too_large:  # a StoredTensor's shape comes from a file: no reader could load it
            raise ValueError(f"tensor {name!r} has shape {_short(shape)}: {too_large}, so no "
                             f"framework could load it; check the safetensors file it came "
                             f"from")
        nbytes = int(np.prod(shape, dtype=object)) * fw.dtype_itemsize(dtype)
        if isinstance(x, StoredTensor) and nbytes != x.nbytes:
            raise ValueError(f"tensor {name!r}: {x.nbytes} bytes stored for dtype {dtype} and "
                             f"shape {list(shape)}, which need {nbytes}")
        infos.append(TensorInfo(name, dtype, tuple(shape), cursor, cursor + nbytes))
        values.append(x)
        cursor += nbytes
    return infos, values


class _Plaintext:
    """Where the plaintext of each segment comes from while a file is sealed.

    Host tensors are read where they lie. A :class:`StoredTensor` is read from its file
    into the batch's own buffer, segment by segment, so a file of any size is sealed in
    the memory of one batch. A device tensor is used on the device when sealing there
    (``device_views``): its plaintext never reaches host memory. Only sealing a device
    tensor on the CPU copies it to the host, one tensor at a time.
    """

    def __init__(self, values: list, gpu: Any = None):
        self._values, self._gpu = values, gpu
        self._copied: tuple[int, np.ndarray] | None = None
        self._device: dict[int, Any] = {}
        for t, x in enumerate(values):
            if gpu is not None and not isinstance(x, StoredTensor):
                adapter = fw.adapter_for(x)
                if adapter.place(x) != fw.HOST:
                    self._device[t] = gpu.as_device_bytes(adapter.byte_view(x))

    def device_view(self, seg: _Segment) -> Any:
        """seg's bytes in device memory, or None when its tensor is not there."""
        view = self._device.get(seg.tensor)
        return None if view is None else view[seg.start:seg.start + seg.length]

    def host(self, seg: _Segment, scratch: np.ndarray) -> np.ndarray:
        """seg's bytes on the host: :meth:`in_memory`, or ``scratch`` (its length) filled
        by :meth:`read`."""
        view = self.in_memory(seg)
        if view is None:
            self.read(seg, scratch)
            return scratch
        return view

    def in_memory(self, seg: _Segment) -> np.ndarray | None:
        """A host view of seg's bytes (of its tensor, or of a host copy of a device
        tensor), or None for a :class:`StoredTensor`. Not thread-safe."""
        x = self._values[seg.tensor]
        if isinstance(x, StoredTensor):
            return None
        if self._copied is None or self._copied[0] != seg.tensor:
            self._copied = (seg.tensor, _host_bytes(x))
        return self._copied[1][seg.start:seg.start + seg.length]

    def read(self, seg: _Segment, scratch: np.ndarray) -> None:
        """Fill ``scratch`` with seg's bytes from its StoredTensor's file (thread-safe)."""
        self._values[seg.tensor].read_into(seg.start, scratch)


def _host_bytes(x: Any) -> np.ndarray:
    """A flat uint8 NumPy view of a host tensor, or a host copy of a device tensor."""
    adapter = fw.adapter_for(x)
    if adapter.place(x) == fw.HOST:
        return np.asarray(adapter.host_array(adapter.byte_view(x))).reshape(-1)
    if adapter.name == "torch":
        return adapter.byte_view(x).cpu().numpy()
    if adapter.name == "cupy":
        return adapter.byte_view(x).get()
    if adapter.name == "numba":
        return adapter.byte_view(x).copy_to_host()
    return np.ascontiguousarray(np.asarray(x)).reshape(-1).view(np.uint8)  # jax


# ============================================================================ engines
class _SegmentCipher:
    """The segments of one model file as pipeline jobs: nonces (the last-segment flag
    from the whole file's count), the AAD, and the per-file AEAD."""

    def __init__(self, algorithm: str, seg_key: bytes, prefix: bytes, aad: bytes, count: int):
        self.aad, self.count = aad, count
        self.algorithm, self.key, self._head = _format.segment_cipher(algorithm, seg_key, prefix)

    def nonce(self, seg: _Segment) -> bytes:
        return _nonce(self._head, seg, self.count)

    def job(self, seg: _Segment, src: Any, dst: Any, tag: bytes | None = None) -> pipeline.Job:
        return pipeline.Job(seg, self.nonce(seg), self.aad, src, dst, tag=tag, size=seg.length)

    def context(self):
        """The CPU backend's AEAD context for this file's segment key."""
        from ..backends import get_backend

        return get_backend("cpu").aead(self.algorithm, self.key)


# ============================================================================ save
def save_encrypted(tensors: Mapping[str, Any], path: Any, key: Any = None,
                   metadata: Mapping | None = None, *, algorithm: str = "chacha20-poly1305",
                   encrypt_names: bool = False, segment_size: int = DEFAULT_SEGMENT_SIZE,
                   device: str = "auto", key_id: str | None = None, envelope: Any = None,
                   recipients: Any = None, keyset: Any = None,
                   threads: int | None = None, _salt: bytes | None = None,
                   _tensors: tuple | None = None, _ran_on: list | None = None) -> ModelHeader:
    """Write ``tensors`` (name -> tensor, any framework the tensor API takes, or a
    :class:`~gpucrypt.files._safetensors.StoredTensor` read from its file a segment at a time)
    to ``path``.

    ``key``: 32 bytes; the file's keys come from it by HKDF with a fresh random salt.
    Or, instead of ``key``, ``recipients`` (public keys, key references, passphrases, as
    :func:`gpucrypt.keys.encrypt_file` takes them) and/or ``keyset`` (its primary key):
    the file gets a fresh data key of its own, wrapped for each of them in its envelope
    (key references bound to the file's salt), and ``key_id`` is the keyset's primary id;
    :func:`load_encrypted`, :func:`safe_open` and ``gpucrypt decrypt-model`` open it
    with ``identity``/``keyset``.
    ``metadata``: str -> str, stored in the table (``{}`` as an empty ``__metadata__``,
    None as none, as safetensors keeps them). ``encrypt_names``: encrypt the whole
    table (names, dtypes, shapes, offsets, metadata); otherwise it stays readable (and
    authenticated). ``key_id``/``envelope``: header slots as in the stream format (an
    envelope from :func:`gpucrypt.keys.seal_envelope` wraps ``key`` for recipients).
    ``device``: where the segments are sealed ("auto", "cpu", "gpu"; "auto" takes the
    GPU when a tensor is on it, else decides by size as the AEAD classes do; a tensor on
    a GPU where gpucrypt's GPU backend cannot run is ``BackendUnavailable`` then: pass
    "cpu" to copy such tensors to the host and seal them there).
    Atomic (temporary file, fsync, rename), mode 0600. Returns the verified header.
    ``_salt``: given only by callers that drew it fresh to bind an envelope to it (the
    ``encrypt-model --kek`` command); reusing a salt under the same key repeats nonces.
    ``_tensors``: ``_tensor_infos(tensors)``, made already (by the keyed form, before it
    seals a key).
    """
    # the arguments are checked before any key is sealed (a KMS or HSM call, audited)
    algorithm = _format.check_algorithm(algorithm)
    _format.check_segment_size(segment_size)
    metadata = _check_metadata(metadata)
    threads = pipeline.cpu_threads(threads)
    if not isinstance(tensors, Mapping):  # the rest of them with the table, below
        raise TypeError(f"tensors must be a dict of name to tensor, not {type(tensors).__name__}")
    if device not in ("auto", "cpu", "gpu"):
        from ..backends import check_device

        device = check_device(device)
    if recipients is not None or keyset is not None:
        if key is not None or key_id is not None or envelope is not None or _salt is not None:
            raise ValueError("give key= (with key_id=/envelope= if you like) or "
                             "recipients=/keyset=, not both: recipients and keysets get a "
                             "fresh data key of the file's own, wrapped for them")
        from .. import audit
        from . import keyed

        with audit.timed("model.encrypt", path=keyed.audit_path(path)) as ev:
            items = keyed.gather(recipients, keyset)
            # the tensors' refusals and the output's (a missing folder, a folder, a link, a
            # device) before the seal too: the file is made now, and written and published by
            # the save below
            prepared = _tensor_infos(tensors)
            with _output_made_now(path) as path:
                key, _salt, envelope, key_id, labels = keyed.new_file_key(items)
                ev.update(key_id=key_id, recipients=labels, algorithm=algorithm,
                          device=str(device))  # the one that ran, once chosen (below)
                with audit.device_chosen(ev) as ran_on:
                    return save_encrypted(tensors, path, key, metadata, algorithm=algorithm,
                                          encrypt_names=encrypt_names, segment_size=segment_size,
                                          device=device, key_id=key_id, envelope=envelope,
                                          threads=threads, _salt=_salt, _tensors=prepared,
                                          _ran_on=ran_on)
    if key is None:
        raise ValueError("no key given: pass key= (32 bytes), or recipients= and/or keyset= "
                         "for a fresh data key wrapped for them")
    key = _format.check_key(key)
    key_id, envelope = _format.check_key_id_envelope(key_id, envelope)
    infos, values = _tensor_infos(tensors) if _tensors is None else _tensors
    segments = _segments(infos, segment_size)
    data_length = infos[-1].end if infos else 0

    table = _encode_table(infos, metadata)
    if len(table) + TAG_SIZE > MAX_TABLE_BYTES:
        raise ValueError(f"the tensor table is {len(table)} bytes (at most {MAX_TABLE_BYTES})")
    salt = os.urandom(_format.SALT_SIZE) if _salt is None else bytes_arg(_salt, "_salt")
    if len(salt) != _format.SALT_SIZE:
        raise ValueError(f"_salt must be {_format.SALT_SIZE} bytes")
    prefix = os.urandom(_format.prefix_size(algorithm))
    fixed = _fixed_fields(algorithm, segment_size, encrypt_names, salt,
                          len(table) + (TAG_SIZE if encrypt_names else 0), data_length, prefix)
    stored = _seal_table(key, algorithm, salt, fixed, table) if encrypt_names else table
    header = ModelHeader(VERSION, algorithm, segment_size, bool(encrypt_names), salt, prefix,
                         data_length, key_id, envelope, stored, b"", 0)
    body = _header_body(header)
    mac = hmac.new(_derive(key, salt, _HEADER_MAC_INFO, fixed), body, hashlib.sha256).digest()
    header = _replace(header, header_mac=mac, header_length=len(body) + MAC_SIZE,
                      tensors=tuple(infos), verified=True, **_metadata_fields(metadata))

    seg_key = _derive(key, salt, _SEGMENT_INFO, fixed)
    aad = _segment_aad(fixed, stored)
    backend = _save_backend(device, data_length, values)
    if _ran_on is not None:  # for the audit event (save_encrypted(recipients=...) above)
        _ran_on.append(backend.name)
    with open_output(path) as sink:
        sink.write(body + mac)
        if backend.name == "gpu":
            tags = _seal_on_gpu(backend, header, seg_key, aad, values, segments, sink)
        else:
            tags = _seal_on_cpu(header, seg_key, aad, values, segments, sink, threads)
        sink.write(b"".join(tags))
    return header


def _output_made_now(path: Any):
    """``path``'s :class:`AtomicFile` (as ``open_output`` makes it: refusals said now),
    to be written, published or dropped by whoever takes it; ``path`` itself (in a block
    that does nothing) when it is no such path: a file object, a FIFO or a device (written
    in place, and a FIFO's open waits for its reader)."""
    if isinstance(path, (str, os.PathLike)) and not streamed_path(path):
        return AtomicFile(path)
    return contextlib.nullcontext(path)


def _save_backend(device: str, data_length: int, values: list):
    """``select_backend``'s choice, except that "auto" seals on the GPU when a tensor is
    already there, so its plaintext never crosses to the host; where gpucrypt's GPU
    backend cannot run that is ``BackendUnavailable`` (it fell back to the CPU silently,
    copying every GPU tensor's plaintext into host memory)."""
    from ..backends import BackendUnavailable, get_backend, select_backend

    if device == "auto" and any(not isinstance(x, StoredTensor) and
                                fw.adapter_for(x).place(x) != fw.HOST for x in values):
        try:
            return get_backend("gpu")
        except BackendUnavailable as exc:
            raise BackendUnavailable(
                f"tensors to save are on a GPU, and device='auto' seals them there so that "
                f"their plaintext never reaches host memory, but gpucrypt's GPU backend "
                f"cannot run: {exc}. Install gpucrypt[gpu] (numba-cuda, CuPy), or pass "
                f"device='cpu' to copy the tensors to the host and seal them there") from exc
    return select_backend(device, data_length)


def _seal_batches(cipher: "_SegmentCipher", segments, batch_bytes: int, runner, depth: int,
                  source, load, sink, gap: int = 0, written=None) -> list[bytes]:
    """Seal ``segments`` in batches of about ``batch_bytes`` on ``runner`` (``depth`` in
    flight), each into one of ``depth + 1`` recycled output buffers, written to ``sink``
    in order; returns the tags. ``source(seg)``: its plaintext view, or None for
    ``load(job)`` to provide in the runner.

    ``gap=TAG_SIZE``: each job's output is ``ciphertext || tag`` (``seg.length + gap``
    bytes, both written by the runner's crypto, whose result is ignored); the tags are
    taken from the gaps, and the ciphertexts written to ``sink`` without them, or not at
    all where ``sink`` is None (the crypto wrote them). ``written(jobs)``: called with each
    batch's jobs once they are in the file."""
    batches = _batches(segments, batch_bytes)
    largest = max((sum(s.length + gap for s in b) for b in batches), default=0)
    outs = [pipeline.scratch(largest) for _ in range(min(depth + 1, len(batches)))]
    tags: list[bytes] = []

    def write(batch, results):
        if not gap:
            tags.extend(results)
            sink.write(batch.payload)
            return
        tags.extend(bytes(job.dst[job.size:]) for job in batch.jobs)
        for job in batch.jobs if sink is not None else ():
            sink.write(job.dst[:job.size])
        if written is not None:
            written(batch.jobs)

    def produce():
        for k, batch in enumerate(batches):
            out, jobs, cursor = outs[k % len(outs)], [], 0
            for seg in batch:
                jobs.append(cipher.job(seg, source(seg), out[cursor:cursor + seg.length + gap]))
                cursor += seg.length + gap
            yield pipeline.Batch(jobs, load=load, done=write, payload=out[:cursor])

    pipeline.run(produce(), runner, depth=depth)
    return tags


def _seal_on_cpu(header, seg_key, aad, values, segments, sink, threads) -> list[bytes]:
    """Batches on the pipeline's CPU workers. Each segment is sealed with its tag after it,
    ``ciphertext || tag`` in one OpenSSL call (which releases the GIL, so the workers run
    side by side), straight into its slot of the batch's buffer: no scratch, no copy. Into
    an atomic file (the usual case) the worker then writes the ciphertext at its place
    (``pwrite``) while it is still in that core's cache (handed to another thread, the
    page-cache copy of freshly sealed bytes measured 2-3x that of plain DCP's writes),
    and once a batch is written the kernel is asked to start writing it to disk, so that
    the final fsync finds most of the file there already. Other sinks get the ciphertexts
    in order from this thread. The tags are picked out of the
    slots, in order, as batches finish. A worker reads a stored tensor's segment into its
    slot and seals it there (in place, detached)."""
    cipher = _SegmentCipher(header.algorithm, seg_key, header.nonce_prefix, aad, len(segments))
    plain = _Plaintext(values)
    ctx = cipher.context()
    fd = sink.fileno() if isinstance(sink, AtomicFile) else None
    infos = header.tensors
    # the data region starts where the sink is now (after the header, and after whatever a
    # caller's own AtomicFile held before it)
    base = os.lseek(fd, 0, os.SEEK_CUR) if fd is not None else 0

    def seal(job, src):
        body = job.dst[:job.size]
        if src is None:  # a stored tensor: read from its file into the output, sealed there
            plain.read(job.ident, body)
            job.dst[job.size:] = ctx.seal_detached(job.nonce, body, memoryview(job.aad), body)
        else:
            ctx.seal(job.nonce, src, memoryview(job.aad), job.dst)
        if fd is not None:
            pipeline.pwrite_all(fd, body, base + job.ident.data_offset(infos))

    def written(jobs):  # a batch is one range of the file: to disk while the next is sealed
        first, last = jobs[0].ident, jobs[-1].ident
        start = first.data_offset(infos)
        sink.start_writeback(base + start, last.data_offset(infos) + last.length - start)

    with pipeline.CpuRunner(seal, threads) as runner:
        tags = _seal_batches(cipher, segments, pipeline.CPU_BATCH_BYTES, runner, _DEPTH,
                             plain.in_memory, None, None if fd is not None else sink,
                             gap=TAG_SIZE, written=written if fd is not None else None)
    if fd is not None:  # the tags follow the data region
        os.lseek(fd, base + header.data_length, os.SEEK_SET)
    return tags


def _seal_on_gpu(gpu, header, seg_key, aad, values, segments, sink) -> list[bytes]:
    """Each batch one ``seal_batch`` launch, in the context of the device the device
    tensors are on: host segments staged and uploaded together by the pipeline's GPU
    runner, device tensors sealed from their own memory; the ciphertext and the tags
    come back to the host and are written in order."""
    cipher = _SegmentCipher(header.algorithm, seg_key, header.nonce_prefix, aad, len(segments))
    places = {fw.adapter_for(x).place(x) for x in values if not isinstance(x, StoredTensor)} - {fw.HOST}
    if len(places) > 1:
        raise ValueError(f"tensors on several GPUs ({sorted(p[1] for p in places)}): a model file "
                         f"is sealed on one device; move them to one GPU or to the host first")
    index = places.pop()[1] if places else None
    with gpu.device(index):
        plain = _Plaintext(values, gpu)
        # Device tensors may still be being written on the caller's streams (a torch side
        # stream is not ordered with ours): wait for them once.
        gpu.synchronize_device()

        def load(job):
            on_device = plain.device_view(job.ident)
            return on_device if on_device is not None else plain.host(job.ident, job.dst)

        runner = pipeline.GpuRunner(gpu, "seal", cipher.algorithm, cipher.key, device=index, depth=1)
        return _seal_batches(cipher, segments, pipeline.GPU_BATCH_BYTES, runner, 1,
                             lambda seg: None, load, sink)


def _check_device(device: Any) -> str:
    """"cpu", "cuda" or "cuda:N" from the user's ``device``; "auto" picks cuda when a real
    GPU is usable (never the simulator, which exists to test kernels). A ``torch.device``
    is taken by its name."""
    if not isinstance(device, str) and isinstance(getattr(device, "type", None), str):
        device = str(device)  # torch.device("cuda", 1) -> "cuda:1"
    if device == "auto":
        from ..backends import BackendUnavailable, get_backend

        try:
            gpu = get_backend("gpu")
        except BackendUnavailable:
            return "cpu"
        return "cpu" if gpu.describe().get("simulator") else "cuda"
    if device == "gpu":
        return "cuda"
    if isinstance(device, str) and (device in ("cpu", "cuda") or (
            device.startswith("cuda:") and device[5:].isdigit())):
        return device
    raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', not {device!r}")


def load_encrypted(path: Any, key: Any = None, device: str = "auto", *,
                   framework: str = "torch", threads: int | None = None, names: Any = None,
                   keyset: Any = None, identity: Any = None, _check_header: Any = None) -> dict:
    """The tensors of the model file at ``path``, name -> tensor, in the file's order.

    ``key``: the 32-byte key it was saved with; or, for a file saved for recipients or a
    keyset, ``identity`` (one or several identities, key references, passphrases) and/or
    ``keyset``, which unwrap its data key from its envelope.

    ``names``: the tensors to load (an iterable of names; default all). Only their
    segments are read and verified (a pipeline stage or a shard loads its own layers);
    an unknown name is a ``KeyError`` naming it, before any data is read.

    ``device``: "cpu" (torch CPU tensors or NumPy arrays), "cuda"/"cuda:N" (torch CUDA
    tensors or CuPy arrays, decrypted on the device; see the module docstring), or
    "auto" (cuda when a real GPU is usable, else cpu). ``framework``: "torch", "cupy"
    (GPU only) or "numpy" (host arrays; under numba's simulator also the stand-in for
    device arrays with ``device="cuda"``). Each tensor is its own allocation. A
    framework that cannot be imported is an ``ImportError`` (never NumPy arrays in its
    place), and a tensor whose dtype torch lacks (``numpy:>f4``, ``numpy:<U2``,
    ml_dtypes' ``float8_e4m3``) a ``ValueError`` naming it, before anything is decrypted:
    "numpy" reads those.

    Everything is verified before anything is returned: the header MAC first (a wrong
    key fails there), then every segment. On any failure the outputs are zeroed and
    an error from :mod:`gpucrypt.stream` is raised; no tensor is returned.

    ``_check_header(header)`` (private: :mod:`gpucrypt.files.checkpoints`) is called with
    the verified header of the very open file that is then decrypted, and may raise.
    """
    framework = _FRAMEWORK_ALIASES.get(framework, framework) if isinstance(framework, str) \
        else framework
    if framework not in FRAMEWORKS:
        raise ValueError(f"framework must be one of {FRAMEWORKS} (or safetensors' 'pt', 'np'), "
                         f"not {framework!r}")
    target = _check_device(device)
    if framework == "cupy" and target == "cpu":
        raise ValueError("CuPy arrays live on the GPU: use device='cuda', or framework='numpy' "
                         "or 'torch' for device='cpu'")
    _import_framework(framework)  # before a key is unwrapped (a KMS call, an audit event)
    threads = pipeline.cpu_threads(threads)
    if key is None or keyset is not None or identity is not None:
        from .. import audit
        from . import keyed

        with audit.timed("model.decrypt", path=keyed.audit_path(path)) as ev:
            key, ev["key_id"] = keyed.file_key(lambda: _parse_path(path), key, keyset, identity)
            ev["device"] = target  # "auto" resolved: where the tensors are decrypted
            return load_encrypted(path, key, device, framework=framework, threads=threads,
                                  names=names, _check_header=_check_header)
    key = _format.check_key(key)
    with _open_model(path, buffering=0) as f:
        header, segments, tags, seg_key, aad = _prepare_open(f, key)
        if _check_header is not None:
            _check_header(header)
        else:  # opened on its own: a shard of a checkpoint folder is checked against it
            _check_against_its_folder(path, key, header.salt)
        picked = _pick(header.tensors, names)
        if len(picked) < len(header.tensors):
            wanted = set(picked)
            segments = [s for s in segments if s.tensor in wanted]
        if target == "cpu":
            return _load_on_cpu(f, header, segments, tags, seg_key, aad, framework, threads,
                                picked)
        return _load_on_gpu(f, header, segments, tags, seg_key, aad, framework, target, picked)


def _import_framework(framework: str) -> None:
    """ImportError, saying what to do, when ``framework`` (given to ``safe_open``, or to
    ``load_encrypted``, whose default is "torch") cannot be imported. The tensor API's
    fallback to NumPy arrays (for a ciphertext made with a framework this machine lacks)
    is not wanted here: code that asked for torch tensors got NumPy arrays without a
    word, and failed later, far from the cause (safetensors raises)."""
    if framework == "numpy":
        return
    import importlib

    try:
        importlib.import_module(framework)
    except ImportError as exc:
        default = " (the default)" if framework == "torch" else ""
        raise ImportError(f"framework {framework!r}{default} cannot be imported here ({exc}): "
                          f"install {framework}, or load NumPy arrays with "
                          f"framework='numpy' (safe_open(path, 'np'))") from None


def _check_dtypes(framework: str, infos, picked) -> None:
    """ValueError naming the first tensor of ``picked`` whose dtype ``framework`` cannot
    make, before anything is allocated or decrypted: a valid file may hold any NumPy dtype
    (big-endian ``numpy:>f4``, strings ``numpy:<U2``, ml_dtypes' ``float8_e4m3``), and
    torch's lookup of one failed with a bare AttributeError. NumPy makes those (ml_dtypes'
    with ml_dtypes installed, which its own error says)."""
    if framework != "torch":
        return
    import torch

    for t in picked:
        info = infos[t]
        if not isinstance(getattr(torch, info.dtype, None), torch.dtype):
            raise ValueError(f"tensor {info.name!r} has dtype {info.dtype}, which torch "
                             f"{torch.__version__} has no dtype for: load it as a NumPy "
                             f"array, with framework='numpy' (safe_open(path, 'np'))")


def _pick(infos, names: Any) -> list[int]:
    """Table positions of the tensors ``names`` asks for (all for None), in table order."""
    if names is None:
        return list(range(len(infos)))
    if isinstance(names, str):
        raise TypeError("names must be an iterable of tensor names, not one str")
    wanted = set(names)
    unknown = sorted(wanted - {i.name for i in infos})
    if unknown:
        raise _UnknownTensor(f"no tensor {unknown[0]!r} in this model file" + (
            f" (and {len(unknown) - 1} more unknown names)" if len(unknown) > 1 else ""))
    return [t for t, i in enumerate(infos) if i.name in wanted]


def _prepare_open(f, key: bytes):
    """The verified header, the segments, their tags, the segment key and AAD of the model
    file ``f``; raises if the header fails or the file's length is not the header's."""
    header = _verify(_parse(f), key)
    size = os.fstat(f.fileno()).st_size
    expected = header.file_length
    if size < expected:
        raise TruncatedError(f"truncated file: {size} bytes, its header says {expected}")
    if size > expected:
        raise FormatError(f"the file has {size - expected} bytes after its last tag "
                          f"(data appended, or not a gpucrypt model file)")
    segments = _segments(header.tensors, header.segment_size)
    f.seek(header.header_length + header.data_length)
    tags = _read_exact(f, TAG_SIZE * len(segments))
    aad = _segment_aad(header.fixed_fields, header.stored_table)
    seg_key = _derive(key, header.salt, _SEGMENT_INFO, header.fixed_fields)
    return header, segments, tags, seg_key, aad


def _check_against_its_folder(path: Any, key: bytes, salt: bytes) -> None:
    from .checkpoints import _check_file_against_its_folder

    _check_file_against_its_folder(path, key, salt)


def export_safetensors(path: Any, out: Any, key: Any, *, threads: int | None = None,
                       _folder_checked: bool = False) -> ModelHeader:
    """Decrypt the model file ``path`` into a plain safetensors file ``out``, a batch of
    segments at a time (memory: two batches of about 8 MiB, or of one segment when
    segments are larger, plus about 200 bytes per segment for the segment list and
    tags: 27 MB for a 140 GB model in the default 1 MiB segments).

    ``out`` gets the bytes ``safetensors.save_file`` would write for the same tensors and
    metadata, with the metadata keys sorted: the model file's table is canonical JSON
    (sorted keys), so the order of the safetensors header they came from is not kept, and
    a file whose header had several keys in another order comes back with the same
    metadata but not byte for byte (the package itself writes them in its hash map's
    order, which changes from run to run). It is written atomically (temporary
    file beside it, fsync, rename; mode 0600) and appears only once every segment has
    verified: on any failure the temporary file is removed and the error of
    :func:`load_encrypted` is raised. A tensor whose dtype safetensors has no code for
    (``numpy:<U5``, ``complex128``, ...) raises :class:`NotSafetensorsDtype`, before
    anything is decrypted. ``ValueError`` when ``out`` is ``path`` itself (or a link to
    it): write elsewhere, then rename. Returns the verified header.
    """
    from ._safetensors import SAFETENSORS_DTYPES, safetensors_layout
    from .stream import _refuse_same_file

    key = _format.check_key(key)
    # export_safetensors(p, p) put the plaintext in place of the only ciphertext
    _refuse_same_file(path, out)
    threads = pipeline.cpu_threads(threads)
    with _open_model(path, buffering=0) as f:
        header, segments, tags, seg_key, aad = _prepare_open(f, key)
        if not _folder_checked:  # decrypt_checkpoint checks each file against the manifest
            _check_against_its_folder(path, key, header.salt)
        infos = header.tensors
        writable = set(SAFETENSORS_DTYPES.values())
        for info in infos:
            if info.dtype not in writable:
                raise NotSafetensorsDtype(
                    f"tensor {info.name!r} has dtype {info.dtype}, which a safetensors file "
                    f"cannot hold, so the model cannot be written as one; load it with "
                    f"gpucrypt.models.load_encrypted(path, key, framework='numpy') (or "
                    f"safe_open(path, 'np', key=...)) instead")
        prefix, offsets = safetensors_layout(
            [(i.name, i.dtype, i.shape, i.nbytes) for i in infos], header.stored_metadata)
        where = [offsets[i.name] for i in infos]
        in_batch, largest = {}, 0  # segment index -> its offset in its batch's buffer
        for batch in _batches(segments, pipeline.CPU_BATCH_BYTES):
            cursor = 0
            for s in batch:
                in_batch[s.index] = cursor
                cursor += s.length
            largest = max(largest, cursor)  # a single segment may exceed the batch size
        buffers = [pipeline.scratch(largest) for _ in range(_DEPTH + 1)]

        def place(s: _Segment, k: int) -> memoryview:
            return buffers[k % len(buffers)][in_batch[s.index]:in_batch[s.index] + s.length]

        def write(temp: str) -> None:
            fd = os.open(temp, os.O_WRONLY)
            try:
                pipeline.pwrite_all(fd, prefix, 0)

                def write_batch(batch: list[_Segment], k: int) -> None:
                    for s in batch:
                        pipeline.pwrite_all(fd, place(s, k), where[s.tensor] + s.start)

                _open_on_cpu(f, header, segments, tags, seg_key, aad, threads, place, write_batch)
            finally:
                os.close(fd)

        write_atomically_with(out, write)
    return header


def _read_exact(f, n: int) -> bytes:
    buf = np.empty(n, dtype=np.uint8)
    _read_into(f, f.tell(), buf)
    return buf.tobytes()


def _read_into(f, offset: int, view: np.ndarray) -> None:
    """Fill ``view`` (uint8) with the file's bytes from ``offset``."""
    _format.read_at(f.fileno(), offset, view, "the model file")


def _tag_of(tags: bytes, seg: _Segment) -> bytes:
    return tags[seg.index * TAG_SIZE:(seg.index + 1) * TAG_SIZE]


def _load_on_cpu(f, header, segments, tags, seg_key, aad, framework, threads, picked) -> dict:
    """Each segment opened into its tensor's memory on the pool (``_open_on_cpu``);
    ``picked``: the table positions of the tensors to return."""
    infos = header.tensors
    _check_dtypes(framework, infos, picked)
    # the framework itself (not the tensor API's result_adapter, whose fallback to NumPy
    # hid a missing torch): its import was checked when the file was opened
    adapter = fw.BY_NAME[framework]
    outputs = {t: adapter.empty(infos[t].dtype, infos[t].shape, fw.HOST) for t in picked}
    flat = {t: np.asarray(adapter.host_array(adapter.byte_view(o))).reshape(-1)
            for t, o in outputs.items() if infos[t].nbytes}
    try:
        _open_on_cpu(f, header, segments, tags, seg_key, aad, threads,
                     lambda s, k: flat[s.tensor][s.start:s.start + s.length])
    except BaseException:
        for buf in flat.values():
            buf[:] = 0  # no plaintext of the verified segments stays behind
        raise
    return {infos[t].name: adapter.finish(o) for t, o in outputs.items()}


def _open_on_cpu(f, header, segments, tags, seg_key, aad, threads, place, verified=None) -> None:
    """Open every segment on the pipeline's CPU workers, a batch at a time: each worker reads
    its segments' ciphertext, with the tag put after it, into their slots of one of two
    reused batch buffers, and opens each from there into ``place(seg, k)`` (writable
    views; ``k`` is the batch's number) in one OpenSSL call while it is in cache: a single
    pass of the one-shot AEAD (which releases the GIL), no scratch, and the reads (page
    faults of fresh outputs included) spread over the threads. A segment that fails
    leaves its ``place`` zeroed (the backend's ``open`` does: OpenSSL writes before it
    checks). Once all of batch ``k``'s segments passed, ``verified(batch, k)`` is called
    (before batch ``k + 2`` starts: ``place`` may recycle two buffers). Raises on the
    first bad segment, after the workers have stopped."""
    infos = header.tensors
    cipher = _SegmentCipher(header.algorithm, seg_key, header.nonce_prefix, aad,
                            header.segment_count)  # the file's count, for the last flag
    ctx = cipher.context()
    base = header.header_length
    batches = _batches(segments, pipeline.CPU_BATCH_BYTES)
    largest = max((sum(s.length + TAG_SIZE for s in b) for b in batches), default=0)
    sealed = [pipeline.scratch(largest) for _ in range(min(_DEPTH + 1, len(batches)))]

    def load(job):  # job.src: the slot, ciphertext || tag
        _read_into(f, base + job.ident.data_offset(infos), job.src[:job.size])
        job.src[job.size:] = job.tag
        return job.src

    def open_one(job, src) -> bool:
        try:
            ctx.open(job.nonce, src, memoryview(job.aad), memoryview(job.dst))
        except InvalidTag:
            return False
        return True

    def produce():
        for k, batch in enumerate(batches):
            buf, jobs, cursor = sealed[k % len(sealed)], [], 0
            for s in batch:
                jobs.append(cipher.job(s, buf[cursor:cursor + s.length + TAG_SIZE], place(s, k),
                                       _tag_of(tags, s)))
                cursor += s.length + TAG_SIZE

            def done(b, results, batch=batch, k=k):
                _check_verdicts(batch, results, infos)
                if verified is not None:
                    verified(batch, k)
            yield pipeline.Batch(jobs, load=load, done=done)

    with pipeline.CpuRunner(open_one, threads) as runner:  # the slots only ever hold ciphertext
        pipeline.run(produce(), runner, depth=_DEPTH)


def _check_verdicts(batch: list[_Segment], verdicts, infos) -> None:
    for seg, ok in zip(batch, verdicts):
        if not ok:
            raise _segment_failure(seg, infos)


# ---------------------------------------------------------------------------- GPU load
class _Staging:
    """Host staging for one batch of ciphertext, and its upload into device bytes.

    torch: a pinned torch tensor, copied with ``copy_(non_blocking=True)`` on torch's
    current stream; CuPy: ``cupyx.empty_pinned``, copied with ``ndarray.set`` on CuPy's
    current stream; NumPy (simulator only): plain arrays, NumPy standing in for device
    memory. ``host`` is the NumPy view the reader fills.
    """

    def __init__(self, framework: str, nbytes: int):
        self.framework = framework
        nbytes = max(nbytes, 1)
        if framework == "torch":
            import torch

            self._pinned = torch.empty(nbytes, dtype=torch.uint8, device="cpu", pin_memory=True)
            self.host = self._pinned.numpy()
        elif framework == "cupy":
            import cupyx

            self.host = cupyx.empty_pinned((nbytes,), dtype=np.uint8)
        else:
            self.host = np.empty(nbytes, dtype=np.uint8)

    def upload(self, start: int, length: int, dst_bytes: Any, dst_start: int, stream: Any) -> None:
        dst = dst_bytes[dst_start:dst_start + length]
        if self.framework == "torch":
            dst.copy_(self._pinned[start:start + length], non_blocking=True)
        elif self.framework == "cupy":
            dst.set(self.host[start:start + length], stream=stream)
        else:
            dst[...] = self.host[start:start + length]


def _gpu_target(framework: str, target: str, gpu):
    """(adapter, place, stream) for device results of ``framework``; ValueError where the
    framework cannot hold device memory here."""
    simulated = bool(gpu.describe().get("simulator"))
    if framework == "numpy":
        if not simulated:
            raise ValueError("framework='numpy' gives host arrays: use device='cpu', or "
                             "framework='torch'/'cupy' to load onto the GPU")
        return fw.BY_NAME["numpy"], ("cuda", 0), None
    if simulated:
        raise ValueError(f"numba's CUDA simulator has no device memory for {framework}; "
                         f"use framework='numpy' there (NumPy arrays stand in for device arrays)")
    index = int(target[5:]) if ":" in target else None
    if framework == "torch":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("this torch build has no CUDA device: use device='cpu'")
        place = ("cuda", index if index is not None else torch.cuda.current_device())
        torch.cuda.set_device(place[1])
        return fw.BY_NAME["torch"], place, torch.cuda.current_stream(place[1])
    import cupy

    place = ("cuda", index if index is not None else cupy.cuda.Device().id)
    cupy.cuda.Device(place[1]).use()
    return fw.BY_NAME["cupy"], place, cupy.cuda.get_current_stream()


def _load_on_gpu(f, header, segments, tags, seg_key, aad, framework, target, picked) -> dict:
    from ..backends import get_backend

    infos = header.tensors
    _check_dtypes(framework, infos, picked)
    gpu = get_backend("gpu")
    adapter, place, stream = _gpu_target(framework, target, gpu)
    outputs = {t: adapter.empty(infos[t].dtype, infos[t].shape, place) for t in picked}
    dev_bytes = {t: adapter.byte_view(o) for t, o in outputs.items() if infos[t].nbytes}
    batches = _batches(segments, _GPU_BATCH_BYTES, infos)
    largest = max((sum(s.length for s in b) for b in batches), default=0)
    staging = [_Staging(framework, largest) for _ in range(min(2, len(batches)))]
    cipher = _SegmentCipher(header.algorithm, seg_key, header.nonce_prefix, aad,
                            header.segment_count)
    base = header.header_length

    def read(k: int) -> None:  # a batch's segments are contiguous in the file
        batch = batches[k]
        _read_into(f, base + batch[0].data_offset(infos),
                   staging[k % 2].host[:sum(s.length for s in batch)])

    def produce(reader):
        """Batch k+1 is read on ``reader`` while batch k is uploaded and opened."""
        ahead = reader.submit(read, 0) if batches else None
        for k, batch in enumerate(batches):
            ahead.result()
            if k + 1 < len(batches):
                # staging[(k+1) % 2] was last uploaded for batch k-1, whose open_batch
                # synchronised the stream: it is free to refill
                ahead = reader.submit(read, k + 1)
            jobs, offsets, cursor = [], {}, 0
            for seg in batch:
                view = dev_bytes[seg.tensor][seg.start:seg.start + seg.length]
                jobs.append(cipher.job(seg, view, view, _tag_of(tags, seg)))
                offsets[seg.index], cursor = cursor, cursor + seg.length

            def upload(job, k=k, offsets=offsets):  # one copy per segment, into its tensor
                seg = job.ident
                staging[k % 2].upload(offsets[seg.index], seg.length, dev_bytes[seg.tensor],
                                      seg.start, stream)
                return job.src

            yield pipeline.Batch(jobs, load=upload,
                                 done=lambda b, ok, batch=batch: _check_verdicts(batch, ok, infos))

    reader = ThreadPoolExecutor(1)
    try:
        runner = pipeline.GpuRunner(gpu, "open", cipher.algorithm, cipher.key, stream=stream,
                                    device=place[1])
        pipeline.run(produce(reader), runner, depth=1)
    except BaseException:
        for buf in dev_bytes.values():
            _zero_device(framework, buf)
        raise
    finally:
        reader.shutdown(wait=True)
    return {infos[t].name: adapter.finish(o) for t, o in outputs.items()}


def _zero_device(framework: str, buf: Any) -> None:
    if framework == "torch":
        buf.zero_()
    elif framework == "cupy":
        buf.fill(0)
    else:
        buf[...] = 0


# ============================================================================ key rotation
_KEEP = object()


def replace_envelope(path: Any, key: Any, envelope: Any, key_id: Any = _KEEP) -> ModelHeader:
    """Rewrite the header of the model file at ``path`` with a new envelope (and key id,
    if given; None removes it), copying the tensor data and tags byte for byte; returns
    the new (verified) header. As :func:`gpucrypt.stream.replace_envelope`: ``key`` must
    verify the old header MAC (AuthenticationError otherwise) and MACs the new one; the
    segments depend on neither field (their associated data is the fixed fields and the
    table's hash), so they stay valid. Atomic, keeping the file's permissions, and held
    under the file's ``flock`` from the read to the rename, as there."""
    from ._atomic import held_exclusively, replace_head

    key = _format.check_key(key)
    with held_exclusively(os.path.realpath(path), _not_regular(path), required_as=path) as f:
        old = _verify(_parse(f), key)
        new_key_id = old.key_id if key_id is _KEEP else key_id
        new_key_id, envelope = _format.check_key_id_envelope(new_key_id, envelope)
        header = _replace(old, key_id=new_key_id, envelope=envelope)
        body = _header_body(header)
        mac = hmac.new(_derive(key, header.salt, _HEADER_MAC_INFO, header.fixed_fields), body,
                       hashlib.sha256).digest()
        replace_head(path, f, body + mac)
    return _replace(header, header_mac=mac, header_length=len(body) + MAC_SIZE)


class _SegmentOpener:
    """Opens single segments of one model file, in place, from any thread: what
    :class:`_SealedTensor` reads through."""

    def __init__(self, header: ModelHeader, segments: list[_Segment], tags: bytes,
                 seg_key: bytes, aad: bytes):
        self.header, self.segments, self.tags = header, segments, tags
        self.cipher = _SegmentCipher(header.algorithm, seg_key, header.nonce_prefix, aad,
                                     len(segments))
        self.ctx = self.cipher.context()

    def open_into(self, index: int, view: np.ndarray) -> None:
        """Verify and decrypt segment ``index``, whose ciphertext ``view`` holds, in place;
        a wrong tag raises (naming the segment) with ``view`` holding its ciphertext."""
        seg = self.segments[index]
        try:
            self.ctx.open_detached(self.cipher.nonce(seg), view, _tag_of(self.tags, seg),
                                   memoryview(self.cipher.aad), view, one_pass=True)
        except InvalidTag:
            raise _segment_failure(seg, self.header.tensors) from None


@dataclass(frozen=True)
class _SealedTensor(StoredTensor):
    """A tensor of a model file being re-encrypted: its ciphertext in the old file, read
    and opened a whole segment at a time, as a writer under the same segment size asks
    for exactly the old file's segments."""

    first_segment: int      # the old file's index of the tensor's first segment
    opener: _SegmentOpener

    def read_into(self, start: int, view: np.ndarray) -> None:
        size = self.opener.header.segment_size
        if start % size or view.nbytes != min(size, self.nbytes - start):
            raise ValueError(f"bytes {start}..{start + view.nbytes} are not one segment "
                             f"of the tensor ({self.nbytes} bytes, segments of {size})")
        _format.read_at(self.fd, self.offset + start, view, "the model file")
        self.opener.open_into(self.first_segment + start // size, view)


def _reencrypt(path: Any, key: Any, sink: Any, new_key: Any, *, key_id: Any = None,
               envelope: Any = None, threads: int | None = None,
               _salt: bytes | None = None) -> ModelHeader:
    """Write the model file ``path`` (opened with ``key``) to ``sink`` again under
    ``new_key``: a fresh salt (or ``_salt``) and nonce prefix, the same tensors, table,
    metadata, algorithm, segment size and ``encrypt_names``. A segment at a time through
    the writer's batch buffers (memory: a few batches, plus about 200 bytes per segment of
    either file for the segment lists and tags, 27 MB for 140 GB in 1 MiB segments): each
    is read, verified and decrypted in its slot there, and sealed again in place, so no
    plaintext reaches ``sink`` and none outlives its slot. Any segment that fails raises
    :class:`AuthenticationError` (naming it) from :func:`save_encrypted`, which leaves
    ``sink`` unpublished. Returns the new file's verified header."""
    key = _format.check_key(key)
    with _open_model(path, buffering=0) as f:
        old, segments, tags, seg_key, aad = _prepare_open(f, key)
        opener = _SegmentOpener(old, segments, tags, seg_key, aad)
        sealed, first = {}, 0
        for info in old.tensors:  # table order is data order: the new table is the old one
            sealed[info.name] = _SealedTensor(info.dtype, info.shape, f.fileno(),
                                              old.header_length + info.begin, info.nbytes,
                                              first, opener)
            first += -(-info.nbytes // old.segment_size)
        return save_encrypted(sealed, sink, new_key, old.stored_metadata,
                              algorithm=old.algorithm, encrypt_names=old.names_encrypted,
                              segment_size=old.segment_size, device="cpu", key_id=key_id,
                              envelope=envelope, threads=threads, _salt=_salt)


def __getattr__(name: str) -> Any:
    """``safe_open``, from :mod:`gpucrypt.files._safe_open` (which builds on this module),
    imported on first use."""
    if name == "safe_open":
        from ._safe_open import safe_open

        return safe_open
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
