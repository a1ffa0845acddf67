"""Segmented authenticated encryption for bulk data: the gpucrypt stream format.

A stream is a header followed by segments; every segment is an ordinary AEAD
message (ChaCha20-Poly1305, XChaCha20-Poly1305 or AES-256-GCM) under a per-file
key, with nonce ``prefix || BE32(index) || last-flag`` (the STREAM construction).
So segments are encrypted in parallel (a CPU thread pool, or one GPU launch per
batch), any segment decrypts on its own (:func:`open` gives random access), and
truncation, reordering, dropping, duplication and splicing are detected.
``docs/FORMAT.md`` specifies the bytes.

Public API::

    encrypt(src, dst, key, *, algorithm="chacha20-poly1305", segment_size=1 MiB,
            device="auto", key_id=None, envelope=None, threads=None) -> Header
    decrypt(src, dst, key, *, device="auto", threads=None) -> Header
    open(src, key, *, device="cpu") -> SegmentReader   (read-only, seekable)
    read_header(src) -> Header                       (no key needed)
    replace_envelope(path, key, envelope, key_id=<keep>) -> Header

``src``: a path (str or PathLike), a binary file object, a bytes-like object
(read in place, no copy), or an iterable of bytes chunks.
``dst``: a path or a writable binary file object.

Guarantees and limits:

- Memory is bounded, whatever the file size: on the CPU five batch buffers (three in,
  two out; about 8 MiB per batch, at least one segment per thread: two batches are
  in flight so that the workers never wait between them), on the GPU three of 64 MiB.
- Writes to a path are atomic: a temporary file in the same folder, fsync, then
  rename. ``decrypt`` to a path renames only after every segment, including the
  one marked last, verified; on any error the temporary file is removed and the
  destination is untouched.
- ``decrypt`` to a file object writes each batch of segments only after they
  verified, and raises on the first bad segment. The file object may then hold
  the plaintext of the segments before it (all verified, but not the whole file):
  treat it as garbage unless ``decrypt`` returned.
- Errors (all in :mod:`gpucrypt.stream`): ``FormatError`` (not a gpucrypt stream,
  malformed header), ``UnsupportedVersion`` (a FormatError), ``AuthenticationError``
  (wrong key or tampered data; an ``InvalidTag``; ``.segment`` says which segment,
  None for the header) and ``TruncatedError`` (an AuthenticationError).
- At most 2**32 segments per stream (16 TiB at 4 KiB segments, 4 PiB at 1 MiB).
"""
from __future__ import annotations

import builtins
import io
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable

import numpy as np

from . import _format
from ._atomic import AtomicFile, FileObjectOutput, open_output
from ._format import (DEFAULT_SEGMENT_SIZE, MAX_SEGMENTS, TAG_SIZE, AuthenticationError,
                      FormatError, Header, StreamError, TruncatedError, UnsupportedVersion)
from ..backends import select_backend

__all__ = ["encrypt", "decrypt", "open", "read_header", "replace_envelope", "Header",
           "SegmentReader", "StreamError", "FormatError", "UnsupportedVersion",
           "AuthenticationError", "TruncatedError", "ALGORITHMS", "DEFAULT_SEGMENT_SIZE"]

ALGORITHMS = tuple(_format.ALGORITHMS)

#: plaintext bytes per batch we aim for: big enough to amortise a thread hand-off or a
#: GPU launch, small enough to stay in cache on the CPU
_CPU_BATCH_BYTES = 8 << 20
_GPU_BATCH_BYTES = 64 << 20

_KEEP = object()


