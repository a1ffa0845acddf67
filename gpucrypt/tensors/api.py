"""Encrypt tensors where they live: ``encrypt_tensor`` / ``decrypt_tensor`` and batches.

A program holding tensors (model weights, activations, KV caches) in PyTorch, CuPy,
JAX, numba or NumPy encrypts them without a round trip through host memory: device
tensors go to the GPU backend, host tensors to the CPU (or to the GPU with
``device="gpu"``). The bytes encrypted are the tensor's in-memory bytes, so every
dtype works (bfloat16, float8, complex32 ...), and the result decrypts to the same
kind of tensor, dtype, shape and device.

What is authenticated (docs/TENSOR_FORMAT.md has the byte layout)::

    associated data = metadata block || user aad
    metadata block  = magic, version, algorithm, framework, dtype, shape, byte count,
                      key id, name

so changing the recorded dtype, shape, framework, algorithm, key id or name of an
:class:`EncryptedTensor` makes decryption fail with ``InvalidTag``, like changing
its ciphertext, tag or nonce. The user's ``aad`` is kept in the EncryptedTensor
(check ``enc.aad``: it is authentic once ``decrypt_tensor`` succeeds).

Nonces: random by default (12 bytes for ChaCha20-Poly1305 and AES-GCM: at most
``RANDOM_NONCE_BUDGET`` = 2**32 messages per key, which keeps the probability of a
repeated nonce under 2**-33, NIST SP 800-38D §8.3; 24 bytes for
XChaCha20-Poly1305: any practical number of messages). :class:`NonceSequence` and
:class:`TensorCipher` give counter nonces for callers who want determinism.

Memory: out of place allocates exactly one output, through the framework's own
allocator (or NumPy's, for the ciphertext of a torch tensor sealed on the CPU, which
torch adopts without a copy when it is asked for). ``inplace=True`` encrypts in the
tensor's own memory; the EncryptedTensor then refers to that memory (the tensor holds
ciphertext until it is decrypted in place again), and a pickle (or deep copy) of it holds a
copy of exactly the ciphertext's bytes, never the tensor (a view would bring its whole
storage), and comes back an out-of-place result. A failed in-place decrypt leaves the
ciphertext as it was; a failed out-of-place decrypt zeroes its output and returns
nothing. An in-place batch whose entries share memory (a state dict's tied weights) is refused
before anything is touched: each memory can hold one ciphertext. Writing a torch tensor in
place (or as ``out=``) bumps its autograd version, as torch's own in-place ops do, so a
backward pass that saved it raises. torch has no read-only flag: a torch tensor over a
read-only mapping (``torch.from_numpy`` of an ``np.memmap`` of mode "r") is refused in
place and as ``out=`` (its memory is probed: see ``_memory_writable``), but one over memory
that is writable though its owner must not change (``torch.frombuffer`` of ``bytes``,
``torch.from_numpy`` of an array flagged read-only; torch warns when it makes them)
cannot be told apart and is written: ``.clone()`` such tensors first. An in-place batch that
raises part way leaves no tensor encrypted without its nonce and tag: encrypting, the
host tensors already sealed are decrypted back (or, failing that, attached to the error
as ``exc.encrypted``); decrypting, each entry is spent as soon as its plaintext is back.
Host batches over 4 MiB run on all usable cores (``cryptography`` releases the GIL):
several tensors are shared out among threads, and one large ChaCha20-Poly1305 /
XChaCha20-Poly1305 tensor is cut into keystream pieces on a pool while the MAC follows
them in order.

Devices and streams: GPU work runs in the tensors' own device's context (one device
per batch) and is queued on the given stream or the framework's current one; a given
stream first waits, on the device, for the current one (where the inputs were made),
and torch inputs are ``record_stream``-ed on it. Nothing synchronises unless a host
result is asked for (``enc.tag``, ``to_bytes()``, host tensors sent to the GPU, and
decryption, which must check tags).

Limits: one message per tensor, so a tensor is at most (2**32 - 1) * 64 bytes
(ChaCha20-Poly1305) or (2**32 - 2) * 16 bytes (AES-GCM, 64 GiB). Little-endian hosts.
"""
from __future__ import annotations

import copy
import ctypes
import errno
import functools
import math
import operator
import os
import struct
import sys
import threading
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from cryptography.exceptions import InvalidTag

from .. import _limits, pipeline
from . import _frameworks as fw
from .._buffers import bytes_arg, zero
from .._interrupts import held_interrupts, uninterrupted
from ._frameworks import HOST
from ..backends import get_backend
from ..backends import cpu as _cpu

__all__ = ["EncryptedTensor", "encrypt_tensor", "decrypt_tensor", "encrypt_tensors",
           "decrypt_tensors", "NonceSequence", "TensorCipher", "ALGORITHMS",
           "RANDOM_NONCE_BUDGET", "FORMAT_VERSION"]

ALGORITHMS = ("chacha20-poly1305", "xchacha20-poly1305", "aes-gcm")
#: host tensors of a batch adding up to this many bytes are encrypted on several threads
_HOST_PARALLEL_BYTES = 4 << 20
_ALGORITHM_CODES = {"chacha20-poly1305": 1, "xchacha20-poly1305": 2, "aes-gcm": 3}
_NONCE_SIZE = {"chacha20-poly1305": 12, "xchacha20-poly1305": 24, "aes-gcm": 12}
_MAX_DATA = {"chacha20-poly1305": _limits.CHACHA20POLY1305_MAX_PLAINTEXT,
             "xchacha20-poly1305": _limits.CHACHA20POLY1305_MAX_PLAINTEXT,
             "aes-gcm": _limits.GCM_MAX_PLAINTEXT}
TAG_SIZE = _limits.TAG_SIZE

#: Messages per key with random 96-bit nonces (collision probability < 2**-33).
RANDOM_NONCE_BUDGET = 2**32

FORMAT_VERSION = 1
_MAGIC = b"GCTENS"
_FIXED = struct.Struct("<6sBBBBBBHBBHQ")   # 26 bytes, see docs/TENSOR_FORMAT.md
_MAX_NDIM = 64
_MAX_DTYPE_LEN = 64
_KEY_ID_NONE, _KEY_ID_BYTES, _KEY_ID_TEXT = 0, 1, 2
_NAME_NONE, _NAME_TEXT = 0, 1
_DTYPE_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789_:<>|=[]ABCDEFGHIJKLMNOPQRSTUVWXYZ")



# ============================================================================ arguments
def _check_algorithm(algorithm: str) -> str:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS} (or aes-128-gcm, aes-192-gcm, "
                         f"aes-256-gcm: aes-gcm with a key of that size), not {algorithm!r}")
    return algorithm


#: AES-GCM by its key size, as OpenSSL and the file formats name it ("aes-256-gcm"): the
#: tensor API's "aes-gcm" with a key of exactly that size
_SIZED_AES_GCM = {"aes-128-gcm": 16, "aes-192-gcm": 24, "aes-256-gcm": 32}


def _algorithm_and_key(algorithm: Any, key: Any) -> tuple[str, bytes]:
    """(the algorithm's name in :data:`ALGORITHMS`, the key's bytes), both checked."""
    if algorithm in ALGORITHMS:  # the usual call: one lookup
        return algorithm, _key_bytes(key, algorithm)
    size = _SIZED_AES_GCM.get(algorithm) if isinstance(algorithm, str) else None
    if size is None:
        _check_algorithm(algorithm)  # raises, naming the algorithms
    key = _key_bytes(key, "aes-gcm")
    if len(key) != size:
        raise ValueError(f"{algorithm} takes a {size}-byte key, not {len(key)} bytes ('aes-gcm' "
                         f"takes a key of 16, 24 or 32 bytes)")
    return "aes-gcm", key


def _key_bytes(key: Any, algorithm: str) -> bytes:
    key = bytes_arg(key, "key")
    if algorithm == "aes-gcm":
        if len(key) not in (16, 24, 32):
            raise ValueError("AES-GCM key must be 128, 192, or 256 bits.")
    elif len(key) != 32:
        raise ValueError(f"{algorithm} key must be 32 bytes.")
    return key


def _aad_bytes(aad: Any) -> bytes:
    if aad is None:
        return b""
    try:
        return bytes(memoryview(aad))
    except TypeError:
        raise TypeError(f"aad must be bytes-like or None, not {type(aad).__name__}") from None


def _check_key_id(key_id: Any) -> bytes | str | None:
    if key_id is None:
        return None
    if isinstance(key_id, str):
        raw = key_id.encode("utf-8")
    elif isinstance(key_id, (bytes, bytearray, memoryview)):
        key_id = raw = bytes(key_id)
    else:
        raise TypeError(f"key_id must be str, bytes or None, not {type(key_id).__name__}")
    if len(raw) > 0xFFFF:
        raise ValueError("key_id must be at most 65535 bytes")
    return key_id


def _check_name(name: Any) -> str | None:
    if name is None:
        return None
    if not isinstance(name, str):
        raise TypeError(f"tensor names must be str, not {type(name).__name__}")
    if len(name.encode("utf-8")) > 0xFFFF:
        raise ValueError("tensor names must be at most 65535 bytes in UTF-8")
    return name


def _check_device(device: Any) -> str | None:
    if device in (None, "auto"):
        return None
    if device not in ("cpu", "gpu"):
        from ..backends import check_device

        device = check_device(device)  # "cuda", torch.device("cpu"), ...: or why not
        return None if device == "auto" else device
    return device


def _check_nonce(nonce: Any, algorithm: str) -> bytes:
    nonce = bytes_arg(nonce, "nonce")
    if len(nonce) != _NONCE_SIZE[algorithm]:
        raise ValueError(f"Nonce must be {_NONCE_SIZE[algorithm]} bytes for {algorithm}")
    return nonce


# ============================================================================ nonces
class NonceSequence:
    """Counter nonces that are never handed out twice: ``prefix || counter`` (big-endian).

    ``size`` is the nonce length (12, or 24 for XChaCha20-Poly1305); the counter fills
    the ``size - len(prefix)`` bytes after the prefix (at least 4) and starts at
    ``start``. Thread-safe. Raises ``OverflowError`` once the counter is exhausted,
    never wraps. Uniqueness holds within one object: two writers under one key need
    different prefixes (or disjoint ``start`` ranges), which only the caller can ensure.
    It cannot be copied or pickled (a copy would hand out the same nonces again), and
    it hands out nothing in a process forked from the one that made it
    (``RuntimeError``): the child's copy of the counter would repeat the parent's
    nonces. A sequence made in the child itself (with a prefix of its own) works.
    """

    def __init__(self, size: int = 12, *, prefix: bytes = b"", start: int = 0):
        if size not in (12, 24):
            raise ValueError("size must be 12 or 24")
        prefix = bytes_arg(prefix, "prefix")
        if len(prefix) > size - 4:
            raise ValueError(f"prefix must be at most {size - 4} bytes (the counter needs 4)")
        self._prefix = prefix
        self._width = size - len(prefix)
        self._limit = 1 << (8 * self._width)
        if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < self._limit:
            raise ValueError(f"start must be an int in [0, 2**{8 * self._width})")
        self._next = start
        self._lock = threading.Lock()
        # the process it belongs to: both marks, as the pid alone could come back (a
        # descendant given the pid of an ancestor that has exited) and the fork count
        # alone misses a fork that does not run Python's at-fork hooks (C code's fork())
        self._process = (os.getpid(), _FORKS[0])

    @property
    def size(self) -> int:
        return len(self._prefix) + self._width

    @property
    def remaining(self) -> int:
        """How many nonces are left."""
        return self._limit - self._next

    def take(self, count: int) -> list[bytes]:
        """The next ``count`` nonces, all or none (``OverflowError`` if fewer are left)."""
        if isinstance(count, bool):
            raise TypeError("count must be an int, not bool")
        count = operator.index(count)  # a float would leave the counter unusable
        if count < 0:
            raise ValueError("count must be >= 0")
        if self._process != (os.getpid(), _FORKS[0]):
            raise RuntimeError(
                "this NonceSequence was made in another process and copied into this one by "
                "fork(): it would hand out the nonces the other process hands out, under the "
                "same key. Make a new sequence in each process, with a prefix of its own "
                "(NonceSequence(prefix=...), TensorCipher(nonces='counter', prefix=...))")
        with self._lock:
            first = self._next
            if count > self._limit - first:
                raise OverflowError(f"nonce sequence exhausted: {self._limit - first} nonces left, "
                                    f"{count} asked for; use a new key or prefix")
            self._next = first + count
        return [self._prefix + (first + i).to_bytes(self._width, "big") for i in range(count)]

    def next(self) -> bytes:
        """The next nonce."""
        return self.take(1)[0]

    def __repr__(self) -> str:
        return f"NonceSequence(size={self.size}, prefix={self._prefix!r}, next={self._next})"

    def __reduce_ex__(self, protocol):  # copy, deepcopy and pickle all come here
        raise TypeError("a NonceSequence cannot be copied or pickled: the copy would hand out "
                        "the same nonces again. Give each writer its own sequence with its "
                        "own prefix (NonceSequence(prefix=...))")


#: how many fork()s this process is removed from the first one (NonceSequence)
_FORKS = [0]


def _count_fork() -> None:
    _FORKS[0] += 1


if hasattr(os, "register_at_fork"):  # POSIX; elsewhere there is no fork (the pid suffices)
    os.register_at_fork(after_in_child=_count_fork)


def _nonces_for(count: int, algorithm: str, source: Any) -> list[bytes]:
    """``count`` nonces from ``source``: None (random), a NonceSequence, or a sequence of bytes."""
    size = _NONCE_SIZE[algorithm]
    if source is None:  # one read of the OS's random source for all: one call each cost
        pool = os.urandom(size * count)  # 0.33 us per 16 KiB tensor of a batch, this 0.06
        return [pool[i:i + size] for i in range(0, size * count, size)]
    if isinstance(source, NonceSequence):
        if source.size != size:
            raise ValueError(f"{algorithm} needs {size}-byte nonces; the sequence makes {source.size}")
        return source.take(count)
    nonces = [_check_nonce(n, algorithm) for n in source]
    if len(nonces) != count:
        raise ValueError(f"{count} nonces needed, {len(nonces)} given")
    if len(set(nonces)) != len(nonces):
        raise ValueError("nonces within a batch must all be different")
    return nonces


# ============================================================================ metadata
def _metadata(*fields: Any) -> bytes:
    """:func:`_encode_metadata`, remembered for the last 4096 distinct fields (none of
    them secret; a state dict's every tensor, where 256 thrashed on a 300-tensor model,
    about 1 MiB at most): tensors come back with the same names and shapes, and at 4 KiB the
    encoding cost as much as the cipher. Fields that cannot be remembered (a shape a
    caller replaced with a list) are encoded afresh."""
    try:
        return _remembered_metadata(*fields)
    except TypeError:
        return _encode_metadata(*fields)


def _encode_metadata(algorithm: str, framework: str, dtype: str, shape: tuple[int, ...],
                     nbytes: int, key_id: bytes | str | None, name: str | None) -> bytes:
    """The canonical metadata block (docs/TENSOR_FORMAT.md), first part of the AAD."""
    dtype_raw = dtype.encode("ascii")
    if key_id is None:
        kid_kind, kid = _KEY_ID_NONE, b""
    elif isinstance(key_id, str):
        kid_kind, kid = _KEY_ID_TEXT, key_id.encode("utf-8")
    else:
        kid_kind, kid = _KEY_ID_BYTES, key_id
    name_kind, name_raw = (_NAME_NONE, b"") if name is None else (_NAME_TEXT, name.encode("utf-8"))
    if len(shape) > _MAX_NDIM:
        raise ValueError(f"tensors of more than {_MAX_NDIM} dimensions are not supported")
    head = _FIXED.pack(_MAGIC, FORMAT_VERSION, _ALGORITHM_CODES[algorithm],
                       fw.FRAMEWORK_CODES[framework], len(shape), len(dtype_raw), kid_kind,
                       len(kid), name_kind, 0, len(name_raw), nbytes)
    return b"".join([head, struct.pack(f"<{len(shape)}Q", *shape), dtype_raw, kid, name_raw])


_remembered_metadata = functools.lru_cache(maxsize=4096, typed=True)(_encode_metadata)


def _decode_metadata(data: memoryview, offset: int = 0) -> tuple[dict, int]:
    """Parse a metadata block at ``offset``; returns (fields, end). ``ValueError`` on anything
    malformed, non-canonical or inconsistent."""
    if len(data) - offset < _FIXED.size:
        raise ValueError("not an encrypted tensor: too short for the metadata header")
    (magic, version, alg_code, fw_code, ndim, dtype_len, kid_kind, kid_len, name_kind, reserved,
     name_len, nbytes) = _FIXED.unpack_from(data, offset)
    if magic != _MAGIC:
        raise ValueError("not an encrypted tensor: bad magic bytes")
    if version != FORMAT_VERSION:
        raise ValueError(f"unsupported encrypted-tensor format version {version} "
                         f"(this gpucrypt reads version {FORMAT_VERSION})")
    algorithm = {v: k for k, v in _ALGORITHM_CODES.items()}.get(alg_code)
    framework = {v: k for k, v in fw.FRAMEWORK_CODES.items()}.get(fw_code)
    if algorithm is None:
        raise ValueError(f"unknown algorithm code {alg_code}")
    if framework is None:
        raise ValueError(f"unknown framework code {fw_code}")
    if ndim > _MAX_NDIM:
        raise ValueError(f"ndim {ndim} is over the limit of {_MAX_NDIM}")
    if not 1 <= dtype_len <= _MAX_DTYPE_LEN:
        raise ValueError(f"dtype name length {dtype_len} is not in 1..{_MAX_DTYPE_LEN}")
    if kid_kind not in (_KEY_ID_NONE, _KEY_ID_BYTES, _KEY_ID_TEXT) or (
            kid_kind == _KEY_ID_NONE and kid_len):
        raise ValueError("invalid key id field")
    if name_kind not in (_NAME_NONE, _NAME_TEXT) or (name_kind == _NAME_NONE and name_len):
        raise ValueError("invalid name field")
    if reserved:
        raise ValueError("reserved byte is not zero")
    pos = offset + _FIXED.size
    end = pos + 8 * ndim + dtype_len + kid_len + name_len
    if end > len(data):
        raise ValueError("truncated metadata")
    shape = struct.unpack_from(f"<{ndim}Q", data, pos)
    pos += 8 * ndim
    if any(d >= 1 << 63 for d in shape):  # no framework has such a dimension (int64 sizes)
        raise ValueError(f"shape {tuple(shape)} has a dimension of 2**63 or more")
    dtype_raw = bytes(data[pos:pos + dtype_len])
    pos += dtype_len
    if not set(dtype_raw) <= _DTYPE_CHARS:
        raise ValueError("invalid characters in the dtype name")
    dtype = dtype_raw.decode("ascii")
    itemsize = fw.dtype_itemsize(dtype)   # ValueError for unknown names
    if dtype.startswith(fw.NUMPY_PREFIX) and (framework == "torch" or
                                              not fw.is_canonical_numpy_name(dtype)):
        # only what an encryption writes: NumPy's own form for a dtype without a portable
        # name (a torch tensor has one), never a second name for one that has
        raise ValueError(f"dtype {dtype!r} is not the canonical name of a {framework} dtype")
    kid_raw = bytes(data[pos:pos + kid_len])
    pos += kid_len
    name_raw = bytes(data[pos:pos + name_len])
    pos += name_len
    try:
        key_id = (None if kid_kind == _KEY_ID_NONE else
                  kid_raw.decode("utf-8") if kid_kind == _KEY_ID_TEXT else kid_raw)
        name = None if name_kind == _NAME_NONE else name_raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("key id or name is not valid UTF-8") from None
    count = 1
    for d in shape:
        count *= d
    if count * itemsize != nbytes:
        raise ValueError(f"byte count {nbytes} does not match shape {tuple(shape)} of {dtype}")
    if nbytes > _MAX_DATA[algorithm]:
        raise ValueError(f"byte count {nbytes} is over {algorithm}'s limit")
    fields = dict(algorithm=algorithm, framework=framework, dtype=dtype, shape=tuple(shape),
                  nbytes=nbytes, key_id=key_id, name=name)
    return fields, end


# ============================================================================ EncryptedTensor
#: what a spent EncryptedTensor (decrypted in place) says when it is used
_SPENT = ("this EncryptedTensor was decrypted in place: its memory holds the plaintext again, "
          "not the ciphertext")


class EncryptedTensor:
    """A tensor's ciphertext plus everything needed to check and rebuild it.

    Attributes: ``framework``, ``dtype`` (portable name), ``shape``, ``nbytes``,
    ``algorithm``, ``key_id``, ``name``, ``aad`` (the user's), ``nonce``, ``tag``
    (16 bytes; reading it waits for the GPU), ``ciphertext`` (a 1-D ``uint8`` buffer
    of the framework where the data was: a torch tensor, CuPy/numba device array or
    NumPy array), ``on_device`` and ``inplace`` (the ciphertext is the original
    tensor's memory). ``metadata()`` and ``associated_data()`` give the authenticated
    bytes. ``to_bytes()`` / ``from_bytes()`` serialise it (docs/TENSOR_FORMAT.md).
    """

    __slots__ = ("framework", "dtype", "shape", "nbytes", "algorithm", "key_id", "name", "aad",
                 "nonce", "_ct", "_place", "_tag", "_tags", "_tag_row", "_source",
                 "_consumed", "_adopt", "_home")

    def __init__(self, *, framework, dtype, shape, nbytes, algorithm, key_id, name, aad, nonce,
                 ciphertext, place, tag=None, tags=None, tag_row=0, source=None, home=None):
        self.framework, self.dtype, self.shape, self.nbytes = framework, dtype, tuple(shape), nbytes
        self.algorithm, self.key_id, self.name, self.aad = algorithm, key_id, name, aad
        self.nonce = nonce
        self._ct, self._place = ciphertext, place
        self._tag, self._tags, self._tag_row = tag, tags, tag_row
        self._source = source
        self._consumed, self._adopt = [False], False  # a cell: see above _check_alive
        # the framework's own device object where ``place`` does not tell it (a JAX array on
        # one of several CPU devices: see Adapter.home); this process's, never pickled. Left
        # unset by ``_host`` (NumPy and torch have none): read it with getattr
        self._home = home

    @classmethod
    def _host(cls, framework, dtype, shape, nbytes, algorithm, key_id, name, aad, nonce,
              ciphertext, tag, source) -> "EncryptedTensor":
        """The constructor for host tensors (one small tensor, and a batch's host tensors),
        positional: keyword parsing was a tenth of a 4 KiB call. ``shape`` must already
        be a tuple."""
        # one statement per slot: tuple assignments build and unpack a tuple (+0.1 us)
        self = object.__new__(cls)
        self.framework = framework
        self.dtype = dtype
        self.shape = shape
        self.nbytes = nbytes
        self.algorithm = algorithm
        self.key_id = key_id
        self.name = name
        self.aad = aad
        self.nonce = nonce
        self._ct = ciphertext
        self._place = HOST
        self._tag = tag
        self._tags = None
        self._tag_row = 0
        self._source = source
        self._consumed = [False]
        # a torch tensor's new ciphertext is kept as the NumPy array OpenSSL wrote until
        # ``ciphertext`` is asked for (torch.from_numpy costs a third of a 4 KiB call)
        self._adopt = framework == "torch" and source is None
        return self

    # --- views ---
    @property
    def _ciphertext(self) -> Any:
        """The ciphertext buffer as this module reads it. An in-place result sealed on the
        CPU from a NumPy array or a CPU torch tensor (alone or in a batch) is made without
        one: their memory is read through its buffer or by address (a torch byte view cost
        1.7 us, a fifth of a 4 KiB call), and most results are decrypted without ever
        needing one; it is then the source's byte view, made when first asked for.

        A new result sealed on the CPU by the one-tensor path holds OpenSSL's ``bytes``
        (ciphertext || tag) instead: returned by its one-shot call, they cost no array,
        and decrypting hands them back to OpenSSL as they are (0.6-0.8 us of a 4 KiB
        call each way). The ciphertext's own writable array is copied from them when
        first asked for, here."""
        ct = self._ct
        if ct is None and self._source is not None:
            # the source's own framework, not the recorded one (which may have been edited)
            ct = self._ct = fw.adapter_for(self._source).byte_view(self._source)
        elif type(ct) is bytes:
            # a slice of a copy with the tag: an empty copy of its own would have stride 0,
            # which torch's views of it refuse
            ct = self._ct = np.frombuffer(ct, dtype=np.uint8).copy()[:-TAG_SIZE]
        return ct

    @_ciphertext.setter
    def _ciphertext(self, value: Any) -> None:
        self._ct = value

    @property
    def ciphertext(self) -> Any:
        self._check_alive()
        if self._adopt:
            self._ciphertext, self._adopt = fw.BY_NAME["torch"].adopt_host(self._ciphertext), False
        return self._ciphertext

    @property
    def on_device(self) -> bool:
        return self._place != HOST

    @property
    def inplace(self) -> bool:
        return self._source is not None

    @property
    def tag(self) -> bytes:
        """The 16-byte tag (copied from the GPU, after its work is done, the first time)."""
        if self._tag is None:
            self._tag = self._tags.row(self._tag_row)
        return self._tag

    def metadata(self) -> bytes:
        """The canonical metadata block (the first part of the associated data)."""
        return _metadata(self.algorithm, self.framework, self.dtype, self.shape, self.nbytes,
                         self.key_id, self.name)

    def associated_data(self) -> bytes:
        """Exactly the associated data the AEAD authenticates: metadata block || user aad."""
        return self.metadata() + self.aad

    # ``_consumed`` is a cell ([bool]) that a shallow copy shares with its original: both
    # name the same ciphertext memory, so decrypting it in place through either spends
    # both (a copy that did not know would serialise the plaintext as its ciphertext). A
    # deep copy or a pickle has memory, and a cell, of its own.

    def _check_alive(self) -> None:
        if self._consumed[0]:
            raise ValueError(_SPENT)

    def __getstate__(self):  # pickle, torch.save (copy.copy: __copy__, deepcopy: __deepcopy__)
        state = self._slot_state()
        # a device object of this process, left out: unpickling leaves the slot unset, which
        # its reader takes as None, and a class without the slot (before a9b6888) can load it
        state.pop("_home", None)
        if self._source is not None:
            # In place, the ciphertext is the caller's tensor, which pickles as more than its
            # bytes: a torch view writes its whole storage (the plaintext of the tensors
            # beside it: q of a fused qkv, a flat parameter's other entries) and the
            # tensor's Python attributes. Exactly the ciphertext's bytes go instead, a
            # compact copy; the copy made of them is an ordinary out-of-place result, with
            # memory (and a spent cell) of its own.
            state["_source"] = None
            state["_ct"], state["_adopt"] = self._ciphertext_copy()
            state["_consumed"] = [False]
        return None, state

    def __deepcopy__(self, memo):
        # as a pickle (an in-place result becomes an out-of-place one holding a copy of its
        # ciphertext alone), but in this process, so the device it goes back to (_home)
        # stays: a JAX array on a second CPU device came back on the first
        new = object.__new__(type(self))
        memo[id(self)] = new
        _, state = self.__getstate__()
        fresh = state["_ct"] if self._source is not None else None  # a copy already
        state = copy.deepcopy(state, memo)
        if fresh is not None:
            state["_ct"] = fresh  # not copied twice
        for name, value in state.items():
            setattr(new, name, value)
        home = getattr(self, "_home", None)
        if home is not None:
            new._home = home
        return new

    def __copy__(self):
        # a shallow copy names the same memory, the same source included, and shares the
        # spent cell (see above _check_alive)
        new = object.__new__(type(self))
        for name, value in self._slot_state().items():
            setattr(new, name, value)
        return new

    def _slot_state(self) -> dict:
        """The slots as they are, for a copy or a pickle: refused once spent, and with the
        tag read from the batch's device tags (which stay here)."""
        # spent in place, its memory is the plaintext again: a copy would write it out
        self._check_alive()
        if self._tag is None and self._tags is not None:
            self._tag = self._tags.row(self._tag_row)
        state = {name: getattr(self, name) for name in self.__slots__ if hasattr(self, name)}
        state["_tags"] = None
        return state

    def _ciphertext_copy(self) -> tuple:
        """(a buffer of its own holding exactly an in-place result's ciphertext, whether it
        is a NumPy array to hand out as a torch tensor: see ``_adopt``)."""
        if self._place == HOST:
            # the source's framework, not the recorded one (which may have been edited)
            return _host_ciphertext(self).copy(), _framework_of(self._source) == "torch"
        view = self._ciphertext  # the source's byte view, on its device: its tag (read by
        # _slot_state) came back after the work writing it, so it is there to copy
        return fw.adapter_for(view).copy_bytes(view, self._place), False

    def __repr__(self) -> str:
        return (f"EncryptedTensor(framework={self.framework!r}, dtype={self.dtype!r}, "
                f"shape={self.shape}, algorithm={self.algorithm!r}, key_id={self.key_id!r}, "
                f"name={self.name!r}, on_device={self.on_device}, inplace={self.inplace})")

    # --- serialisation ---
    def to_bytes(self) -> bytes:
        """The documented, versioned byte layout (waits for the GPU if the data is there)."""
        self._check_alive()
        if self._place == HOST:
            ct = _host_ciphertext(self)
        else:
            gpu = get_backend("gpu")
            with gpu.device(self._place[1]):
                ct = gpu.to_host(gpu.as_device_bytes(self._ciphertext))
        return b"".join([self.metadata(), struct.pack("<Q", len(self.aad)), self.aad, self.nonce,
                         memoryview(np.ascontiguousarray(ct)).cast("B"), self.tag])

    @classmethod
    def from_bytes(cls, data: Any) -> "EncryptedTensor":
        """Parse :meth:`to_bytes` output. ``ValueError`` on anything malformed.

        The ciphertext is a zero-copy NumPy view of ``data`` (writable only when ``data``
        is, e.g. a ``bytearray``); decrypting it runs on the CPU unless ``device="gpu"``.
        """
        try:
            view = memoryview(data).cast("B")
        except TypeError:
            raise TypeError(f"data must be bytes-like, not {type(data).__name__}") from None
        fields, pos = _decode_metadata(view)
        if len(view) - pos < 8:
            raise ValueError("truncated: no aad length")
        (aad_len,) = struct.unpack_from("<Q", view, pos)
        pos += 8
        nonce_len = _NONCE_SIZE[fields["algorithm"]]
        need = aad_len + nonce_len + fields["nbytes"] + TAG_SIZE
        if len(view) - pos != need:
            raise ValueError(f"wrong length: {len(view) - pos} bytes after the metadata, "
                             f"{need} expected")
        aad = bytes(view[pos:pos + aad_len])
        pos += aad_len
        nonce = bytes(view[pos:pos + nonce_len])
        pos += nonce_len
        ct = np.frombuffer(view, dtype=np.uint8, count=fields["nbytes"], offset=pos)
        tag = bytes(view[pos + fields["nbytes"]:])
        return cls(aad=aad, nonce=nonce, ciphertext=ct, place=HOST, tag=tag, **fields)


def _host_ciphertext(enc: EncryptedTensor) -> np.ndarray:
    """A ``uint8`` NumPy view of a host ciphertext (see :func:`_host_ciphertext_view`)."""
    view = _host_ciphertext_view(enc)
    return view if isinstance(view, np.ndarray) else np.frombuffer(view, dtype=np.uint8)