class _Closing:
    """``with obj:`` calls ``obj.close()`` at the end of the block, however it ends."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()


# ============================================================================ sources
class _Source(_Closing):
    """Fills caller-provided buffers with the next bytes of the input.

    ``fill(buf)`` returns a view of up to ``len(buf)`` bytes: fewer only at the end of
    the input. The view is ``buf[:n]``, or a zero-copy slice of an in-memory input.
    """

    size: int | None = None  # total bytes, when known up front

    def fill(self, buf: memoryview) -> memoryview:
        raise NotImplementedError


class _BufferSource(_Source):
    def __init__(self, data: memoryview):
        self._data = data
        self._pos = 0
        self.size = len(data)

    def fill(self, buf):
        view = self._data[self._pos:self._pos + len(buf)]
        self._pos += len(view)
        return view


class _FileSource(_Source):
    def __init__(self, fileobj, close: bool = False):
        self._file = fileobj
        self._close = close
        self._readinto = getattr(fileobj, "readinto", None)
        try:
            st = os.fstat(fileobj.fileno())
            import stat

            if stat.S_ISREG(st.st_mode):
                self.size = st.st_size - fileobj.tell()
        except (AttributeError, OSError, io.UnsupportedOperation, ValueError):
            pass

    def fill(self, buf):
        got = 0
        while got < len(buf):
            if self._readinto is not None:
                n = self._readinto(buf[got:])
            else:
                piece = self._file.read(len(buf) - got)
                n = len(piece) if piece else 0
                buf[got:got + n] = piece or b""
            if not n:
                break
            got += n
        return buf[:got]

    def close(self):
        if self._close:
            self._file.close()


class _IterableSource(_Source):
    def __init__(self, chunks: Iterable[Any]):
        self._chunks = iter(chunks)
        self._left = memoryview(b"")

    def fill(self, buf):
        got = 0
        while got < len(buf):
            if not len(self._left):
                chunk = next(self._chunks, None)
                if chunk is None:
                    break
                try:
                    self._left = memoryview(chunk).cast("B")
                except TypeError:
                    raise TypeError(f"src chunks must be bytes-like, not "
                                    f"{type(chunk).__name__}") from None
                continue
            n = min(len(buf) - got, len(self._left))
            buf[got:got + n] = self._left[:n]
            self._left = self._left[n:]
            got += n
        return buf[:got]


def _scratch(nbytes: int) -> memoryview:
    """An uninitialised batch buffer: ``bytearray`` would zero it, touching every page,
    which cost ~17% of a 256 MiB in-memory encryption (an in-memory source never even
    uses its input buffers)."""
    return memoryview(np.empty(nbytes, dtype=np.uint8))


def _open_source(src: Any, allow_iterable: bool) -> _Source:
    if isinstance(src, (str, os.PathLike)):
        return _FileSource(builtins.open(src, "rb", buffering=0), close=True)
    if hasattr(src, "readinto") or hasattr(src, "read"):
        return _FileSource(src)
    try:
        return _BufferSource(memoryview(src).cast("B"))
    except TypeError:
        pass
    if allow_iterable and hasattr(src, "__iter__"):
        return _IterableSource(src)
    raise TypeError(f"src must be a path, a binary file object, a bytes-like object"
                    f"{' or an iterable of bytes' if allow_iterable else ''}, "
                    f"not {type(src).__name__}")


# ============================================================================ engines
class _CpuEngine(_Closing):
    """Seals and opens batches of consecutive segments with the CPU backend's AEAD contexts,
    split over a thread pool (``cryptography`` releases the GIL)."""

    def __init__(self, header: Header, seg_key: bytes, threads: int, backend):
        self.header = header
        self.aad = memoryview(header.fixed_fields)
        name, key, self._nonce_head = _format.segment_cipher(header.algorithm, seg_key,
                                                             header.nonce_prefix)
        self._ctx = backend.aead(name, key)
        self.threads = threads
        self._pool = ThreadPoolExecutor(threads) if threads > 1 else None
        self.batches_in_flight = 2 if self._pool is not None else 1

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def _nonce(self, index: int, last: bool) -> bytes:
        return _format.segment_nonce(self._nonce_head, index, last)

    def open_one(self, index: int, last: bool, ct: memoryview, out: memoryview) -> bool:
        from cryptography.exceptions import InvalidTag

        try:
            self._ctx.open(self._nonce(index, last), ct, self.aad, out)
        except InvalidTag:
            return False
        return True

    # -- batches: `spans` is a list of (index, last, src view, dst view) --
    def _work(self, part, op) -> int | None:
        """Seal or open ``part`` in order; for opening, the first index that fails, or None."""
        for index, last, src, dst in part:
            if op == "seal":
                self._ctx.seal(self._nonce(index, last), src, self.aad, dst)
            elif not self.open_one(index, last, src, dst):
                return index
        return None

    def start(self, spans, op):
        """Start a batch split over the pool (contiguous runs of segments, one per thread);
        returns a callable that waits and gives the first failing index (or None)."""
        if self._pool is None or len(spans) < 2:
            result = self._work(spans, op)
            return lambda: result
        step = -(-len(spans) // min(self.threads, len(spans)))
        futures = [self._pool.submit(self._work, spans[i:i + step], op)
                   for i in range(0, len(spans), step)]

        def wait():
            failed = [i for i in (f.result() for f in futures) if i is not None]
            return min(failed) if failed else None
        return wait


class _GpuEngine(_Closing):
    """Seals and opens a batch of segments with one ``seal_batch``/``open_batch`` call over
    one device buffer (the GPU backend's device-level API)."""

    def __init__(self, header: Header, seg_key: bytes, backend):
        self.header = header
        self.aad = header.fixed_fields
        self._gpu = backend
        # XChaCha20: one HChaCha20 subkey per file, as on the CPU (not one per segment)
        self._algorithm, self._key, self._nonce_head = _format.segment_cipher(
            header.algorithm, seg_key, header.nonce_prefix)
        self.threads = 1
        self.batches_in_flight = 1  # start() runs the batch

    def _nonce(self, index, last):
        return _format.segment_nonce(self._nonce_head, index, last)

    def _pack(self, spans, src_stride):
        """One host buffer holding every span's source at ``src_stride`` per segment, on the device."""
        host = np.empty(len(spans) * src_stride, dtype=np.uint8)
        for j, (_, _, src, _) in enumerate(spans):
            host[j * src_stride:j * src_stride + len(src)] = np.frombuffer(src, dtype=np.uint8)
        return self._gpu.to_device(host)

    def _seal(self, spans):
        stride = self.header.segment_size
        dev = self._pack(spans, stride)
        views = [dev[j * stride:j * stride + len(src)] for j, (_, _, src, _) in enumerate(spans)]
        n = len(spans)
        tags = self._gpu.seal_batch(self._algorithm, [self._key] * n,
                                    [self._nonce(i, last) for i, last, _, _ in spans],
                                    views, [self.aad] * n, views)
        ct, tags = self._gpu.to_host(dev), self._gpu.to_host(tags)
        for j, (_, _, src, dst) in enumerate(spans):
            m = len(src)
            dst[:m] = memoryview(ct[j * stride:j * stride + m])
            dst[m:m + TAG_SIZE] = memoryview(np.ascontiguousarray(tags[j]))
        return None

    def _open(self, spans):
        stride = self.header.segment_size + TAG_SIZE
        dev = self._pack(spans, stride)
        lengths = [len(src) - TAG_SIZE for _, _, src, _ in spans]
        views = [dev[j * stride:j * stride + m] for j, m in enumerate(lengths)]
        tags = [bytes(src[-TAG_SIZE:]) for _, _, src, _ in spans]
        n = len(spans)
        ok = self._gpu.open_batch(self._algorithm, [self._key] * n,
                                  [self._nonce(i, last) for i, last, _, _ in spans],
                                  views, tags, [self.aad] * n, views)
        plain = self._gpu.to_host(dev)
        for j, (index, _, _, dst) in enumerate(spans):
            if not ok[j]:
                return index
            dst[:lengths[j]] = memoryview(plain[j * stride:j * stride + lengths[j]])
        return None

    def open_one(self, index, last, ct, out) -> bool:
        return self._open([(index, last, ct, out)]) is None

    def start(self, spans, op):
        result = self._seal(spans) if op == "seal" else self._open(spans)
        return lambda: result


def _engine(header: Header, key: bytes, device: str, threads: int | None, size_hint: int | None):
    backend = select_backend(device, size_hint or 0)
    seg_key = _format.segment_key(key, header)
    if backend.name == "gpu":
        return _GpuEngine(header, seg_key, backend)
    from ..backends.cpu import check_threads

    return _CpuEngine(header, seg_key, check_threads(threads), backend)


def _batch_segments(engine, segment_size: int) -> int:
    if isinstance(engine, _GpuEngine):
        return max(1, _GPU_BATCH_BYTES // segment_size)
    per_batch = max(engine.threads, _CPU_BATCH_BYTES // segment_size)
    return -(-per_batch // engine.threads) * engine.threads


# ============================================================================ encrypt
def encrypt(src: Any, dst: Any, key: Any, *, algorithm: str = "chacha20-poly1305",
            segment_size: int = DEFAULT_SEGMENT_SIZE, device: str = "auto",
            key_id: str | None = None, envelope: Any = None, threads: int | None = None,
            _salt: bytes | None = None, _nonce_prefix: bytes | None = None) -> Header:
    """Encrypt everything ``src`` holds into ``dst`` as a gpucrypt stream; returns its header.

    ``key``: 32 bytes (the per-file key is derived from it and a random salt).
    ``key_id``/``envelope``: optional header fields, authenticated by the header MAC but
    not bound to the segments (see :func:`replace_envelope`). ``threads``: CPU worker
    threads (default: the usable cores). ``_salt``/``_nonce_prefix`` are for known-answer
    tests only: reusing them under the same key repeats nonces.
    """
    key = _format.check_key(key)
    header, header_bytes = _format.new_header(key, algorithm, segment_size, key_id=key_id,
                                              envelope=envelope, salt=_salt,
                                              nonce_prefix=_nonce_prefix)
    with _open_source(src, allow_iterable=True) as source:
        with _engine(header, key, device, threads, source.size) as engine, \
                open_output(dst) as sink:
            sink.write(header_bytes)
            _encrypt_segments(source, sink, engine, segment_size)
    return header


def _seal_spans(first: int, plain: memoryview, out: memoryview, S: int, last_on_final: bool):
    """(index, last, src, dst) for the segments of ``plain`` laid out in ``out``."""
    n = max(1, -(-len(plain) // S))
    if first + n > MAX_SEGMENTS:
        raise OverflowError(f"the input needs more than {MAX_SEGMENTS} segments of {S} bytes; "
                            f"use a larger segment_size")
    spans = []
    for j in range(n):
        src = plain[j * S:(j + 1) * S]
        o = j * (S + TAG_SIZE)
        spans.append((first + j, last_on_final and j == n - 1, src, out[o:o + len(src) + TAG_SIZE]))
    return spans, n * TAG_SIZE + len(plain)


def _encrypt_segments(source: _Source, sink: AtomicFile | FileObjectOutput, engine, S: int) -> None:
    """Pipeline: batch k+1 is read before batch k starts (so k knows whether it holds
    the last segment). On the CPU two batches are in flight: batch k is queued on the
    workers before batch k-1 is waited for and written, so they never idle between
    batches (measured: 1.66x -> 1.78x one thread on 2 cores). The GPU engine runs a
    batch in its ``start`` call: one at a time."""
    B = _batch_segments(engine, S)
    depth = engine.batches_in_flight
    in_bufs = [_scratch(B * S) for _ in range(depth + 1)]
    out_bufs = [_scratch(B * (S + TAG_SIZE)) for _ in range(depth)]  # k-depth is written
    first, k = 0, 0
    plain = source.fill(in_bufs[0])
    in_flight: list = []  # (wait, ciphertext view), oldest first
    while True:
        # in_bufs[(k + 1) % (depth + 1)] held batch k - depth, waited for in the last round
        nxt = source.fill(in_bufs[(k + 1) % (depth + 1)]) if len(plain) == B * S else plain[:0]
        final = not len(nxt)
        out = out_bufs[k % depth]
        spans, n_out = _seal_spans(first, plain, out, S, last_on_final=final)
        in_flight.append((engine.start(spans, "seal"), out[:n_out]))
        while len(in_flight) > (0 if final else depth - 1):
            wait, ciphertext = in_flight.pop(0)
            wait()
            sink.write(ciphertext)
        if final:
            return
        first, plain, k = first + len(spans), nxt, k + 1


# ============================================================================ decrypt
def read_header(src: Any) -> Header:
    """Parse the header of a gpucrypt stream without a key (the MAC is not checked).

    ``src``: a path, a binary file object (read from its current position, left just
    after the header) or bytes-like. Raises FormatError, UnsupportedVersion or
    TruncatedError.
    """
    if isinstance(src, (str, os.PathLike)):
        with builtins.open(src, "rb") as f:
            return _format.parse_header(f.read)
    if hasattr(src, "read"):
        return _format.parse_header(src.read)
    try:
        view = memoryview(src).cast("B")
    except TypeError:
        raise TypeError(f"src must be a path, a binary file object or bytes-like, "
                        f"not {type(src).__name__}") from None
    return _parse_source_header(_BufferSource(view))  # no copy of the data behind it


def _parse_source_header(source: _Source) -> Header:
    def read(n):
        return bytes(source.fill(memoryview(bytearray(n))))

    return _format.parse_header(read)


def decrypt(src: Any, dst: Any, key: Any, *, device: str = "auto",
            threads: int | None = None) -> Header:
    """Decrypt the gpucrypt stream ``src`` into ``dst``; returns its (verified) header.

    The header MAC is checked first (a wrong key fails there, before any segment).
    See the module docstring for what ``dst`` holds when an error is raised.
    """
    key = _format.check_key(key)
    with _open_source(src, allow_iterable=True) as source:
        header = _parse_source_header(source)
        _format.verify_header(key, header)
        size_hint = None if source.size is None else source.size - header.header_length
        with _engine(header, key, device, threads, size_hint) as engine, \
                open_output(dst) as sink:
            _decrypt_segments(source, sink, engine, header.segment_size)
    return header


def _open_spans(first: int, ct: memoryview, out: memoryview, S: int, last_on_final: bool):
    C = S + TAG_SIZE
    n = -(-len(ct) // C)
    spans = []
    for j in range(n):
        src = ct[j * C:(j + 1) * C]
        if len(src) < TAG_SIZE:
            raise TruncatedError(f"truncated file: it ends inside segment {first + j}, "
                                 f"{len(src)} bytes into it (shorter than its tag)", first + j)
        spans.append((first + j, last_on_final and j == n - 1, src,
                      out[j * S:j * S + len(src) - TAG_SIZE]))
    return spans, len(ct) - n * TAG_SIZE


def _failure(engine, spans, index: int, final_in_file: bool) -> AuthenticationError:
    """The error for segment ``index`` of ``spans`` failing: retry it with the other last
    flag to tell truncation and splicing from tampering."""
    for i, last, src, _ in spans:
        if i == index:
            break
    scratch = memoryview(bytearray(len(src) - TAG_SIZE))
    if engine.open_one(index, not last, src, scratch):
        if final_in_file:
            return TruncatedError(f"truncated file: it ends after segment {index}, which is not "
                                  f"the last segment (whole segments are missing)", index)
        return AuthenticationError(f"segment {index} is marked as the last segment but more data "
                                   f"follows (data appended or segments spliced)", index)
    if final_in_file:
        return AuthenticationError(f"segment {index}, the final one in the file, failed "
                                   f"authentication: tampered data, or the file was cut inside "
                                   f"this segment", index)
    return AuthenticationError(f"segment {index} failed authentication: tampered, reordered, "
                               f"dropped or duplicated segments, or data from another file",
                               index)


def _decrypt_segments(source: _Source, sink: AtomicFile | FileObjectOutput, engine, S: int) -> None:
    """Pipeline as in encryption (batch k+1 read before batch k starts, so k is opened
    knowing whether the file ends with it; on the CPU two batches in flight). A batch is written
    only after all its segments verified; on the first failure the verified segments
    before it are written and the error raised."""
    C = S + TAG_SIZE
    B = _batch_segments(engine, S)
    depth = engine.batches_in_flight
    in_bufs = [_scratch(B * C) for _ in range(depth + 1)]
    out_bufs = [_scratch(B * S) for _ in range(depth)]  # batch k-depth is written
    first, k = 0, 0
    ct = source.fill(in_bufs[0])
    if not len(ct):
        raise TruncatedError("truncated file: it ends right after the header (no segments)", 0)
    in_flight: list = []  # (wait, spans, plaintext view, ends the file), oldest first
    while True:
        nxt = source.fill(in_bufs[(k + 1) % (depth + 1)]) if len(ct) == B * C else ct[:0]
        final = not len(nxt)
        out = out_bufs[k % depth]
        try:
            spans, n_out = _open_spans(first, ct, out, S, last_on_final=final)
        except TruncatedError:
            _finish_batches(in_flight, 0, engine, sink, S)  # an earlier failure comes first
            raise
        in_flight.append((engine.start(spans, "open"), spans, out[:n_out], final))
        _finish_batches(in_flight, 0 if final else depth - 1, engine, sink, S)
        if final:
            return
        first, ct, k = first + len(spans), nxt, k + 1


def _finish_batches(in_flight: list, keep: int, engine, sink, S: int) -> None:
    """Wait for the oldest batches until ``keep`` remain, writing each once all its
    segments verified; on a failure, write the verified segments before it and raise."""
    while len(in_flight) > keep:
        wait, done, plaintext, ends = in_flight.pop(0)
        bad = wait()
        if bad is not None:
            sink.write(plaintext[:(bad - done[0][0]) * S])
            raise _failure(engine, done, bad, ends and bad == done[-1][0])
        sink.write(plaintext)


# ============================================================================ random access
class SegmentReader(io.RawIOBase):
    """A read-only, seekable view of a stream's plaintext; reads decrypt only the segments
    they touch (the last one used is cached).

    Opening verifies the header MAC and the final segment (so the size is authentic and
    truncation is caught up front); every other segment is verified when it is read, and
    a bad one raises AuthenticationError from ``read``.
    """

    def __init__(self, src: Any, key: Any, *, device: str = "cpu"):
        super().__init__()
        key = _format.check_key(key)
        if isinstance(src, (str, os.PathLike)):
            self._file, self._owns = builtins.open(src, "rb"), True
        elif hasattr(src, "read") and hasattr(src, "seek"):
            self._file, self._owns = src, False
        else:
            raise TypeError(f"src must be a path or a seekable binary file object, "
                            f"not {type(src).__name__}")
        try:
            self._file.seek(0)
            self.header = _format.parse_header(self._file.read)
            _format.verify_header(key, self.header)
            self._engine = _engine(self.header, key, device, 1, 0)
            C = self.header.segment_size + TAG_SIZE
            payload = self._file.seek(0, io.SEEK_END) - self.header.header_length
            if payload <= 0:
                raise TruncatedError("truncated file: it ends right after the header "
                                     "(no segments)", 0)
            self._segments = -(-payload // C)
            tail = payload - (self._segments - 1) * C
            if tail < TAG_SIZE:
                raise TruncatedError(f"truncated file: it ends inside segment "
                                     f"{self._segments - 1}, {tail} bytes into it", self._segments - 1)
            self.size = payload - self._segments * TAG_SIZE
            self._pos = 0
            self._cached_index, self._cached = -1, b""
            self._load(self._segments - 1)
        except BaseException:
            if self._owns:
                self._file.close()
            raise

    def _load(self, index: int) -> bytes:
        if index == self._cached_index:
            return self._cached
        C = self.header.segment_size + TAG_SIZE
        self._file.seek(self.header.header_length + index * C)
        ct = self._file.read(C)
        last = index == self._segments - 1
        if len(ct) < TAG_SIZE or (not last and len(ct) != C):
            raise TruncatedError(f"truncated file: segment {index} is cut short (the file "
                                 f"changed while open?)", index)
        out = memoryview(bytearray(len(ct) - TAG_SIZE))
        if not self._engine.open_one(index, last, memoryview(ct), out):
            raise _failure(self._engine, [(index, last, memoryview(ct), out)], index, last)
        self._cached_index, self._cached = index, bytes(out)
        return self._cached

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        self._check_open()
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._check_open()
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}.get(whence)
        if base is None:
            raise ValueError(f"invalid whence ({whence!r})")
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def readinto(self, buf) -> int:
        self._check_open()
        view = memoryview(buf).cast("B")
        S = self.header.segment_size
        done = 0
        while done < len(view) and self._pos < self.size:
            index, offset = divmod(self._pos, S)
            plain = self._load(index)
            n = min(len(view) - done, len(plain) - offset)
            view[done:done + n] = plain[offset:offset + n]
            done += n
            self._pos += n
        return done

    def _check_open(self):
        if self.closed:
            raise ValueError("I/O operation on closed file.")

    def close(self) -> None:
        if not self.closed:
            if self._owns:
                self._file.close()
            self._cached = b""
        super().close()


def open(src: Any, key: Any, *, device: str = "cpu") -> SegmentReader:  # noqa: A001
    """A read-only, seekable binary file object over the plaintext of the stream ``src``
    (a path or a seekable binary file object); see :class:`SegmentReader`."""
    return SegmentReader(src, key, device=device)


# ============================================================================ key rotation
def replace_envelope(path: Any, key: Any, envelope: Any, key_id: Any = _KEEP) -> Header:
    """Rewrite the header of the stream at ``path`` with a new envelope (and key id, if
    given; None removes it), copying the segments byte for byte; returns the new header.

    ``key`` must verify the old header MAC (AuthenticationError otherwise) and MACs the
    new one. The segments do not depend on the envelope or key id, so they stay valid.
    Atomic: a temporary file in the same folder, fsync, rename.
    """
    key = _format.check_key(key)
    with builtins.open(path, "rb") as f:
        old = _format.parse_header(f.read)
        _format.verify_header(key, old)
        new_key_id = old.key_id if key_id is _KEEP else key_id
        new_key_id, envelope = _format.check_key_id_envelope(new_key_id, envelope)
        fresh = Header(old.version, old.algorithm, old.segment_size, old.salt, old.nonce_prefix,
                       new_key_id, envelope, b"", 0)
        header, header_bytes = _format.seal_header(key, fresh)
        with AtomicFile(path, mode=os.stat(path).st_mode & 0o7777) as sink:  # keep the file's mode
            sink.write(header_bytes)
            while True:
                chunk = f.read(8 << 20)
                if not chunk:
                    break
                sink.write(chunk)
    return header