def _host_ciphertext_view(enc: EncryptedTensor) -> Any:
    """A flat byte view of a host ciphertext, a memoryview or a ``uint8`` NumPy array
    (whichever is at hand). An in-place NumPy result is read from its source as it is
    now (writable or not: a view made earlier would keep the flag it had then), and an
    in-place torch result not viewed yet (see ``EncryptedTensor._ciphertext``) by
    address, while the source is still C-contiguous and of the ciphertext's length;
    otherwise the source's byte view is made, as its framework sees it now."""
    ct = enc._ct  # read once: another thread may make the array of it meanwhile
    if type(ct) is bytes:  # OpenSSL's sealed bytes (see EncryptedTensor._ciphertext)
        return memoryview(ct)[:-TAG_SIZE]
    src = enc._source
    # the source's own framework decides how it is read, not the recorded one: that may
    # have been edited (decryption then fails to verify; to_bytes writes what is there)
    if src is not None and src.nbytes == enc.nbytes:
        if isinstance(src, np.ndarray):
            if src.flags.c_contiguous:
                return _numpy_host_bytes(src)
        elif ct is None and _framework_of(src) == "torch" and src.is_cpu \
                and src.is_contiguous():
            return _torch_host_view(src, enc.nbytes)
    return _host_bytes_of(enc._ciphertext)


def _host_bytes_of(buffer: Any) -> np.ndarray:
    """A NumPy ``uint8`` view of a host ciphertext buffer (NumPy array or torch tensor)."""
    if isinstance(buffer, np.ndarray):
        return buffer
    _check_storage(buffer, buffer.nbytes)  # torch's .numpy() would not
    return fw.adapter_for(buffer).host_array(buffer)


# ============================================================================ host AEAD
# A tensor's own memory holds exactly the data, so host tensors use the CPU backend's
# detached-tag form (the tag kept apart; in place allowed; nothing unauthenticated is left
# behind: see gpucrypt.backends.cpu), in its one-pass form (``one_pass=True``): the
# threads running tensors do nothing else, so the cheapest form on one thread wins over
# one that keeps the GIL released throughout. That holds on the pool too: the GIL-free
# scratch forms for tensors sealed and opened side by side were measured against this one
# (300-tensor 1 GiB ChaCha20-Poly1305 state dict, in place, 2 threads, alternating rounds
# in one process) and were slower, 0.302 s against 0.280 s to encrypt: the scratch copy
# costs more memory traffic than the one-pass MAC's waits for the GIL.
def _host_context(algorithm: str, key: bytes, nonce: bytes):
    contexts = _CPU_CONTEXTS[0]
    if contexts is None or algorithm == "xchacha20-poly1305":  # XChaCha20: a subkey per nonce
        backend = get_backend("cpu")
        _CPU_CONTEXTS[0] = backend.contexts
        return backend.aead_for_nonce(algorithm, key, nonce)
    return contexts.get(algorithm, key), nonce  # the backend's aead(), without two calls


#: the CPU backend's per-key contexts (its ``aead``), once it has been asked for
_CPU_CONTEXTS: list = [None]


# Tensors up to ONE_SHOT_DETACHED_MAX take the form the CPU backend would pick for them,
# OpenSSL's one-shot AEAD through the thread's scratch buffer, asked for by name: through
# seal_detached/open_detached's choosing a 16 KiB seal took 4.1 us against 2.5 (a batch
# of 2048 such tensors), and a 4 KiB open 1.2 us more (one small tensor).
def _one_shot(nbytes: int, aad_len: int, threads: int) -> bool:
    """Whether the CPU backend would take OpenSSL's one-shot form for this message: small,
    on this thread alone, and associated data OpenSSL's one call takes."""
    return nbytes <= _cpu.ONE_SHOT_DETACHED_MAX and aad_len <= _cpu.OPENSSL_AEAD_MAX and \
        (threads < 2 or nbytes < _cpu.PARALLEL_MIN)


def _host_seal(algorithm: str, key: bytes, nonce: bytes, aad: bytes, src: Any, dst: Any,
               threads: int = 1, shared_gil: bool = False) -> bytes:
    """Encrypt ``src`` into ``dst`` (flat byte buffers; the same memory when in place);
    returns the tag. ``shared_gil``: other threads are sealing too (a pool worker), so
    the CPU backend prefers forms that keep the GIL released."""
    ctx, nonce = _host_context(algorithm, key, nonce)
    src, dst = memoryview(src), memoryview(dst)  # the backend's buffers are byte views
    if _one_shot(len(src), len(aad), threads):
        return ctx.seal_one_shot(nonce, src, aad, dst)
    return ctx.seal_detached(nonce, src, memoryview(aad), dst, threads=threads, one_pass=True,
                             shared_gil=shared_gil)


def _host_open(algorithm: str, key: bytes, nonce: bytes, aad: bytes, src: Any, tag: bytes,
               dst: Any, threads: int = 1, shared_gil: bool = False) -> bool:
    """Verify, then decrypt ``src`` into ``dst`` (flat byte buffers). False on a bad tag:
    then ``dst`` is zeroed or, when it is ``src``'s memory, given back exactly its
    ciphertext (the CPU backend either checks the tag before writing or, for one-pass
    and one-shot opens into ``dst``, restores it before it reports). ``shared_gil`` as
    for :func:`_host_seal`."""
    ctx, nonce = _host_context(algorithm, key, nonce)
    src, dst = memoryview(src), memoryview(dst)  # the backend's buffers are byte views
    try:
        if _one_shot(len(src), len(aad), threads):
            if len(tag) != TAG_SIZE:
                return False
            ctx.open_one_shot(nonce, src, tag, aad, dst, into_out=True)
        else:
            ctx.open_detached(nonce, src, tag, memoryview(aad), dst, threads=threads,
                              one_pass=True, shared_gil=shared_gil)
    except InvalidTag:
        return False
    return True


# ============================================================================ one small host tensor
# A single host tensor below _HOST_PARALLEL_BYTES runs on this thread alone, so the batch
# machinery (jobs, thread pool, output planning) is pure overhead for it, and at 4 KiB
# that overhead was 20-30 times the cipher. These two functions do what the batch path
# does for exactly that case, with the same checks, metadata, nonces and bytes, and
# hand every other case (GPU, streams, out=, copies, odd memory, errors to report) to
# it by returning None / _NOT_SMALL.
_NOT_SMALL = object()


def _host_tensor_parts(x: Any) -> tuple | None:
    """(framework, portable dtype name, shape, byte count) of a C-contiguous NumPy array
    or CPU torch tensor whose memory is its values; None for anything else (the
    adapters decide then). The same answers as the adapters', by shorter ways: for a
    batch of 16 KiB tensors the adapters' calls were a tenth of each tensor's time."""
    if type(x) is np.ndarray:
        if not x.flags.c_contiguous:
            return None
        return "numpy", fw.numpy_dtype_name(x.dtype), x.shape, x.nbytes
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(x, torch.Tensor) or not x.is_cpu:
        return None
    # the torch adapter's needs_copy, inline (a lazily conjugated/negated view's memory is
    # not its values)
    try:
        if not x.is_contiguous() or x.is_neg() or x.is_conj() or fw.memory_not_its_own(x):
            return None
        shape = tuple(x.shape)
    except (RuntimeError, NotImplementedError):  # sparse, nested and MKLDNN tensors have no
        return None  # strides, nested ones no shape: the adapter says what to do
    dtype = _TORCH_DTYPE_NAMES.get(x.dtype) or _remember_torch_dtype_name(x)
    return "torch", dtype, shape, x.nbytes


def _small_host_source(x: Any) -> tuple | None:
    """(framework, portable dtype name, shape, a flat byte ``memoryview`` of ``x``'s
    memory) for a tensor :func:`_host_tensor_parts` describes, under the size for one
    thread; None for anything else."""
    torch_tensor = _TORCH_TENSOR[0]
    if torch_tensor is None and "torch" in sys.modules:
        torch_tensor = _TORCH_TENSOR[0] = sys.modules["torch"].Tensor
    if type(x) is torch_tensor:
        # a plain torch.Tensor: the same answers as _host_tensor_parts and
        # _torch_host_bytes give, inline (their calls were a tenth of a 4 KiB call)
        try:
            if not x.is_cpu or not x.is_contiguous() or x.is_neg() or x.is_conj():
                return None
            shape = tuple(x.shape)
            address = x.data_ptr()
        except (RuntimeError, NotImplementedError):  # sparse, nested and MKLDNN tensors:
            return None  # the adapter says what to do
        nbytes = x.nbytes
        if nbytes >= _HOST_PARALLEL_BYTES:
            return None
        dtype = _TORCH_DTYPE_NAMES.get(x.dtype) or _remember_torch_dtype_name(x)
        if nbytes:  # _check_storage's test, without element_size() for the usual offset 0
            if not address:  # a zero tensor (fw.memory_not_its_own): the adapter refuses it
                return None
            offset = x.storage_offset()
            if x.untyped_storage().nbytes() < (offset * x.element_size() if offset else 0) + nbytes:
                _check_storage(x, nbytes)  # raises, saying why
        view = _TORCH_VIEWS.get((address, nbytes))
        return "torch", dtype, shape, view if view is not None else \
            _torch_host_bytes(x, nbytes, own=True)  # checked above
    parts = _host_tensor_parts(x)
    if parts is None or parts[3] >= _HOST_PARALLEL_BYTES:
        return None
    framework, dtype, shape, nbytes = parts
    if framework == "numpy":
        return framework, dtype, shape, _numpy_host_bytes(x)
    return framework, dtype, shape, _torch_host_bytes(x, nbytes)


def _numpy_host_bytes(x: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array: a cast of its buffer (a quarter of the cost of
    a ``uint8`` view), or that view for dtypes without a buffer format (datetime, ...)."""
    try:
        return memoryview(x).cast("B")
    except (TypeError, ValueError):
        return memoryview(x.reshape(-1).view(np.uint8))


def _torch_host_bytes(t: Any, nbytes: int | None = None, *, own: bool = False) -> memoryview:
    """The bytes of a contiguous CPU tensor, by address: ``.numpy()`` (and the
    ``.detach()`` it needs) costs 2-3 us, a third of OpenSSL's time for 4 KiB. The view
    does not keep ``t`` alive; the callers hold ``t`` for as long as they use it.

    Views are remembered by (address, length), up to _TORCH_VIEWS_MAX of them: a
    view is nothing but that pair, so a remembered one is exactly the view that would
    be made for any live tensor at that address (a freed one's address, taken again by
    a new tensor, included), and it is only ever used while such a tensor is held.
    Making one (a ctypes array at the address, then a cast) cost 0.4 us of a 4 KiB call."""
    if nbytes is None:
        nbytes = t.nbytes
    if not own:  # ``own``: a tensor whose storage was checked, or that this module has just made
        _check_storage(t, nbytes)
    where = (t.data_ptr(), nbytes)
    view = _TORCH_VIEWS.get(where)
    if view is not None:
        return view
    if nbytes == 0:
        return memoryview(bytearray())
    view = memoryview(_bytes_at(where[0], nbytes)).cast("B")
    if len(_TORCH_VIEWS) >= _TORCH_VIEWS_MAX:
        # start again: one clear() is atomic, where finding and deleting the oldest entry
        # could trip over another thread doing the same
        _TORCH_VIEWS.clear()
    _TORCH_VIEWS[where] = view
    return view


#: :func:`_check_storage`'s "the tensor is only read"
_NOT_WRITTEN = object()


def _torch_host_view(t: Any, nbytes: int, written_as: Any = _NOT_WRITTEN,
                     probes: list | None = None) -> memoryview:
    """A flat byte memoryview of a contiguous CPU tensor's memory, by address, as
    :func:`_torch_host_bytes` (a torch byte view, then ``.numpy()``, cost 2.3 us of a
    16 KiB tensor's 16 in a batch). Not remembered: a batch's many tensors would only
    push the single tensors' views out. ``written_as``: see :func:`_check_storage`."""
    _check_storage(t, nbytes, written_as, probes)
    return memoryview(_bytes_at(t.data_ptr(), nbytes)).cast("B")


def _check_storage(t: Any, nbytes: int, written_as: Any = _NOT_WRITTEN,
                   probes: list | None = None) -> None:
    """Refuse a tensor whose storage no longer holds it (``untyped_storage().resize_``
    to fewer bytes leaves the tensor's shape as it was): read by address, its bytes
    would reach past the allocation. torch's own views do not check this (0.15 us).
    Unless ``written_as`` is ``_NOT_WRITTEN``, also one that will be written and is
    read-only memory (:func:`_refuse_read_only_torch`; ``written_as``: its label), or,
    given ``probes``, one to probe with the others (:func:`_refuse_read_only_spans`)."""
    if not nbytes:
        return
    if fw.memory_not_its_own(t):  # the last wall before an address is read or written
        raise ValueError(fw.MEMORY_NOT_ITS_OWN)
    storage = t.untyped_storage()
    if storage.nbytes() < t.storage_offset() * t.element_size() + nbytes:
        raise ValueError("the tensor's storage is smaller than the tensor (resized underneath "
                         "it?): its memory cannot be read; make a fresh tensor (.clone()) first")
    if written_as is not _NOT_WRITTEN and not storage.resizable():
        if probes is not None:  # probed with the batch's others, before any is touched
            probes.append((t.data_ptr(), nbytes, t, written_as))
        elif not _memory_writable(t.data_ptr(), nbytes):
            _refuse_read_only_torch(t, nbytes, _what(written_as))


def _torch_extent(t: Any) -> int:
    """The bytes a strided torch tensor reaches in its storage from its first element:
    its byte count when it is contiguous, more when its strides skip elements, less when
    they repeat them (stride 0: an ``expand``), so :func:`_check_storage` of it holds for
    any layout (torch has no negative strides)."""
    if not t.numel():
        return 0
    return (1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))) * t.element_size()


def _bytes_at(address: int, nbytes: int) -> Any:
    """A ctypes byte array over ``nbytes`` at ``address`` (the caller keeps the memory's
    owner alive while it is used)."""
    array_type = _BYTE_ARRAYS.get(nbytes)
    if array_type is None:
        array_type = ctypes.c_ubyte * nbytes
        if len(_BYTE_ARRAYS) < 256:
            _BYTE_ARRAYS[nbytes] = array_type
    return array_type.from_address(address)


# torch has no read-only flag: a tensor over memory that must not be written (a read-only
# file mapping, np.memmap mode "r", under torch.from_numpy or a safetensors-style loader)
# is written like any other, and the write kills the process (SIGSEGV). Before a torch
# tensor's host memory is written in place or as out=, that memory is probed: storages of
# torch's own allocator (resizable ones) are writable; for the others (memory torch was
# handed: from_numpy, frombuffer, from_file, NumPy-made results) the first and last bytes
# are written onto themselves by process_vm_writev, which refuses (EFAULT) a page mapped
# read-only. One storage is one allocation, so a mapping made read-only in part only is not
# seen; nor is memory that is writable though its owner says it must not be (a ``bytes``
# object under torch.frombuffer, a NumPy array flagged read-only under torch.from_numpy:
# torch warns about both when it makes the tensor). The call costs 4-5 us here (a
# syscall), so it is made on in-place and out= writes only, and never for torch's own
# storages (0.35 us to ask).
#: process_vm_writev, once looked up (False where this libc has none)
_VM_WRITEV: list = [None]


def _vm_writev() -> Any:
    writev = _VM_WRITEV[0]
    if writev is None:
        try:
            writev = ctypes.CDLL(None, use_errno=True).process_vm_writev
            writev.restype = ctypes.c_ssize_t
            writev.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p,
                               ctypes.c_ulong, ctypes.c_ulong]
        except (OSError, AttributeError):  # not Linux
            writev = False
        _VM_WRITEV[0] = writev
    return writev


def _memory_writable(address: int, nbytes: int) -> bool:
    """Whether the first and last of ``nbytes`` bytes at ``address`` can be written (see
    above); True where this system cannot tell (no such call, or a sandbox refusing it)."""
    return _first_read_only([(address, nbytes)]) < 0


def _first_read_only(spans: list) -> int:
    """The index of the first ``(address, nbytes, ...)`` span of ``spans`` whose first or
    last byte cannot be written, else -1 (also where this system cannot tell). One
    syscall per 512 spans: one each cost a 16 KiB tensor a quarter of its time (storage
    that NumPy ever saw, through ``.numpy()``, is never resizable again, so most tensors
    of a real state dict are probed). Each byte is read and written back where it is (its
    own value, while the caller is about to overwrite it anyway); the call stops at the
    first iovec it cannot write, and transfers whole iovecs only, so the count written
    says which span failed."""
    writev = _vm_writev()
    if not writev:
        return -1
    pid = os.getpid()
    for first in range(0, len(spans), 512):
        chunk = [i for i in range(first, min(first + 512, len(spans))) if spans[i][1]]
        if not chunk:
            continue
        # iovecs as (base, length) machine words, made by NumPy: a ctypes array built from
        # Python ints cost 1 us a span
        iov = np.ones((len(chunk), 4), dtype=np.uintp)
        iov[:, 0] = [spans[i][0] for i in chunk]
        iov[:, 2] = iov[:, 0] + np.array([spans[i][1] - 1 for i in chunk], dtype=np.uintp)
        count = 2 * len(chunk)
        written = writev(pid, iov.ctypes.data, count, iov.ctypes.data, count, 0)
        if written == count:
            continue
        if written < 0 and ctypes.get_errno() != errno.EFAULT:
            return -1  # the system will not tell (EPERM, ENOSYS)
        return chunk[max(written, 0) // 2]  # -1 (EFAULT): the first byte of the first
    return -1


def _what(label: Any, name: Any = None) -> str:
    """How errors name an entry: by its label (or recorded name), else "the tensor"."""
    shown = label if label is not None else name
    return "the tensor" if shown is None else f"tensor {shown!r}"


def _refuse_read_only_torch(t: Any, nbytes: int, what: str) -> None:
    """``ValueError`` for a CPU torch tensor whose memory is mapped read-only (see
    above), before it is written in place or as out= (``what`` says which)."""
    if nbytes and not t.untyped_storage().resizable() and \
            not _memory_writable(t.data_ptr(), nbytes):
        raise ValueError(f"{what} is read-only memory (a file mapped read-only, such as "
                         f"np.memmap mode 'r' under torch.from_numpy), which torch does not "
                         f"flag: it cannot be written; make a writable copy (.clone())")


def _refuse_read_only_spans(probes: list, name: Any = None) -> None:
    """:func:`_refuse_read_only_torch` for the ``(address, nbytes, tensor, label)`` spans
    a batch put aside, probed together (:func:`_first_read_only`)."""
    bad = _first_read_only(probes) if probes else -1
    if bad >= 0:
        _, nbytes, t, label = probes[bad]
        _refuse_read_only_torch(t, nbytes, _what(label, name))


def _torch_writable(t: Any, nbytes: int) -> bool:
    """:func:`_refuse_read_only_torch`'s answer, as a bool (for the one-tensor paths,
    which leave the general path to say what is wrong)."""
    return not nbytes or t.untyped_storage().resizable() or _memory_writable(t.data_ptr(), nbytes)


#: torch.autograd.graph.increment_version (torch >= 2.1), once looked up
_INCREMENT_VERSION: list = [None]


def _bump_torch_version(t: Any) -> None:
    """Tell autograd that torch tensor ``t`` (or each of a list of them, in one call: a
    batch's per-tensor calls woke the garbage collector), and every view of its memory,
    was written in place, as torch's own in-place ops do: a backward pass that saved its
    old values then raises instead of computing gradients from ciphertext (or plaintext
    it never saw). Inference tensors have no version counter; torch skips them."""
    if type(t) is list and not t:
        return
    bump = _INCREMENT_VERSION[0]
    if bump is None:
        torch = sys.modules["torch"]
        bump = getattr(getattr(torch.autograd, "graph", None), "increment_version", None) \
            or torch._C._increment_version
        _INCREMENT_VERSION[0] = bump
    bump(t)


#: NumPy dtypes by portable name, for results (``numpy_dtype`` parses the name each time)
_NUMPY_DTYPES: dict[str, np.dtype] = {}

#: what frameworks raise for a result they cannot make (a dtype this torch or NumPy lacks,
#: a dimension over its limit): decrypted into plain bytes all the same, so that altered
#: metadata reads as InvalidTag and only an authentic tensor reports it
_CANNOT_ALLOCATE = (ValueError, TypeError, AttributeError, OverflowError, RuntimeError)


def _out_of_memory(exc: BaseException) -> bool:
    """torch's OutOfMemoryError (a RuntimeError): a memory shortage to report as it is, not
    a tensor this process cannot make."""
    return type(exc).__name__ == "OutOfMemoryError"

#: an empty CPU tensor of each torch dtype met, to make results like (``new_empty``)
_TORCH_CPU_EMPTY: dict = {}

#: ctypes array types by length (making one costs as much as the view itself)
_BYTE_ARRAYS: dict[int, Any] = {}

#: torch.Tensor, once torch has been imported
_TORCH_TENSOR: list = [None]

#: byte views of torch tensors' memory by (address, length)
_TORCH_VIEWS: dict[tuple[int, int], memoryview] = {}
_TORCH_VIEWS_MAX = 64


def _encrypt_small_on_host(x: Any, key: Any, algorithm: str, aad: Any, inplace: bool,
                           nonces: Any, key_id: Any, name: Any) -> EncryptedTensor | None:
    """:func:`encrypt_tensor` of one small host tensor, or None for the general path."""
    source = _small_host_source(x)
    if source is None:
        return None
    framework, dtype, shape, src = source
    if inplace and (src.readonly or framework == "torch" and not _torch_writable(x, len(src))):
        return None  # the general path says what is wrong
    algorithm, key = _algorithm_and_key(algorithm, key)
    if aad is None and key_id is None and name is None:  # the common call: 3 checks less
        user_aad = b""
    else:
        user_aad, key_id, name = _aad_bytes(aad), _check_key_id(key_id), _check_name(name)
    nbytes = len(src)
    aad_all = _metadata(algorithm, framework, dtype, shape, nbytes, key_id, name) + user_aad
    if len(aad_all) > _cpu.OPENSSL_AEAD_MAX:
        return None  # more than OpenSSL's one call takes: the general path composes it
    nonce = os.urandom(_NONCE_SIZE[algorithm]) if nonces is None else \
        _nonces_for(1, algorithm, nonces)[0]
    if inplace:
        if framework == "torch":
            _bump_torch_version(x)
        tag = _host_seal(algorithm, key, nonce, aad_all, src, src)
        ct_obj = None  # x's byte view, made if asked for (EncryptedTensor._ciphertext)
    else:
        ctx, ctx_nonce = _host_context(algorithm, key, nonce)
        if nbytes <= _cpu.ONE_SHOT_DETACHED_MAX:
            # ciphertext || tag as OpenSSL's one-shot call returns it, kept as they are
            # (EncryptedTensor._ciphertext)
            ct_obj = ctx.openssl.encrypt(ctx_nonce, src, aad_all)
            tag = ct_obj[nbytes:]
        else:  # larger, new bytes cost more than an array (4 MiB: 1.5 ms against 1.3)
            out = np.empty(nbytes + TAG_SIZE, dtype=np.uint8)
            ctx.openssl.encrypt_into(ctx_nonce, src, aad_all, out)
            ct_obj, tag = out[:nbytes], out[nbytes:].tobytes()  # torch: adopted when asked for
    return EncryptedTensor._host(framework, dtype, shape, nbytes, algorithm, key_id, name,
                                 user_aad, nonce, ct_obj, tag, x if inplace else None)


def _decrypt_small_on_host(enc: Any, key: Any, inplace: bool | None) -> Any:
    """:func:`decrypt_tensor` of one small host ciphertext into a new NumPy/torch tensor
    or back into the tensor it was encrypted from, or _NOT_SMALL for the general path."""
    if type(enc) is not EncryptedTensor:
        return _NOT_SMALL
    # Edited fields (recorded fields are public attributes) go to the general path, which
    # fails them as InvalidTag: the try costs nothing until something raises
    try:
        if enc._place != HOST or enc.nbytes >= _HOST_PARALLEL_BYTES \
                or enc.framework not in ("numpy", "torch"):
            return _NOT_SMALL
    except (TypeError, ValueError):  # a byte count that is no number
        return _NOT_SMALL
    enc._check_alive()
    try:  # a wrong size for an edited algorithm: the general path says which it is
        key = _key_bytes(key, enc.algorithm)
    except ValueError:
        return _NOT_SMALL
    try:  # metadata an edit made unencodable (a negative dimension, a name that is no str)
        aad = enc.associated_data()
        nonce = enc.nonce  # one an edit made the cipher's ValueError: failed there, InvalidTag
        if type(nonce) is not bytes or len(nonce) != _NONCE_SIZE[enc.algorithm] \
                or type(enc.aad) is not bytes:
            return _NOT_SMALL
    except _UNENCODABLE:
        return _NOT_SMALL
    in_place = _decides_inplace(enc, None, inplace)
    sealed = enc._ct
    if type(sealed) is bytes and not in_place:
        return _open_sealed_on_host(enc, key, sealed, aad)
    # in place, the source as it is now (a view made earlier keeps the flags of its time)
    src = _small_host_bytes(enc._ct if enc._source is None else enc._source)
    if src is None or len(src) != enc.nbytes:  # the general path says what is wrong
        return _NOT_SMALL
    if in_place:
        source = enc._source
        if source is None or src.readonly:
            return _NOT_SMALL
        if type(source) is not np.ndarray:  # a CPU torch tensor (_small_host_bytes)
            if not _torch_writable(source, len(src)):
                return _NOT_SMALL
            _bump_torch_version(source)
        if not _host_open(enc.algorithm, key, enc.nonce, aad, src, enc.tag, src):
            _raise_one_failed(enc)
        enc._consumed[0] = True
        return source
    result, dst = _small_host_result(enc)
    if dst is None:
        return _NOT_SMALL
    if not _host_open(enc.algorithm, key, enc.nonce, aad, src, enc.tag, dst):
        _raise_one_failed(enc)
    return result


def _open_sealed_on_host(enc: EncryptedTensor, key: bytes, sealed: bytes, aad: bytes) -> Any:
    """Decrypt a result that still holds the bytes OpenSSL sealed (``sealed``, its
    ``ciphertext || tag``, see ``EncryptedTensor._ciphertext``): one call of OpenSSL's
    one-shot open straight into the new tensor, which is zeroed and dropped if the tag
    is wrong. Those bytes cannot change; the metadata can have been edited since, but the
    associated data is made from it now, so such edits fail to verify. Anything else out
    of the ordinary (the tag kept beside them replaced, lengths that no longer agree)
    goes to the general path, which reads the tag and ciphertext apart and says what is
    wrong. ``aad``: ``enc.associated_data()``."""
    if len(sealed) - TAG_SIZE != enc.nbytes or len(aad) > _cpu.OPENSSL_AEAD_MAX \
            or len(enc._tag) != TAG_SIZE or sealed[-TAG_SIZE:] != enc._tag:  # no secret: == is fine
        return _NOT_SMALL
    result, dst = _small_host_result(enc)
    if dst is None:
        return _NOT_SMALL
    ctx, nonce = _host_context(enc.algorithm, key, enc.nonce)
    try:
        ctx.openssl.decrypt_into(nonce, sealed, aad, dst)
    except InvalidTag:
        zero(dst)  # OpenSSL wrote the unauthenticated plaintext there
    else:
        return result
    _raise_one_failed(enc)


def _small_host_result(enc: EncryptedTensor) -> tuple:
    """(a new tensor of ``enc``'s framework, dtype and shape on the host, a flat byte
    ``memoryview`` of its memory), or (None, None) when this process cannot make one
    here (the general path then decrypts and says why)."""
    if enc.framework == "numpy":
        dtype = _NUMPY_DTYPES.get(enc.dtype)
        if dtype is None:
            try:
                dtype = fw.numpy_dtype(enc.dtype)
            except ValueError:
                return None, None
            if len(_NUMPY_DTYPES) < 256:
                _NUMPY_DTYPES[enc.dtype] = dtype
        try:
            # an edited shape (or dtype) is not allocated: it may ask for terabytes, and
            # the general path reports it (InvalidTag)
            if math.prod(enc.shape) * dtype.itemsize != enc.nbytes:
                return None, None
            result = np.empty(enc.shape, dtype=dtype)
        except _CANNOT_ALLOCATE as exc:
            if _out_of_memory(exc):
                raise
            return None, None
        return result, _numpy_host_bytes(result)
    torch = sys.modules.get("torch")
    dtype = getattr(torch, enc.dtype, None)
    if torch is None or not isinstance(dtype, torch.dtype):
        return None, None
    # a new tensor like a CPU one of this dtype: torch.empty would follow
    # torch.set_default_device (a 'meta' or CUDA tensor, whose address this module would
    # then write as host memory), and costs 0.3 us more; sizes as separate ints: torch
    # parses a tuple argument 0.4 us slower
    like = _TORCH_CPU_EMPTY.get(dtype)
    if like is None:
        like = _TORCH_CPU_EMPTY[dtype] = torch.empty(0, dtype=dtype, device="cpu")
    try:
        if math.prod(enc.shape) * dtype.itemsize != enc.nbytes:  # as for NumPy, above
            return None, None
        result = like.new_empty(*enc.shape) if enc.shape else like.new_empty(())
    except _CANNOT_ALLOCATE as exc:
        if _out_of_memory(exc):
            raise
        return None, None
    return result, _torch_host_bytes(result, own=True)


def _small_host_bytes(buffer: Any) -> memoryview | None:
    """A byte view of a host ciphertext held in a contiguous NumPy array or CPU torch
    tensor; None for anything else (the general path takes it)."""
    if type(buffer) is np.ndarray:
        return _numpy_host_bytes(buffer) if buffer.flags.c_contiguous else None
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(buffer, torch.Tensor) and buffer.is_cpu \
            and buffer.is_contiguous():
        return _torch_host_bytes(buffer)
    return None


#: what a failed tag means, said after the failing tensors' names
_FAILED_TAG = ("a wrong key, or the ciphertext, tag or recorded metadata changed since "
               "encryption")


def _described(name: Any) -> str:
    return "an unnamed tensor" if name is None else repr(name)


def _key_ids(encs) -> str:
    """The key ids the failed tensors record (not authentic yet: a hint at the key meant)."""
    ids = sorted({repr(e.key_id) for e in encs if e.key_id is not None})
    return f"; encrypted under key id {', '.join(ids)}" if ids else ""


def _raise_one_failed(enc: EncryptedTensor) -> None:
    exc = InvalidTag(f"authentication failed for 1 of 1 tensor(s): {_described(enc.name)} "
                     f"({_FAILED_TAG}{_key_ids([enc])})")
    exc.failed = [None]
    raise exc


#: portable names of the torch dtypes seen so far (NumPy's are remembered by
#: ``_frameworks.numpy_dtype_name`` itself)
_TORCH_DTYPE_NAMES: dict = {}


def _remember_torch_dtype_name(x: Any) -> str:
    name = fw.BY_NAME["torch"].dtype_name(x)  # ValueError for dtypes without a byte layout
    if len(_TORCH_DTYPE_NAMES) < 256:
        _TORCH_DTYPE_NAMES[x.dtype] = name
    return name


# ============================================================================ encryption
class _Job:
    """One tensor of a batch on its way through encryption or decryption. Made with the
    four fields every job has, positionally; the others are set where they are known
    (keyword arguments cost 0.4 us more per tensor of a batch of 16 KiB tensors)."""

    __slots__ = ("label", "adapter", "place", "x", "view", "dst_obj", "dst_view", "enc", "result",
                 "nonce", "aad", "host_src", "inplace", "error", "address")

    def __init__(self, label, enc, place, aad):
        self.label, self.enc, self.place, self.aad = label, enc, place, aad
        self.adapter = self.x = self.view = self.dst_obj = self.dst_view = self.result = None
        self.nonce = self.host_src = self.inplace = self.error = self.address = None


def _encrypt_jobs(items: list[tuple[str | None, Any]], key: Any, *, algorithm: str, aad: Any,
                  inplace: bool, stream: Any, nonces: Any, contiguous: bool, key_id: Any,
                  device: Any) -> list[EncryptedTensor]:
    algorithm, key = _algorithm_and_key(algorithm, key)
    user_aad = _aad_bytes(aad)
    key_id = _check_key_id(key_id)
    device = _check_device(device)
    jobs = []
    probes: list = []  # in-place torch tensors whose memory may be read-only: probed together
    for label, x in items:
        parts = _host_tensor_parts(x) if device != "gpu" else None
        if parts is not None:  # a host array or tensor as it is: the adapters' checks pass
            jobs.append(_host_encrypt_job(label, x, parts, algorithm, user_aad, key_id, inplace,
                                          probes))
            continue
        try:
            adapter = fw.adapter_for(x)
        except TypeError as exc:
            if label is None:
                raise
            raise _not_a_tensor(label, x, exc) from None
        place = adapter.place(x)
        if device == "cpu" and place != HOST:
            raise ValueError("device='cpu' was asked for a tensor on the GPU; move it to the "
                             "host first, or leave device unset")
        if inplace and not adapter.mutable:
            raise ValueError(f"{adapter.name} arrays are immutable: inplace=True is not "
                             f"possible (leave it False: the ciphertext goes to a new buffer)")
        if place == HOST and adapter.name == "torch":
            # this route reads (and in place writes) a host tensor through torch's own copy
            # and views (contiguous=True, device="gpu"), which do not check that its storage
            # still holds it: refused as the by-address route refuses it, before either
            _check_storage(x, _torch_extent(x))
        if adapter.needs_copy(x):
            if inplace:  # before contiguous=True is offered, which would not do here
                raise ValueError("inplace=True needs a C-contiguous tensor (a copy would not be "
                                 "the tensor's own memory): make the tensor contiguous first, "
                                 "or leave inplace False (and pass contiguous=True)")
            if not contiguous:
                raise ValueError("the tensor is not C-contiguous (or is a lazily conjugated/"
                                 "negated view): pass contiguous=True to encrypt a contiguous copy")
            x = adapter.contiguous_copy(x)
        dtype, shape = adapter.dtype_name(x), adapter.shape(x)
        nbytes = math.prod(shape) * fw.dtype_itemsize(dtype)
        view = adapter.byte_view(x)
        host = memoryview(adapter.host_array(view)) if place == HOST else None
        if inplace and host is not None and host.readonly:
            raise ValueError("inplace=True needs a writable tensor")  # before any is touched
        if inplace and host is not None and adapter.name == "torch":
            _refuse_read_only_torch(view, nbytes, _what(label))
        _limits.check_length("tensor", nbytes, _MAX_DATA[algorithm], algorithm)
        name = _check_name(label)
        meta = _metadata(algorithm, adapter.name, dtype, shape, nbytes, key_id, name)
        enc = EncryptedTensor(framework=adapter.name, dtype=dtype, shape=shape, nbytes=nbytes,
                              algorithm=algorithm, key_id=key_id, name=name, aad=user_aad,
                              nonce=b"", ciphertext=None, place=place,
                              source=x if inplace else None, home=adapter.home(x))
        job = _Job(label, enc, place, meta + user_aad)
        job.adapter, job.x, job.view, job.host_src = adapter, x, view, host
        jobs.append(job)
    if inplace:
        _refuse_read_only_spans(probes)
        _refuse_shared_memory(jobs)
    on_gpu = [j for j in jobs if j.place != HOST or device == "gpu"]
    on_host = [j for j in jobs if j.place == HOST and device != "gpu"]
    # Everything the GPU half can refuse (tensors on several devices, a stream of another
    # device or of no known kind) or fail to allocate (its outputs) is done before any
    # host tensor is encrypted, and before the nonces are drawn (a sequence's counter,
    # a TensorCipher's count): in place, a host tensor sealed before such an error would
    # be left holding ciphertext whose nonce and tag were never returned.
    launch_gpu = _prepare_gpu_seal(on_gpu, algorithm, key, inplace, stream) if on_gpu else None
    for job, nonce in zip(jobs, _nonces_for(len(jobs), algorithm, nonces)):
        job.enc.nonce = job.nonce = nonce
    if inplace:  # nothing is refused from here on: autograd learns of the writes
        _bump_torch_version([job.x for job in jobs if job.adapter.name == "torch"])
    try:
        _run_host_jobs(on_host, lambda job, threads, shared_gil: _encrypt_on_host(
            job, algorithm, key, inplace, threads, shared_gil))
        if launch_gpu is not None:
            launch_gpu()
    except BaseException as exc:  # noqa: B036 (an interrupt too: the tensors come back first)
        if inplace:  # a Ctrl-C meanwhile waits: every tensor back first
            uninterrupted(_take_back_sealed, on_host, algorithm, key, exc)
        raise
    return [j.enc for j in jobs]


def _take_back_sealed(jobs: list[_Job], algorithm: str, key: bytes, exc: BaseException) -> None:
    """An in-place batch that raises part way (a later tensor's error, the GPU half's, an
    interrupt) hands no results back, so the host tensors it had already encrypted in
    place are decrypted back with the nonce and tag it holds (a few cipher passes on a
    path that is failing anyway): the caller finds them as they were. One that cannot be
    taken back (its own decrypt interrupted; the CPU backend then leaves its ciphertext
    whole) stays encrypted, and its :class:`EncryptedTensor` is attached to ``exc`` as
    ``exc.encrypted`` (label -> result), so that no tensor is left encrypted without its
    nonce and tag. A tensor whose own seal was cut short has no tag and is not here.
    """
    sealed = [j for j in jobs if j.enc._tag is not None]  # set once its seal returned
    stuck = {}
    for i, job in enumerate(sealed):
        try:
            ok = _host_open(algorithm, key, job.nonce, job.aad, job.host_src, job.enc._tag,
                            job.host_src)
        except BaseException:  # noqa: B036 (an interrupt here: hand back what is left)
            ok = False
        if not ok:  # not restored: this one (its ciphertext whole) and, stopped, the rest
            stuck.update((j.label, j.enc) for j in sealed[i:])
            break
    if stuck:
        exc.encrypted = stuck
    if sealed:
        exc.add_note(f"(gpucrypt: {len(sealed) - len(stuck)} tensor(s) already encrypted in place "
                     f"were decrypted back" + (f"; {sorted(map(str, stuck))} could not be and "
                                               f"are in exc.encrypted)" if stuck else ")"))


def _host_encrypt_job(label: Any, x: Any, parts: tuple, algorithm: str, user_aad: bytes,
                      key_id: Any, inplace: bool, probes: list | None = None) -> _Job:
    """The job of a host tensor that :func:`_host_tensor_parts` describes: its bytes as a
    memoryview (a torch tensor's read by address, whose address the shared-memory check
    reuses), its result made positionally, its ciphertext view made only if asked for
    (``EncryptedTensor._ciphertext``). The adapters' route cost 5 us of a 16 KiB
    tensor's 11.6 in a batch of 2048."""
    framework, dtype, shape, nbytes = parts
    if framework == "torch":
        # in place: refused before any is touched if read-only (one storage object for both
        # checks: a batch's per-tensor objects wake the garbage collector)
        host = _torch_host_view(x, nbytes, label if inplace else _NOT_WRITTEN, probes)
        address = x.data_ptr()
    else:
        address, host = None, _numpy_host_bytes(x)
        if inplace and host.readonly:
            raise ValueError("inplace=True needs a writable tensor")  # before any is touched
    _limits.check_length("tensor", nbytes, _MAX_DATA[algorithm], algorithm)
    name = _check_name(label)
    meta = _metadata(algorithm, framework, dtype, shape, nbytes, key_id, name)
    enc = EncryptedTensor._host(framework, dtype, shape, nbytes, algorithm, key_id, name,
                                user_aad, b"", None, None, x if inplace else None)
    job = _Job(label, enc, HOST, meta + user_aad)
    job.adapter, job.x, job.host_src, job.address = fw.BY_NAME[framework], x, host, address
    return job


def _refuse_shared_memory(jobs: list[_Job]) -> None:
    """In place, two entries on the same memory (a state dict's tied weights) would be
    encrypted twice, concurrently even, leaving bytes neither entry decrypts: refuse
    before anything is touched."""
    spans = []
    for job in jobs:
        address = job.address  # known for host tensors read by address
        if address is None:
            address = fw.memory_address(job.view if job.view is not None else job.x)
        if address is not None and job.enc.nbytes:
            spans.append((job.place, address, address + job.enc.nbytes, job.label))
    spans.sort(key=lambda s: (str(s[0]), s[1]))
    for a, b in zip(spans, spans[1:]):
        if a[0] == b[0] and b[1] < a[2]:
            raise ValueError(f"tensors {a[3]!r} and {b[3]!r} share memory (tied weights?): "
                             f"in place, encrypt each memory once (leave one of them out of "
                             f"the batch), or pass inplace=False")


#: Host tensors at least this large (per algorithm) go to worker threads; smaller ones run
#: on the calling thread. Below it a tensor's Python work (holding the GIL) outweighs
#: OpenSSL's (which releases it), and threads only fight over the GIL. Measured on 2 cores,
#: 32 MiB state dicts in place, one thread against two (encrypt/decrypt, ms): 16 KiB tensors
#: AES-GCM 59/56 against 121/89, ChaCha20-Poly1305 78/71 against 73/111; 256 KiB AES-GCM
#: 13/15 against 15/15, ChaCha20-Poly1305 23/24 against 19/20; 1 MiB AES-GCM 10/10 against
#: 7.2/7.7, ChaCha20-Poly1305 19/19 against 12/12.
_POOLED_TENSOR_BYTES = {"aes-gcm": 1 << 20}
_POOLED_TENSOR_BYTES_DEFAULT = 256 << 10


def _run_host_jobs(jobs: list[_Job], work) -> list:
    """``[work(job, threads, shared_gil) for job in jobs]``; a batch of at least
    ``_HOST_PARALLEL_BYTES`` runs on the usable cores (``cryptography`` releases the GIL),
    and a single large tensor gets them all inside its one message (``threads``).

    Several tensors on several threads: the tensors of at least ``_POOLED_TENSOR_BYTES``
    go to one shared queue, largest first, which ``cores - 1`` workers take from while
    this thread runs the small ones (largest first), then takes from the queue too.
    Taking a tensor is one ``deque.popleft``, atomic under the GIL, with no hand-off per
    tensor. A batch with no tensor for the workers runs on this thread alone, in order.
    On the pool, when one tensor raises, the queue is emptied, the others finish the
    tensor they hold, and the first error is raised with a note naming its tensor; an
    interrupt is raised once every worker has stopped.
    The workers run their tensors with ``shared_gil=True`` (forms that keep the GIL
    released, where the fastest form on a thread of its own holds it for a part of the
    work); this thread keeps the fastest form, so that it never waits on itself."""
    from ..backends.cpu import usable_cores

    total = sum(j.enc.nbytes for j in jobs)
    cores = usable_cores() if total >= _HOST_PARALLEL_BYTES else 1
    if len(jobs) == 1:
        return [work(jobs[0], cores, False)]
    pooled = [cores > 1 and j.enc.nbytes >= _POOLED_TENSOR_BYTES.get(
        j.enc.algorithm, _POOLED_TENSOR_BYTES_DEFAULT) for j in jobs]
    if not any(pooled):  # one core, or no tensor worth a thread: no hand-off, no pool, no sort
        return [work(j, 1, False) for j in jobs]
    from collections import deque

    order = sorted(range(len(jobs)), key=lambda i: -jobs[i].enc.nbytes)
    queue = deque(i for i in order if pooled[i])
    own = [i for i in order if not pooled[i]]
    workers = min(len(queue), cores - 1)
    results: list = [None] * len(jobs)
    errors: list = []

    def run_one(i: int, shared_gil: bool = False) -> bool:
        try:
            results[i] = work(jobs[i], 1, shared_gil)
            return True
        except BaseException as exc:
            queue.clear()
            exc.add_note(f"(gpucrypt: while processing tensor {jobs[i].label!r})")
            errors.append(exc)
            return False

    def take_and_run(shared_gil: bool = False) -> None:
        while True:
            try:
                i = queue.popleft()
            except IndexError:
                return
            if not run_one(i, shared_gil):
                return

    pool = pipeline.ThreadPoolExecutor(workers)
    futures: list = []
    try:
        # submitted inside: submit waits for the thread it starts, and an interrupt there
        # must still stop (and wait for) the workers already taking tensors. Not inside
        # submit, though: there it could leave a thread running that no future names,
        # still sealing a tensor after the caller had its exception
        for _ in range(workers):
            with held_interrupts():
                futures.append(pool.submit(take_and_run, True))
        for i in own:
            if errors or not run_one(i):
                break
        if not errors:
            take_and_run()
    except BaseException as exc:  # an interrupt between tensors: raised once the workers stop
        queue.clear()
        errors.insert(0, exc)
    for future in futures:  # every worker stops before the caller may free its buffers
        while not future.done():
            try:
                future.exception()
            except BaseException as exc:  # an interrupt while waiting: raised once they stop
                queue.clear()
                errors.insert(0, exc)
    pool.shutdown()
    if errors:
        raise errors[0]
    return results


def _encrypt_on_host(job: _Job, algorithm: str, key: bytes, inplace: bool, threads: int,
                     shared_gil: bool = False) -> None:
    src = job.host_src  # a flat byte memoryview, writable when in place (planning checked)
    enc = job.enc
    if inplace:
        ct_obj, dst = job.view, src  # None where the planning made no view: made if asked for
    elif enc._adopt:  # a torch result kept as NumPy until asked for (EncryptedTensor._host)
        ct_obj = dst = np.empty(len(src), dtype=np.uint8)
    else:
        ct_obj = job.adapter.empty_bytes(len(src), HOST)
        dst = job.adapter.host_array(ct_obj)
    enc._tag = _host_seal(algorithm, key, job.nonce, job.aad, src, dst, threads, shared_gil)
    enc._ct = ct_obj


def _single_place(places: Iterable[Any]):
    """The one GPU among ``places`` (None if all are on the host); ``ValueError`` for several."""
    devices = {p for p in places if p != HOST}
    if len(devices) > 1:
        raise ValueError(f"tensors on several GPUs ({sorted(p[1] for p in devices)}) in one "
                         f"batch: make one call per device")
    return devices.pop() if devices else None


def _launch_stream(stream: Any, place, frameworks: Iterable[str]) -> Any:
    """The caller's ``stream``, else the current stream (on ``place``) of the first of
    ``frameworks`` (those of the batch's device tensors); None: the backend's default.
    The GPU backend takes torch, CuPy and numba streams and raw handles alike. A stream
    of another device than the tensors' is refused."""
    if stream is None and place is not None:
        return fw.BY_NAME[next(iter(frameworks))].current_stream(place)
    index = fw.stream_device(stream)
    if index is not None and place is not None and index != place[1]:
        raise ValueError(f"stream= is a stream of cuda:{index} and the tensors are on "
                         f"cuda:{place[1]}: give a stream of their device (or none)")
    return stream


def _order_inputs(gpu, stream: Any, launch: Any, place, inputs: list) -> None:
    """With a caller-given ``stream``, the inputs were made on their framework's current
    stream, which ``launch`` is not ordered with: it waits for that stream on the device
    (an event, no host wait), and where the framework's allocator tracks streams
    (torch's ``record_stream``) each input is marked as used on ``launch``, so that its
    memory is not handed out again before the work queued there is done.
    ``inputs``: (adapter, device tensor) pairs."""
    if stream is None or place is None or not inputs:
        return
    gpu.wait_for(launch, inputs[0][0].current_stream(place))
    for adapter, x in inputs:
        adapter.record_stream(x, launch, place)


def _device_index(place) -> int | None:
    return None if place is None else place[1]


def _prepare_gpu_seal(jobs: list[_Job], algorithm: str, key: bytes, inplace: bool,
                     stream: Any):
    """One pipeline batch, one ``seal_batch`` launch for every job, in the tensors'
    device's context: host tensors are staged and uploaded together on the launch
    stream (and their ciphertext comes back), device tensors sealed where they are into
    outputs allocated for a caller-given stream (which first waits for the stream the
    inputs were made on); device tensors' tags stay on the device until asked for.

    Prepared here, the launch left to the function returned: everything that can be
    refused or fail to allocate (several devices, a stream of another device or of no
    known kind, the outputs) is, before any tensor is written. A host tensor staged for
    the GPU gets its ciphertext only when the batch comes back."""
    gpu = get_backend("gpu")
    place = _single_place(j.place for j in jobs)
    with gpu.device(_device_index(place)):
        launch = _launch_stream(stream, place, (j.adapter.name for j in jobs if j.place == place))
        if stream is not None:  # resolves it (TypeError for an object that is none), queues nothing
            gpu.wait_for(launch, launch)
        _order_inputs(gpu, stream, launch, place,
                      [(j.adapter, j.view) for j in jobs if j.place != HOST])
        spans = []
        for job in jobs:
            if job.place == HOST:   # host tensor sealed on the GPU: staged, and back
                job.host_src = src = job.adapter.host_array(job.view)
                if inplace and not src.flags.writeable:
                    raise ValueError("inplace=True needs a writable tensor")
                dst = src if inplace else np.empty(job.enc.nbytes, dtype=np.uint8)
                job.enc._ciphertext = job.view if inplace else job.adapter.adopt_host(dst)
            else:
                src = gpu.device_span(job.view)
                if inplace:
                    job.dst_obj, dst = job.view, src
                else:
                    with job.adapter.allocation_stream(stream, job.place):
                        job.dst_obj = job.adapter.empty_bytes(job.enc.nbytes, job.place)
                    dst = gpu.device_span(job.dst_obj)
                job.enc._ciphertext = job.dst_obj
            spans.append((src, dst))
        runner = pipeline.GpuRunner(gpu, "seal", algorithm, key, stream=launch, host_tags=False,
                                    device=_device_index(place))

    def launch_batch() -> None:  # the nonces are drawn by now (after every refusal)
        tasks = [pipeline.Job(job.label, job.nonce, job.aad, src, dst, size=job.enc.nbytes)
                 for job, (src, dst) in zip(jobs, spans)]
        tags = runner.start(pipeline.Batch(tasks))()
        for row, job in enumerate(jobs):
            if job.place == HOST:
                job.enc._tag = tags.row(row)
            else:
                job.enc._tags, job.enc._tag_row = tags, row
    return launch_batch


def encrypt_tensor(x: Any, key: Any, *, algorithm: str = "chacha20-poly1305", aad: Any = None,
                   inplace: bool = False, stream: Any = None, nonce: Any = None,
                   contiguous: bool = False, key_id: Any = None, name: str | None = None,
                   device: str | None = None) -> EncryptedTensor:
    """Encrypt tensor ``x`` where it lives; returns an :class:`EncryptedTensor`.

    ``key``: 32 bytes (ChaCha20/XChaCha20), 16/24/32 bytes (AES-GCM). ``aad``: extra
    associated data, kept in the result. ``nonce``: None (random), bytes, or a
    :class:`NonceSequence`. ``inplace``: encrypt in ``x``'s own memory (which must be
    writable: see the module's "Memory" on torch tensors over read-only memory). ``contiguous``:
    allow a contiguous copy of a non-contiguous ``x`` (else ``ValueError``). ``key_id``
    (str or bytes) and ``name`` (str) are recorded and authenticated. ``device``: None
    (where the data is), ``"cpu"``, or ``"gpu"`` (run a host tensor on the GPU).
    ``stream``: for GPU work, default the framework's current stream.
    """
    single = None if nonce is None or isinstance(nonce, NonceSequence) else [nonce]
    if stream is None and (device is None or _check_device(device) != "gpu"):
        enc = _encrypt_small_on_host(x, key, algorithm, aad, inplace, single or nonce, key_id, name)
        if enc is not None:
            return enc
    return _encrypt_jobs([(name, x)], key, algorithm=algorithm, aad=aad, inplace=inplace,
                         stream=stream, nonces=single if single is not None else nonce,
                         contiguous=contiguous, key_id=key_id, device=device)[0]


def encrypt_tensors(tensors: Mapping[str, Any] | Sequence[Any], key: Any, *,
                    algorithm: str = "chacha20-poly1305", aad: Any = None, inplace: bool = False,
                    stream: Any = None, nonces: Any = None, contiguous: bool = False,
                    key_id: Any = None, device: str | None = None):
    """Encrypt a dict (e.g. a ``state_dict()``) or list of tensors; returns the same shape of
    container holding :class:`EncryptedTensor` objects.

    One fresh nonce per tensor (``nonces``: None for random, a :class:`NonceSequence`, or
    a sequence of distinct nonces). Each tensor's name (its dict key, or ``str(index)``
    for a list) is authenticated, so swapping entries fails decryption. All GPU tensors
    go through one ``seal_batch`` call (one launch per step). Other arguments as in
    :func:`encrypt_tensor`.

    In place, a batch that raises part way returns nothing, so the host tensors it had
    already encrypted are decrypted back before the error goes on; any that cannot be
    are in the error's ``encrypted`` attribute (label -> :class:`EncryptedTensor`).
    """
    items, rebuild = _items_of(tensors)
    encs = _encrypt_jobs(items, key, algorithm=algorithm, aad=aad, inplace=inplace, stream=stream,
                         nonces=nonces, contiguous=contiguous, key_id=key_id, device=device)
    return rebuild(encs)


def _is_tensor(x: Any) -> bool:
    try:
        fw.adapter_for(x)
    except TypeError:
        return False
    return True


def _not_a_tensor(label: str, x: Any, exc: TypeError) -> TypeError:
    """The error for a container entry that is no tensor, naming it and what to do."""
    if isinstance(x, Mapping) or (isinstance(x, (list, tuple)) and any(
            isinstance(v, (Mapping, list, tuple)) or _is_tensor(v) for v in x)):
        # an optimizer's state, a nested checkpoint (a list of numbers is said below)
        return TypeError(f"entry {label!r} is a nested {type(x).__name__}: this takes one "
                         f"level of name -> tensor; flatten it first (names such as "
                         f"'{label}.0.exp_avg') or encrypt each nested dict of tensors on its "
                         f"own, so that none of its tensors is stored in the clear")
    # a state dict's other entries (a step count, extra state)
    return TypeError(f"entry {label!r}: {exc}; encrypt the tensors (for example "
                     f"{{k: v for k, v in state.items() if torch.is_tensor(v)}}) and store "
                     f"plain values such as step counts as you would without encryption")


def _items_of(container: Any):
    """(label, value) pairs of a dict or list, and a function rebuilding the container type."""
    if isinstance(container, Mapping):
        keys = list(container.keys())
        for k in keys:
            if not isinstance(k, str):
                raise TypeError(f"dict keys must be str (tensor names), not {type(k).__name__}")
        factory = type(container) if type(container) is not dict else dict

        def rebuild(values):
            plain = dict(zip(keys, values))
            try:  # from a mapping, not pairs: Counter(pairs) would count them
                return factory(plain)
            except TypeError:
                return plain
        return [(k, container[k]) for k in keys], rebuild
    if isinstance(container, (list, tuple)):
        kind = type(container)
        return [(str(i), v) for i, v in enumerate(container)], (
            lambda values: kind(values) if kind in (list, tuple) else list(values))
    raise TypeError(f"expected a dict or a list of tensors, not {type(container).__name__}")


# ============================================================================ decryption
def _decrypt_jobs(items: list[tuple[str | None, EncryptedTensor, Any]], key: Any, *,
                  stream: Any, device: Any, inplace: bool | None, one: bool = False) -> list[Any]:
    """``one``: ``items`` is :func:`decrypt_tensor`'s entry, labelled with its ``name=``
    (None when not given), which the recorded name must then equal."""
    device = _check_device(device)
    if device == "gpu":  # BackendUnavailable saying why, as encrypting says it: before a
        from ..backends import get_backend  # result is planned on a device there is none of

        get_backend("gpu")
    jobs = []
    malformed: list[_Job] = []  # recorded fields that cannot be its ciphertext's (edited)
    keys: dict[str, bytes] = {}  # the key checked once per algorithm of the batch
    spent: list = []  # entries decrypted in place already: all named at once, below
    for label, enc, out in items:
        if not isinstance(enc, EncryptedTensor):
            raise _not_encrypted(label, enc, one)
        if enc._consumed[0]:
            spent.append(label if label is not None else enc.name)
            continue
        # The key's own errors come first, whatever else an edit changed, as for an intact
        # entry: TypeError for a key that is not bytes-like, ValueError for a wrong length
        # for the entry's algorithm (the small path raises the first itself and leaves the
        # second to this one). An algorithm edited to no algorithm has no length to check
        # the key against: the entry is malformed, below.
        algorithm = enc.algorithm
        if isinstance(algorithm, str) and algorithm in _NONCE_SIZE:
            job_key = keys.get(algorithm)
            if job_key is None:
                job_key = keys[algorithm] = _key_bytes(key, algorithm)
        else:
            bytes_arg(key, "key")
        # None: recorded fields that cannot be its ciphertext's, or that no metadata block
        # can hold (a name that is not text, say): edited since, so failed (InvalidTag)
        # before anything is allocated
        aad = None
        if _describes_its_ciphertext(enc):
            try:
                aad = enc.associated_data()
            except _UNENCODABLE:
                pass
        if aad is None:
            job = _Job(label, enc, HOST, b"")
            job.x = out  # zeroed, if it can be, as a bad tag's would be
            jobs.append(job)
            malformed.append(job)
            continue
        in_place = _decides_inplace(enc, out, inplace)
        ct_place = enc._place
        out_on_gpu = out is not None and fw.adapter_for(out).place(out) != HOST
        if out_on_gpu and device == "cpu":
            raise ValueError("out= is GPU memory, which device='cpu' cannot write: leave "
                             "device unset, or give a host out=")
        run_gpu = device == "gpu" or out_on_gpu or (ct_place != HOST and device != "cpu")
        if in_place:
            if device == "cpu" and ct_place != HOST:
                raise ValueError("an in-place decrypt of GPU ciphertext runs on the GPU; "
                                 "leave device unset")
            result_place = ct_place
        elif out is not None:
            result_place = fw.adapter_for(out).place(out)
        elif run_gpu and enc.framework != "numpy":
            result_place = ct_place if ct_place != HOST else fw.current_device_place(enc.framework)
        else:
            result_place = HOST
        job = _Job(label, enc, result_place, aad)
        job.inplace, job.nonce, job.x, job.result = in_place, enc.nonce, out, (run_gpu, job_key)
        jobs.append(job)
    if spent:
        if one:  # decrypt_tensor: "this" says which
            raise ValueError(_SPENT)
        _refuse_spent(spent, len(items))
    # An entry filed under another name than it was encrypted with (two state-dict entries
    # swapped, say) is refused before anything is decrypted: its plaintext is never released.
    # In a batch whose entries carry names (encrypt_tensors records each one's), an entry
    # without one is misfiled too: an unnamed ciphertext under the same key (from
    # encrypt_tensor) put in an entry's place decrypted as that entry. A batch of unnamed
    # entries alone (encrypt_tensor's results, gathered) has no names to check;
    # decrypt_tensor's name= is one the caller expects, so an unnamed entry is misfiled there.
    # A name edited to something that is no str (an array, say) is misfiled uncompared.
    named = one or any(j.enc.name is not None for j in jobs if j.label is not None)
    misfiled = [j for j in jobs if j.label is not None and (j.enc.name is not None or named)
                and (not isinstance(j.enc.name, str) or j.enc.name != j.label)]
    refused = {id(j) for j in misfiled + malformed}
    todo = [j for j in jobs if id(j) not in refused]
    gpu_jobs = [j for j in todo if j.result[0]]
    # one GPU per batch, and the launch stream (another device's, or of no known kind),
    # refused here, before any tensor is decrypted
    launch_gpu = _prepare_gpu_open(gpu_jobs, stream) if gpu_jobs else None
    _prepare_outputs(todo, stream)
    into_own_ciphertext = _refuse_overlapping_outputs(todo)
    for job in into_own_ciphertext:  # decrypted in place in effect: so run (dst = src: a wrong
        job.inplace = True           # tag leaves the ciphertext there), spent, and the result
        # is still the caller's out= (job.dst_obj)
    torch_adapter = fw.BY_NAME["torch"]
    _bump_torch_version([job.dst_obj for job in todo  # nothing is refused from here on
                         if job.adapter is torch_adapter and (job.inplace or job.x is not None)])
    # GPU ciphertext decrypted on the CPU is copied down here, in this thread (whose CUDA
    # context and stream order the copy); only host ciphertext goes to the thread pool
    from_device = [j for j in todo if not j.result[0] and j.enc._place != HOST]
    on_host = [j for j in todo if not j.result[0] and j.enc._place == HOST]
    # Each in-place entry is marked spent the moment its plaintext is back in its memory
    # (by _open_on_host, _open_on_gpu): an error later in the batch must not leave one
    # that to_bytes() would write out with its plaintext as the "ciphertext".
    failed = [j for j in from_device if not _open_on_host(j, 1)]
    failed += [j for j, ok in zip(on_host, _run_host_jobs(on_host, _open_on_host)) if not ok]
    if launch_gpu is not None:
        failed += launch_gpu()
    refused.update(id(j) for j in failed)
    failed = [j for j in jobs if id(j) in refused]
    if failed:
        _zero_refused_outputs(misfiled + malformed, jobs)
        if one and misfiled:
            label, recorded = misfiled[0].label, misfiled[0].enc.name
            exc = InvalidTag(
                f"authentication failed for 1 of 1 tensor(s): name={label!r} was asked for, "
                f"but the ciphertext records " + ("no name" if recorded is None else
                                                  f"the name {recorded!r}") +
                f" (authentic only if it decrypts): was another tensor's ciphertext stored in "
                f"place of {label!r}? Nothing was decrypted; decrypt the ciphertext stored "
                f"for {label!r}, or this one under the name it was encrypted with")
            exc.failed = [label]
            raise exc
        names = ", ".join(_described(j.label if j.label is not None else j.enc.name)
                          for j in failed)
        # the recorded name is not authentic yet, but says what went wrong when it is
        # (a dict's entries decrypted as a list, or entries swapped)
        filed = "; ".join(f"{j.enc.name!r} is filed as {j.label!r}" for j in misfiled)
        unnamed = any(j.enc.name is None for j in misfiled)
        exc = InvalidTag(f"authentication failed for {len(failed)} of {len(jobs)} tensor(s): "
                         f"{names}" + (f" (encrypted under another name: {filed}; decrypt "
                                       f"each under the name it was encrypted with"
                                       + ("; an entry with no recorded name (an "
                                          "encrypt_tensor result) among named ones is "
                                          "decrypted on its own, with decrypt_tensor"
                                          if unnamed else "") + ")"
                                       if filed else
                                       f" ({_FAILED_TAG}{_key_ids(j.enc for j in failed)})"))
        exc.failed = [j.label for j in failed]
        raise exc
    for job in jobs:
        if job.error is not None:
            job.dst_obj[...] = 0
            raise job.error
    return [j.dst_obj if j.inplace else j.adapter.finish(j.dst_obj, getattr(j.enc, "_home", None))
            if j.adapter is _JAX_ADAPTER else j.adapter.finish(j.dst_obj) for j in jobs]


#: the one adapter whose results go back to a device their place does not name (see
#: EncryptedTensor._home, which the others' results made by ``_host`` leave unset)
_JAX_ADAPTER = fw.BY_NAME["jax"]


def _zero_refused_outputs(refused: list[_Job], jobs: list[_Job]) -> None:
    """Zero the ``out=`` of each entry refused before decryption (filed under another
    name, or malformed), as a wrong tag's is zeroed, so that what it held before (an
    earlier plaintext, say) cannot pass for this entry's: where ``out=`` is a writable,
    C-contiguous tensor of the recorded dtype and shape whose memory is no entry's
    ciphertext (an in-place result's own memory, through another object, is left as it
    is). Anything it cannot tell leaves ``out=`` alone: this runs on a path that raises."""
    outs = [j for j in refused if j.x is not None and j.x is not j.enc._source]
    if not outs:
        return
    ciphertexts = []
    for job in jobs:
        enc = job.enc
        try:
            ct = enc._source if enc._source is not None else (
                _host_ciphertext_view(enc) if enc._place == HOST else enc._ciphertext)
            span = _memory_span(ct, ct.nbytes)
        except Exception:  # noqa: BLE001 (an edited object: its memory is unknown)
            return
        if span is not None:
            ciphertexts.append((enc._place, span))
    for job in outs:
        out, enc = job.x, job.enc
        try:
            adapter = fw.adapter_for(out)
            if not adapter.mutable or adapter.needs_copy(out) \
                    or adapter.dtype_name(out) != enc.dtype or adapter.shape(out) != enc.shape \
                    or (isinstance(out, np.ndarray) and not out.flags.writeable):
                continue
            place, view = adapter.place(out), adapter.byte_view(out)
            if adapter.name == "torch" and place == HOST:
                _check_storage(out, out.nbytes)
                _refuse_read_only_torch(out, out.nbytes, "out=")
            span = _memory_span(view, out.nbytes)
            if span is None or any(p == place and a < span[1] and span[0] < b
                                   for p, (a, b) in ciphertexts):
                continue
            view[...] = 0
            _bump_torch_version(out)
        except Exception:  # noqa: BLE001 (left as it was: the InvalidTag says enough)
            continue


def _describes_its_ciphertext(enc: EncryptedTensor) -> bool:
    """Whether ``enc``'s recorded framework, algorithm, dtype, shape and byte count can be
    those of its ciphertext: known names, ``prod(shape) * itemsize == nbytes``, a
    ciphertext (and, in place, a source tensor of that framework) of ``nbytes``, a
    ``bytes`` nonce of the algorithm's length and ``bytes`` aad. An encryption records
    nothing else, so False means the object was edited since, which decryption reports
    as ``InvalidTag`` like any other edit, before anything is allocated (an edited shape
    can ask for terabytes) or read (an edited length would read past the data)."""
    try:
        if type(enc.nonce) is not bytes or type(enc.aad) is not bytes \
                or len(enc.nonce) != _NONCE_SIZE.get(enc.algorithm):
            return False  # the cipher would raise ValueError / TypeError, not InvalidTag
        nbytes = operator.index(enc.nbytes)
        count = 1
        for d in enc.shape:
            d = operator.index(d)
            if d < 0:
                return False
            count *= d
        if enc.framework not in fw.FRAMEWORK_CODES or enc.algorithm not in _ALGORITHM_CODES \
                or count * fw.dtype_itemsize(enc.dtype) != nbytes:
            return False
    except (TypeError, ValueError, AttributeError, OverflowError):  # not ints, unknown dtype
        return False
    src = enc._source
    if src is not None and (_framework_of(src) != enc.framework or src.nbytes != nbytes):
        return False
    ct = enc._ct
    if ct is None:  # an in-place host result not viewed yet: its source is the ciphertext
        return src is not None
    length = len(ct) - TAG_SIZE if type(ct) is bytes else getattr(ct, "nbytes", None)
    return length is None or length == nbytes  # None: a buffer that does not say (none yet)


#: what encoding the metadata of edited fields raises (no encryption records such fields):
#: a name or key id that is not text (or bytes), or not UTF-8, or over 65535 bytes; a dtype
#: that is not ASCII text; dimensions that are not ints
_UNENCODABLE = (struct.error, TypeError, ValueError, KeyError, AttributeError, UnicodeError,
                OverflowError)


#: how many spent entries the error names (exc.spent has them all)
_SPENT_SHOWN = 20


def _refuse_spent(spent: list, count: int) -> None:
    """``ValueError`` naming every entry of a batch of ``count`` that was decrypted in
    place already (``spent``: their labels, or recorded names), e.g. by an earlier try of
    the same batch that failed part way."""
    shown = ", ".join(map(_described, spent[:_SPENT_SHOWN]))
    if len(spent) > _SPENT_SHOWN:  # typically all but the entry that failed: a state dict
        shown += f" and {len(spent) - _SPENT_SHOWN} more"
    exc = ValueError(
        f"{len(spent)} of {count} entries were decrypted in place already: {shown}. Their "
        f"memory holds the plaintext again, not the ciphertext (an in-place batch that fails "
        f"part way spends the entries it decrypted): use those tensors as they are, and "
        f"decrypt the other entries without them (exc.spent lists them all)")
    exc.spent = spent
    raise exc


def _not_encrypted(label: Any, x: Any, one: bool) -> TypeError:
    """The error for an entry that is no EncryptedTensor, saying what to do with the
    commonest one, the bytes ``to_bytes()`` stored."""
    what = f"expected an EncryptedTensor, not {type(x).__name__}"
    if not one:
        what = f"entry {label!r}: {what}"
    if isinstance(x, (bytes, bytearray, memoryview)):
        what += ("; parse stored bytes with gpucrypt.EncryptedTensor.from_bytes first" +
                 ("" if one else " ({name: EncryptedTensor.from_bytes(blob) for name, blob "
                                 "in blobs.items()})"))
    return TypeError(what)


def _framework_of(x: Any) -> str:
    """The framework of a tensor (an in-place result's source): NumPy and torch without
    asking every adapter."""
    if isinstance(x, np.ndarray):
        return "numpy"
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return "torch"
    return fw.adapter_for(x).name


def _decides_inplace(enc: EncryptedTensor, out: Any, inplace: bool | None) -> bool:
    if out is not None:
        if inplace:
            raise ValueError("give either out= or inplace=True, not both")
        return enc._source is not None and out is enc._source
    if inplace is None:
        return enc._source is not None
    return bool(inplace)


def _memory_span(buffer: Any, nbytes: int) -> tuple | None:
    """(first byte, end) of a tensor's or byte view's memory; None when it has none to
    tell (JAX), holds nothing, or is OpenSSL's sealed bytes (which nothing writes)."""
    if not nbytes or buffer is None or isinstance(buffer, bytes):
        return None
    data_ptr = getattr(buffer, "data_ptr", None)  # torch, the common case: 0.05 us
    if data_ptr is not None:
        address = data_ptr()
    else:
        if isinstance(buffer, memoryview):
            buffer = np.frombuffer(buffer, dtype=np.uint8)
        address = fw.memory_address(buffer)
    return None if address is None else (address, address + nbytes)


def _shown(job: _Job) -> Any:
    return job.label if job.label is not None else job.enc.name


def _refuse_overlapping_outputs(jobs: list[_Job]) -> set:
    """Decrypting, a plaintext written where another entry's ciphertext or plaintext lies
    (one in-place result twice, ``out=`` naming one tensor twice, or another entry's
    ciphertext) would hand out bytes that are neither, or destroy a ciphertext: refused
    before anything is written. Only batches that write into existing memory (in place,
    or out=) are looked at, and their ciphertexts only when out= is given.

    Returns the jobs whose out= is exactly their own ciphertext's memory (through another
    object: a state_dict() makes new tensors on a model's memory): decrypted in place in
    effect, so their results are spent like in-place ones."""
    outs = any(job.x is not None and not job.inplace for job in jobs)
    if not outs and not any(job.inplace for job in jobs):
        return set()  # every plaintext goes into a new tensor
    places: dict[Any, list] = {}  # place -> [(start, end, job index, written)]
    own: set = set()
    for i, job in enumerate(jobs):
        enc = job.enc
        if job.inplace or outs:
            ct = enc._source if job.inplace and enc._source is not None else (
                _host_ciphertext_view(enc) if enc._place == HOST else enc._ciphertext)
            data_ptr = getattr(ct, "data_ptr", None)  # a torch tensor: inline, 0.3 us less
            if data_ptr is not None and enc.nbytes:
                start = data_ptr()
                read = (start, start + enc.nbytes)
            else:
                read = _memory_span(ct, enc.nbytes)
            if read is not None:
                places.setdefault(enc._place, []).append((*read, i, job.inplace))
        if job.x is not None and not job.inplace:
            written = _memory_span(job.dst_view, enc.nbytes)
            if written is not None:
                places.setdefault(job.place, []).append(written + (i, True))
                if job.place == enc._place and written == read:
                    own.add(job)
    for spans in places.values():
        spans.sort()
        if all(a[1] <= b[0] for a, b in zip(spans, spans[1:])):
            continue  # all apart (the common case, checked in one pass)
        for k, a in enumerate(spans):
            for j in range(k + 1, len(spans)):  # the spans that start before a ends
                b = spans[j]
                if b[0] >= a[1]:
                    break
                _refuse_overlap(jobs, a, b)
    return own


def _refuse_overlap(jobs: list[_Job], a: tuple, b: tuple) -> None:
    """Raise for two overlapping spans (start, end, job index, written) unless both only
    read one ciphertext (a result decrypted twice, say)."""
    if not (a[3] or b[3]):
        return
    if a[2] != b[2]:
        first, second = sorted((_shown(jobs[a[2]]), _shown(jobs[b[2]])), key=str)
        raise ValueError(
            f"entries {first!r} and {second!r} would write where the other's ciphertext or "
            f"plaintext is (one in-place result twice, or out= naming the same memory twice "
            f"or another entry's ciphertext): decrypt each once, into memory of its own; "
            f"nothing was decrypted")
    if a[:2] != b[:2]:
        raise ValueError(f"out= for entry {_shown(jobs[a[2]])!r} overlaps its own ciphertext: "
                         f"give memory of its own (or exactly the ciphertext's, to decrypt in "
                         f"place); nothing was decrypted")


def _prepare_outputs(jobs: list[_Job], stream: Any) -> None:
    """Choose each job's result object and the byte view its plaintext goes to (results
    allocated here are allocated for the caller's ``stream``)."""
    probes: list = []  # in-place torch results whose memory may be read-only: probed together
    for job in jobs:
        enc = job.enc
        if job.inplace and enc._source is not None:
            # in place the plaintext goes where the ciphertext is (no view of its own); the
            # result is the caller's out= when it named that memory
            job.adapter, job.dst_view = fw.BY_NAME[enc.framework], None
            job.dst_obj = enc._source if job.x is None else job.x
            if enc._place == HOST:  # refused here, before any tensor of the batch is touched
                job.host_src = _in_place_host_bytes(enc, job.label, probes)
        elif job.inplace:   # in the ciphertext's own buffer, which becomes the result
            adapter = fw.result_adapter(enc.framework, enc._place)
            buffer = enc._ciphertext
            if not adapter.mutable:
                raise ValueError(f"{adapter.name} arrays are immutable: no in-place decrypt "
                                 f"(pass inplace=False: the result is a new array)")
            if isinstance(buffer, np.ndarray):
                if not buffer.flags.writeable:
                    raise ValueError("an in-place decrypt needs writable ciphertext memory "
                                     "(from_bytes of a bytearray, or inplace=False)")
                buffer = adapter.adopt_host(buffer)
            elif adapter.name == "torch" and enc._place == HOST:
                _refuse_read_only_torch(buffer, enc.nbytes, "the ciphertext's memory")
            job.adapter, job.dst_view = adapter, buffer
            job.dst_obj = adapter.view_as(buffer, enc.dtype, enc.shape)
        elif job.x is not None:
            out = job.x
            adapter = fw.adapter_for(out)
            if not adapter.mutable:
                raise ValueError(f"out must be a writable tensor, and {adapter.name} arrays are "
                                 f"immutable: leave out= unset (the result is a new array), or "
                                 f"give a tensor of a framework that can be written")
            if adapter.needs_copy(out):
                raise ValueError("out must be a writable C-contiguous tensor")
            if adapter.dtype_name(out) != enc.dtype or adapter.shape(out) != enc.shape:
                raise ValueError(f"out has dtype {adapter.dtype_name(out)} and shape "
                                 f"{adapter.shape(out)}; the tensor was {enc.dtype} {enc.shape}")
            # refused here, before any tensor of the batch is decrypted: a read-only array
            # would fail in the middle, and torch's views of a tensor whose storage shrank
            # would write past the allocation
            if isinstance(out, np.ndarray) and not out.flags.writeable:
                raise ValueError("out must be a writable C-contiguous tensor (this one is "
                                 "read-only)")
            if adapter.name == "torch":
                _check_storage(out, enc.nbytes)
                if job.place == HOST:
                    _refuse_read_only_torch(out, enc.nbytes, f"out= for {_what(job.label)}")
            job.adapter, job.dst_obj, job.dst_view = adapter, out, adapter.byte_view(out)
        else:
            try:
                adapter = fw.result_adapter(enc.framework, job.place)
                with adapter.allocation_stream(stream, job.place):
                    obj = adapter.empty(enc.dtype, enc.shape, job.place)
            except _CANNOT_ALLOCATE as exc:
                if _out_of_memory(exc):
                    raise
                # This machine cannot make such a tensor (say bfloat16 as NumPy). Decrypt into
                # plain bytes anyway, so that altered metadata still reads as InvalidTag;
                # an authentic tensor then raises this error, releasing nothing.
                if not isinstance(exc, ValueError):
                    exc = ValueError(f"cannot make a {enc.framework} tensor of dtype {enc.dtype} "
                                     f"and shape {enc.shape} here ({type(exc).__name__}: {exc})")
                job.error, job.place, adapter = exc, HOST, fw.BY_NAME["numpy"]
                obj = adapter.empty_bytes(enc.nbytes, HOST)
            job.adapter, job.dst_obj = adapter, obj
            job.dst_view = (obj.buffer if isinstance(obj, fw._JaxDeviceResult)
                            else adapter.byte_view(obj))
    _refuse_read_only_spans(probes)


def _in_place_host_bytes(enc: EncryptedTensor, label: Any, probes: list | None = None) -> memoryview:
    """The memory an in-place host result is decrypted in, as a flat byte memoryview;
    ``ValueError`` when it cannot be written now (a NumPy array made read-only since it
    was encrypted) or no longer holds the ciphertext's bytes (a torch tensor whose
    storage shrank), or not in their order (one no longer C-contiguous). Asked of every
    in-place host result of a batch before any tensor is decrypted."""
    source = enc._source
    if not (source.flags.c_contiguous if isinstance(source, np.ndarray)
            else source.is_contiguous()):
        # restrided in place since (its byte count is the same: _describes_its_ciphertext
        # checked), its memory would be read in another order (through a copy, even), and
        # fail as a bad tag, which says nothing of why
        raise ValueError(f"{_what(label, enc.name)} was encrypted in place, and is no longer "
                         f"C-contiguous: its shape or strides were changed in place since "
                         f"(t_(), as_strided_(), NumPy's .shape or .strides), so its memory no "
                         f"longer reads as the ciphertext. Undo that change (make it "
                         f"C-contiguous over the same memory again), then decrypt; nothing was "
                         f"decrypted")
    view = memoryview(_host_ciphertext_view(enc))
    if view.readonly:
        raise ValueError(f"{_what(label, enc.name)} is read-only now: an in-place decrypt needs "
                         f"writable memory (make it writable again, or pass inplace=False)")
    if not isinstance(enc._source, np.ndarray):  # a CPU torch tensor
        t = enc._source
        if probes is None:
            _refuse_read_only_torch(t, enc.nbytes, _what(label, enc.name))
        elif enc.nbytes and not t.untyped_storage().resizable():  # with the batch's others
            probes.append((t.data_ptr(), enc.nbytes, t, label if label is not None else enc.name))
    return view


def _open_on_host(job: _Job, threads: int, shared_gil: bool = False) -> bool:
    enc = job.enc
    _, key = job.result
    if job.host_src is not None:  # in place: checked by _prepare_outputs
        src = job.host_src
    elif enc._place == HOST:
        src = memoryview(_host_ciphertext_view(enc))
    else:  # device="cpu" for GPU ciphertext: one copy down
        gpu = get_backend("gpu")
        with gpu.device(enc._place[1]):
            src = memoryview(np.ascontiguousarray(
                gpu.to_host(gpu.as_device_bytes(enc._ciphertext))).reshape(-1))
    if job.inplace:
        if src.readonly:
            raise ValueError("an in-place decrypt needs writable ciphertext memory (from_bytes "
                             "of a bytearray, or inplace=False)")
        dst = src
    else:
        dst = job.adapter.host_array(job.dst_view)
    if not _host_open(enc.algorithm, key, job.nonce, job.aad, src, enc.tag, dst, threads,
                      shared_gil):
        return False
    if job.inplace:  # its memory holds the plaintext now: spent at once (see _decrypt_jobs)
        enc._consumed[0] = True
    return True


def _prepare_gpu_open(jobs: list[_Job], stream: Any):
    """Decrypt ``jobs`` with one pipeline batch (one ``open_batch`` launch) per algorithm,
    in the tensors' device's context. Host ciphertext is staged; a host result is
    filled only when its tag verified (zeroed otherwise), an in-place host tensor left
    as it was.

    Prepared here (the device, one for the batch; the launch stream, refused if it is
    another device's or of no known kind; the inputs ordered on it), before any tensor
    of the batch is decrypted; the function returned runs it and returns the failed
    jobs, marking each in-place one that verified spent as its batch comes back."""
    gpu = get_backend("gpu")
    place = _single_place([j.enc._place for j in jobs] + [j.place for j in jobs])
    with gpu.device(_device_index(place)):
        # the framework of what is on the device: the memory written there (out= of any
        # framework, else the ciphertext's or a new result of the recorded one), else the
        # ciphertext read there; host ciphertext's framework has no say (a torch-made one
        # into a numba out= asked a CPU-only torch for a CUDA stream)
        launch_stream = _launch_stream(stream, place, (
            (j.enc.framework if j.x is None or j.inplace else fw.adapter_for(j.x).name)
            if j.place == place else j.enc.framework
            for j in jobs if place in (j.place, j.enc._place)))
        if stream is not None:  # resolves it (TypeError for an object that is none), queues nothing
            gpu.wait_for(launch_stream, launch_stream)
        _order_inputs(gpu, stream, launch_stream, place,
                      [(fw.BY_NAME[j.enc.framework], j.enc._ciphertext) for j in jobs
                       if j.enc._place != HOST])

    def run() -> list[_Job]:
        with gpu.device(_device_index(place)):
            return _open_on_gpu(gpu, jobs, place, launch_stream)
    return run


def _open_on_gpu(gpu, jobs: list[_Job], place, launch_stream: Any) -> list[_Job]:
    """The launches :func:`_prepare_gpu_open` prepared; returns the failed jobs."""
    tasks = []
    for job in jobs:
        enc = job.enc
        if enc._place == HOST:
            src = _host_ciphertext(enc)
        else:
            src = gpu.device_span(enc._ciphertext)
        if job.inplace:
            dst = src
        elif job.place == HOST:   # a host result computed on the GPU
            dst = job.adapter.host_array(job.dst_view)
        else:
            dst = gpu.device_span(job.dst_view)
        tasks.append(pipeline.Job(job.label, job.nonce, job.aad, src, dst, tag=None,
                                  size=enc.nbytes, key=job.result[1], algorithm=enc.algorithm))
    shared = _shared_tags(jobs)
    ok = np.zeros(len(jobs), dtype=bool)
    for algorithm in sorted({j.enc.algorithm for j in jobs}):
        idx = [i for i, j in enumerate(jobs) if j.enc.algorithm == algorithm]
        for i in idx:
            tasks[i].tag = None if shared is not None else jobs[i].enc.tag
        runner = pipeline.GpuRunner(gpu, "open", algorithm, stream=launch_stream,
                                    device=_device_index(place))
        ok[idx] = runner.start(pipeline.Batch([tasks[i] for i in idx], payload=shared))()
        for i in idx:  # back in their memory: spent at once (see _decrypt_jobs)
            if ok[i] and jobs[i].inplace:
                jobs[i].enc._consumed[0] = True
    for job, task, good in zip(jobs, tasks, ok):
        if not good and not job.inplace and job.place == HOST:
            task.dst[...] = 0
    return [j for j, good in zip(jobs, ok) if not good]


def _shared_tags(jobs: list[_Job]) -> Any:
    """The batch's :class:`~gpucrypt.pipeline.DeviceTags` when the jobs are exactly that
    encryption batch, in order (its tags used on the device: no copy, no wait); else None."""
    first = jobs[0].enc._tags
    if first is not None and len({j.enc.algorithm for j in jobs}) == 1 and all(
            j.enc._tags is first and j.enc._tag_row == i for i, j in enumerate(jobs)):
        if getattr(first.device, "shape", (None,))[0] == len(jobs):
            return first
    return None


def decrypt_tensor(enc: EncryptedTensor, key: Any, *, out: Any = None, stream: Any = None,
                   device: str | None = None, inplace: bool | None = None,
                   name: str | None = None) -> Any:
    """Check and decrypt ``enc``; returns the tensor (same framework, dtype, shape, device).

    ``InvalidTag`` if the key is wrong or anything was altered. ``out``: a tensor to
    write into (``out=x`` with the tensor that was encrypted in place restores it in
    place). ``inplace``: None decrypts in place exactly when ``enc`` was made in
    place; True decrypts in the ciphertext's own memory. ``device``: None (where the
    ciphertext is), ``"cpu"`` (host result), ``"gpu"`` (run on the GPU; device result
    for torch/CuPy/numba/JAX tensors). After an in-place decrypt ``enc`` is spent.
    ``name``: the name ``encrypt_tensor(name=)`` must have recorded (authenticated with
    the rest); a ciphertext recording another name, or none, fails with ``InvalidTag``
    before anything is decrypted (``out=`` zeroed, as for a wrong tag), as
    :func:`decrypt_tensors` fails an entry filed under another name. Without it the
    recorded name is not checked: ``enc.name`` is whatever the ciphertext was made with.
    """
    # name= as recorded: the small path decrypts, and the tag checks that name
    if out is None and stream is None and (device is None or _check_device(device) != "gpu") \
            and (name is None or type(enc) is EncryptedTensor and type(enc.name) is str
                 and enc.name == name):
        result = _decrypt_small_on_host(enc, key, inplace)
        if result is not _NOT_SMALL:
            return result
    return _decrypt_jobs([(_check_name(name), enc, out)], key, stream=stream, device=device,
                         inplace=inplace, one=True)[0]


def decrypt_tensors(encs: Mapping[str, EncryptedTensor] | Sequence[EncryptedTensor], key: Any, *,
                    out: Any = None, stream: Any = None, device: str | None = None,
                    inplace: bool | None = None):
    """Decrypt what :func:`encrypt_tensors` made; returns the same container type.

    ``out``: optional dict/list of tensors to write into (same keys/length). Every GPU
    tensor goes through one ``open_batch`` call. If any tensor fails (wrong tag, or an
    entry filed under another name than it was encrypted with: a dict's entries decrypted
    as a list, say, or an entry with no recorded name among named ones), ``InvalidTag``
    names them (its ``failed`` attribute lists them) and no plaintext is returned; their
    ``out=`` tensors are zeroed (where they have the recorded dtype and shape and are no
    entry's ciphertext); tensors decrypted in place that did verify are restored. A batch
    that would write where another entry's ciphertext or plaintext lies (one in-place
    result twice, ``out=`` naming one tensor twice or another entry's ciphertext) is
    refused, ``ValueError``, before anything is written. An entry decrypted in place is spent as soon as it is
    (an error later in the batch leaves it spent, its plaintext back in its memory): a batch
    holding spent entries is refused, ``ValueError``, before anything is decrypted, naming
    them (its ``spent`` attribute lists them all), so that a retry can leave them out.
    """
    items, rebuild = _items_of(encs)
    if out is None:
        outs = [None] * len(items)
    else:
        out_items, _ = _items_of(out)
        if isinstance(encs, Mapping):
            if set(dict(out_items)) != {k for k, _ in items}:
                raise ValueError("out must have the same keys as the encrypted tensors")
            outs = [dict(out_items)[k] for k, _ in items]
        else:
            if len(out_items) != len(items):
                raise ValueError("out must have as many tensors as there are encrypted ones")
            outs = [v for _, v in out_items]
    results = _decrypt_jobs([(label, enc, o) for (label, enc), o in zip(items, outs)], key,
                            stream=stream, device=device, inplace=inplace)
    return rebuild(results)


# ============================================================================ TensorCipher
def _refuse_chosen(kwargs: dict, method: str) -> None:
    """TypeError for what a TensorCipher chooses itself, given to one of its calls (it said
    "encrypt_tensor() got multiple values for keyword argument 'nonce'")."""
    chosen = sorted(set(kwargs) & {"nonce", "nonces", "algorithm"})
    if chosen:
        raise TypeError(f"TensorCipher.{method} chooses {', '.join(chosen)} itself (its "
                        f"algorithm, and nonces from its own sequence, so that none repeats): "
                        f"for a nonce of your own, call gpucrypt.encrypt_tensor(..., nonce=)")


class _TakenOnUse(NonceSequence):
    """A :class:`TensorCipher`'s nonces as the sequence its calls hand on: the tensor
    functions take them once their arguments are checked, so a call refused before that
    (a non-contiguous tensor, not a tensor at all) spends none, and ``messages`` counts
    only what was encrypted (nonces reserved first were spent by refused calls)."""

    def __init__(self, cipher: "TensorCipher", size: int):  # no counter of its own
        self._cipher, self._size = cipher, size

    @property
    def size(self) -> int:
        return self._size

    def take(self, count: int) -> list[bytes]:
        return self._cipher._reserve(count)

    def __repr__(self) -> str:
        return f"<the nonces of {self._cipher!r}>"


class TensorCipher:
    """A key, an algorithm and a nonce policy, for many tensors.

    ``nonces="random"`` (default) draws each nonce at random and refuses (OverflowError)
    after ``RANDOM_NONCE_BUDGET`` messages for 96-bit nonces; ``nonces="counter"`` uses a
    :class:`NonceSequence` with the given ``prefix`` (required: it is what keeps two
    writers under one key apart) from ``start`` on, deterministic and never repeating.

    It holds a key, so it cannot be copied or pickled (``TypeError``, as
    :mod:`gpucrypt.aead`'s objects): make one where it is used. A copy would also
    count the random-nonce budget apart from its original, or repeat its counter
    nonces. In a forked child a counter cipher refuses to encrypt (see
    :class:`NonceSequence`); a random one goes on, its count of messages starting from
    the parent's: the budget is per key, so processes sharing a key share it.
    """

    def __init__(self, key: Any, algorithm: str = "chacha20-poly1305", *, nonces: str = "random",
                 prefix: bytes | None = None, start: int = 0, key_id: Any = None,
                 device: str | None = None):
        self._algorithm, self._key = _algorithm_and_key(algorithm, key)
        self._key_id = _check_key_id(key_id)
        self._device = _check_device(device)
        size = _NONCE_SIZE[self._algorithm]
        if nonces == "counter":
            if prefix is None:
                raise ValueError("nonces='counter' needs prefix= (bytes, may be b''): a prefix "
                                 "unique to this writer under this key")
            self._sequence: NonceSequence | None = NonceSequence(size, prefix=prefix, start=start)
        elif nonces == "random":
            if prefix is not None:
                raise ValueError("prefix= is for nonces='counter'")
            self._sequence = None
        else:
            raise ValueError(f"nonces must be 'random' or 'counter', not {nonces!r}")
        self._budget = RANDOM_NONCE_BUDGET if size == 12 else None
        self._used = 0
        self._lock = threading.Lock()

    def __repr__(self) -> str:   # never shows the key
        mode = "counter" if self._sequence is not None else "random"
        return f"TensorCipher(algorithm={self._algorithm!r}, nonces={mode!r}, used={self._used})"

    @property
    def messages(self) -> int:
        """Tensors encrypted so far."""
        return self._used

    def __reduce_ex__(self, protocol):  # copy, deepcopy and pickle all come here
        raise TypeError("cannot pickle or copy 'TensorCipher' object: it holds a key (and its "
                        "copy would count the nonce budget, or repeat the counter nonces, on "
                        "its own); pickle a reference to the key, and make the cipher where it "
                        "is used")

    def _reserve(self, count: int) -> list[bytes]:
        if self._sequence is not None:
            nonces = self._sequence.take(count)
            with self._lock:
                self._used += count
            return nonces
        with self._lock:
            if self._budget is not None and self._used + count > self._budget:
                raise OverflowError(f"random-nonce budget of {self._budget} messages for this key "
                                    f"is spent; use a new key or XChaCha20-Poly1305")
            self._used += count
        return _nonces_for(count, self._algorithm, None)

    def encrypt(self, x: Any, **kwargs) -> EncryptedTensor:
        """:func:`encrypt_tensor` with this cipher's key, algorithm, nonces and key id."""
        _refuse_chosen(kwargs, "encrypt")
        return encrypt_tensor(x, self._key, algorithm=self._algorithm, nonce=self._on_use,
                              key_id=kwargs.pop("key_id", self._key_id),
                              device=kwargs.pop("device", self._device), **kwargs)

    def encrypt_many(self, tensors: Any, **kwargs):
        """:func:`encrypt_tensors` with this cipher's key, algorithm, nonces and key id."""
        _refuse_chosen(kwargs, "encrypt_many")
        return encrypt_tensors(tensors, self._key, algorithm=self._algorithm,
                               nonces=self._on_use,
                               key_id=kwargs.pop("key_id", self._key_id),
                               device=kwargs.pop("device", self._device), **kwargs)

    @property
    def _on_use(self) -> "_TakenOnUse":
        return _TakenOnUse(self, _NONCE_SIZE[self._algorithm])

    def decrypt(self, enc: EncryptedTensor, **kwargs) -> Any:
        return decrypt_tensor(enc, self._key, **kwargs)

    def decrypt_many(self, encs: Any, **kwargs):
        return decrypt_tensors(encs, self._key, **kwargs)
