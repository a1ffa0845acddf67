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

- Memory is bounded, whatever the file size: batches of about 8 MiB (at least one
  segment per thread) on the CPU, 64 MiB on the GPU, run by :mod:`gpucrypt.pipeline`
  with two in flight. A regular file into a path: three batch buffers, which the
  workers fill with ``pread`` and write out with ``pwrite`` themselves, sealing or
  opening in place. Any other source or destination: four buffers of input (this
  thread reads one batch ahead, to know which segment is the last) and, to decrypt,
  three of plaintext; an in-memory input (bytes-like) gets buffers no larger than itself,
  made only when used, and is sealed into an ``io.BytesIO`` in place, in the object's own
  buffer. A one-segment input runs in the calling thread.
- Writes to a path are atomic: a temporary file in the same folder, fsync, then
  rename. An existing file at ``dst`` is replaced by that new file, mode 0600 and owned
  by this process's user (the command line asks for ``--force``); the old file's other
  hard links keep its old contents. ``dst`` naming ``src``'s own file is
  refused (``ValueError``). ``decrypt`` to a path renames only after every segment, including the
  one marked last, verified; on any error the temporary file is removed and the
  destination is untouched. A path that is a symbolic link is refused (OSError). A path
  that is a FIFO or a character device (``/dev/null``, a link to one: ``/dev/stdout``) is
  not replaced but written in place, as a file object is (below).
- ``decrypt`` to a file object (or to a FIFO or device path) writes each batch of segments only
  after they verified, and raises on the first bad segment. The file object may then hold the
  plaintext of the segments before it (all verified, but not the whole file): treat it as
  garbage unless ``decrypt`` returned.
- Errors (all in :mod:`gpucrypt.stream`): ``FormatError`` (not a gpucrypt stream,
  malformed header), ``UnsupportedVersion`` (a FormatError), ``AuthenticationError``
  (wrong key or tampered data; an ``InvalidTag``; ``.segment`` says which segment,
  None for the header) and ``TruncatedError`` (an AuthenticationError).
- At most 2**32 segments per stream (16 TiB at 4 KiB segments, 4 PiB at 1 MiB).
"""
from __future__ import annotations

import builtins
import io
import itertools
import operator
import os
import stat
from typing import Any, Iterable

from .. import pipeline
from . import _format
from ._atomic import (AtomicFile, held_exclusively, open_output, open_regular, replace_head,
                      wait_ready)
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
    ``positional()`` gives ``(fd, offset, size)`` when the input is a regular file that
    workers may ``pread`` themselves (no shared position), else None.
    """

    size: int | None = None  # total bytes, when known up front

    def fill(self, buf: memoryview) -> memoryview:
        raise NotImplementedError

    def positional(self) -> tuple[int, int, int] | None:
        return None

    def skip(self, n: int) -> None:
        """Advance past ``n`` bytes that were read positionally."""


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
    def __init__(self, fileobj, close: bool = False, probe: bool = True):
        self._file = fileobj
        self._close = close
        self._readinto = getattr(fileobj, "readinto", None)
        self._fd = None
        if not probe:  # reads only: fileno() is not free (a SpooledTemporaryFile goes to disk)
            return
        try:
            st = os.fstat(fileobj.fileno())
            if stat.S_ISREG(st.st_mode):  # past its end (seek() allows that): nothing left
                self.size = max(st.st_size - fileobj.tell(), 0)
                # only our own kind of file object: a wrapper (a progress bar, say) wants
                # to see every read
                if isinstance(fileobj, (io.FileIO, io.BufferedReader)):
                    self._fd = fileobj.fileno()
        except (AttributeError, OSError, io.UnsupportedOperation, ValueError):
            pass

    def fill(self, buf):
        got = 0
        while got < len(buf):
            if self._readinto is not None:
                n = self._readinto(buf[got:])
            else:
                piece = self._file.read(len(buf) - got)
                if isinstance(piece, str):
                    raise TypeError("the input is a text file: open it in binary mode ('rb')")
                n = None if piece is None else len(piece)
                buf[got:got + (n or 0)] = piece or b""
            if n is None:  # a non-blocking file with no data yet: not the end of the input
                wait_ready(self._file, writing=False)
                continue
            if not n:
                break
            got += n
        return buf[:got]

    def positional(self):
        if self._fd is None:
            return None
        offset = self._file.tell()
        return self._fd, offset, max(os.fstat(self._fd).st_size - offset, 0)

    def skip(self, n):
        self._file.seek(n, io.SEEK_CUR)

    def close(self):
        if self._close:
            self._file.close()


#: the end of an iterable source's chunks
_END = object()


class _IterableSource(_Source):
    def __init__(self, chunks: Iterable[Any]):
        self._chunks = iter(chunks)
        self._left = memoryview(b"")

    def fill(self, buf):
        got = 0
        while got < len(buf):
            if not len(self._left):
                # not None as the end: a None chunk (a non-blocking read's "nothing yet")
                # ended the input there, and the stream sealed was valid and short
                chunk = next(self._chunks, _END)
                if chunk is _END:
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


def _open_source(src: Any, allow_iterable: bool) -> _Source:
    if isinstance(src, (str, os.PathLike)):
        return _FileSource(builtins.open(src, "rb", buffering=0), close=True)
    if isinstance(src, io.TextIOBase):  # its read() gives str, or a decoding error first
        raise TypeError("the input is a text file: open it in binary mode ('rb')")
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


# ============================================================================ segments
class _Segments(_Closing):
    """The segments of one stream as pipeline jobs: their nonces, the per-file AEAD, and the
    runner (a CPU pool or the GPU) that seals or opens them."""

    def __init__(self, header: Header, key: bytes, device: str, threads: int | None,
                 size_hint: int | None, op: str, inline: bool = False):
        backend = select_backend(device, size_hint or 0)
        seg_key = _format.segment_key(key, header)
        # one segment (a small file) has nothing to share out: no pool, no hand-off
        inline = inline or (size_hint is not None and size_hint <= header.segment_size +
                            (TAG_SIZE if op == "open" else 0))
        # XChaCha20: one HChaCha20 subkey per file, not one per segment
        algorithm, self._key, self._head = _format.segment_cipher(
            header.algorithm, seg_key, header.nonce_prefix)
        self.aad = bytes(header.fixed_fields)
        self.S = header.segment_size
        self.on_gpu = backend.name == "gpu"
        self.op = op
        if self.on_gpu:
            self.threads = 1
            self.runner = pipeline.GpuRunner(backend, op, algorithm, self._key)
            self.per_batch = max(1, pipeline.GPU_BATCH_BYTES // self.S)
        else:  # inline: in the caller's thread (a random-access reader's one segment)
            threads = pipeline.cpu_threads(threads)  # checked even where unused
            self.threads = 1 if inline else threads
            ctx = backend.aead(algorithm, self._key)
            crypto = pipeline.seal(ctx) if op == "seal" else pipeline.open_attached(ctx)
            self.runner = pipeline.CpuRunner(crypto, 0 if inline else self.threads)
            per_batch = max(self.threads, pipeline.CPU_BATCH_BYTES // self.S)
            self.per_batch = -(-per_batch // self.threads) * self.threads

    def close(self):
        self.runner.close()

    def nonce(self, index: int, last: bool) -> bytes:
        return _format.segment_nonce(self._head, index, last)

    def job(self, index: int, last: bool, src: Any, slot: memoryview, n: int) -> pipeline.Job:
        """The job for segment ``index`` whose sealed form occupies ``slot`` (its first
        ``n + 16`` bytes): sealing ``n`` plaintext bytes from ``src`` (None: loaded later),
        or opening ``n`` ciphertext-and-tag bytes in place."""
        if index >= MAX_SEGMENTS:
            if self.op == "open":  # a reader that got this far: as _count_segments says
                raise _too_many_segments(index)
            raise OverflowError(f"the input needs more than {MAX_SEGMENTS} segments of "
                                f"{self.S} bytes; use a larger segment_size")
        nonce = self.nonce(index, last)
        if self.op == "seal":
            dst = slot[:n] if self.on_gpu else slot[:n + TAG_SIZE]  # the GPU keeps tags apart
            return pipeline.Job(index, nonce, self.aad, src, dst, size=n)
        pt = slot[:n - TAG_SIZE]
        if self.on_gpu and src is not None:  # the GPU takes the tag apart
            return pipeline.Job(index, nonce, self.aad, src[:n - TAG_SIZE], pt, size=n,
                                tag=bytes(src[n - TAG_SIZE:n]))
        return pipeline.Job(index, nonce, self.aad, src, pt, size=n)

    def open_one(self, index: int, last: bool, ct: memoryview, out: memoryview) -> bool:
        """Open one segment (ciphertext || tag) into ``out`` (zeroed if its tag fails);
        whether it verified. ``ct`` is left as it was."""
        job = self.job(index, last, ct, out, len(ct))
        return self.runner.start(pipeline.Batch([job]))()[0]

    def store_tag(self, slots: dict) -> Any:
        """For the GPU, whose tags come apart: put each tag after its ciphertext."""
        if not self.on_gpu or self.op != "seal":
            return None

        def store(job, tag):
            slots[job.ident][job.size:job.size + TAG_SIZE] = tag
        return store


def _note_device(segs: _Segments, ran_on: list | None) -> None:
    if ran_on is not None:
        ran_on.append("gpu" if segs.on_gpu else "cpu")


# ============================================================================ encrypt
def encrypt(src: Any, dst: Any, key: Any, *, algorithm: str = "chacha20-poly1305",
            segment_size: int = DEFAULT_SEGMENT_SIZE, device: str = "auto",
            key_id: str | None = None, envelope: Any = None, threads: int | None = None,
            _salt: bytes | None = None, _nonce_prefix: bytes | None = None,
            _ran_on: list | None = None) -> Header:
    """Encrypt everything ``src`` holds into ``dst`` as a gpucrypt stream; returns its header.

    ``key``: 32 bytes (the per-file key is derived from it and a random salt).
    ``key_id``/``envelope``: optional header fields, authenticated by the header MAC but
    not bound to the segments (see :func:`replace_envelope`). ``threads``: CPU worker
    threads (default: the usable cores). ``_salt``/``_nonce_prefix`` are for known-answer
    tests only: reusing both under the same key repeats the segment keys and nonces (the
    prefix is drawn fresh otherwise, and enters the key derivation). (``_salt`` is also given by
    :func:`gpucrypt.files.keyed.encrypt_file`, which draws it fresh to bind the envelope to it.)
    ``_ran_on``: a list the device that runs the segments ("cpu" or "gpu") is appended to,
    for an audit event to record it rather than the ``device`` asked for ("auto").
    """
    key = _format.check_key(key)
    _refuse_same_file(src, dst)
    header, header_bytes = _format.new_header(key, algorithm, segment_size, key_id=key_id,
                                              envelope=envelope, salt=_salt,
                                              nonce_prefix=_nonce_prefix)
    with _open_source(src, allow_iterable=True) as source:
        # the output closes (or is removed) only after the workers writing it stopped
        with open_output(dst) as sink, \
                _Segments(header, key, device, threads, source.size, "seal") as segs:
            _note_device(segs, _ran_on)
            sink.write(header_bytes)
            where = source.positional()
            if where is not None and not segs.on_gpu and isinstance(sink, AtomicFile):
                batches = _seal_positional(segs, where, sink)
                pipeline.run(batches, segs.runner, depth=_DEPTH)
                _check_unchanged(where)
                source.skip(where[2])
            else:
                pipeline.run(_seal_sequential(segs, source, sink), segs.runner, depth=_DEPTH)
    return header


#: batches started and not finished while the next is prepared
_DEPTH = 2


def _batch_ranges(count: int, per_batch: int):
    for first in range(0, count, per_batch):
        yield first, min(count, first + per_batch)


def _seal_positional(segs: _Segments, where, sink):
    """Batches for a regular input file and a file output (the header written already):
    each worker reads its segments with pread straight into their places in its batch
    buffer, seals them in place and writes them with pwrite; nothing passes through this
    thread."""
    fd, offset, size = where
    S, C = segs.S, segs.S + TAG_SIZE
    count = max(1, -(-size // S))
    if count > MAX_SEGMENTS:
        raise OverflowError(f"the input needs more than {MAX_SEGMENTS} segments of {S} "
                            f"bytes; use a larger segment_size")
    slot = _slot_stride(C)
    buffer = _batch_buffers(_DEPTH + 1, min(count, segs.per_batch) * slot)
    out_fd = sink.fileno()
    base = _write_position(out_fd)

    for k, (first, end) in enumerate(_batch_ranges(count, segs.per_batch)):
        buf, jobs = buffer(k), []
        for i in range(first, end):
            n = min(S, size - i * S)
            jobs.append(segs.job(i, i == count - 1, None, buf[(i - first) * slot:], n))

        def load(job, buf=buf, first=first):
            plain = buf[(job.ident - first) * slot:][:job.size]
            try:
                _format.read_at(fd, offset + job.ident * S, plain, "the input file")
            except TruncatedError:
                raise _input_changed("shrank") from None
            return plain

        def store(job, _):
            pipeline.pwrite_all(out_fd, job.dst, base + job.ident * C)

        yield pipeline.Batch(jobs, load=load, store=store)


def _write_position(fd: int) -> int:
    """Where the segments of an output go: its current position, after the header and
    after whatever a caller's own AtomicFile held before (pwrite ignores the position)."""
    return os.lseek(fd, 0, os.SEEK_CUR)


def _input_changed(how: str) -> ValueError:
    return ValueError(f"the input file {how} while it was being encrypted; encrypt a copy "
                      f"that nothing writes to")


def _check_unchanged(where) -> None:
    fd, offset, size = where
    if os.pread(fd, 1, offset + size):
        raise _input_changed("grew")


def _read_pieces(source: _Source, buf: memoryview, count: int, stride: int, size: int) -> list:
    """Up to ``count`` pieces of ``size`` bytes read into ``buf`` every ``stride`` bytes
    (a segment's place in a batch buffer); the last may be short (the end of the input)."""
    pieces = []
    for j in range(count):
        piece = source.fill(buf[j * stride:j * stride + size])
        if not len(piece):
            break
        pieces.append(piece)
        if len(piece) < size:
            break
    return pieces


def _in_memory_segments(source: _Source, stride: int) -> int | None:
    """How many segments (of ``stride`` input bytes) an in-memory input holds, whose size
    is exact; None for other inputs."""
    if not isinstance(source, _BufferSource):
        return None
    return max(1, -(-source.size // stride))


#: where the workers ``pread`` into a batch buffer (a positional batch's segments, each
#: written out on its own), every segment starts on this boundary: the kernel's copy into
#: a destination only 16-byte aligned (segments back to back, ``segment_size + 16`` apart)
#: cost about 40% more system time than into a 64-byte aligned one (measured here:
#: 0.20-0.23 s against 0.12-0.17 s per GiB read from /dev/shm)
_SLOT_ALIGN = 64


def _slot_stride(nbytes: int) -> int:
    """``nbytes`` rounded up to :data:`_SLOT_ALIGN`: the distance between slots."""
    return -(-nbytes // _SLOT_ALIGN) * _SLOT_ALIGN


def _batch_buffers(count: int, nbytes: int):
    """``buffer(k)``: batch k's buffer, ``count`` of ``nbytes`` taken in turn, each made on
    first use (an input of one batch makes one)."""
    made: dict = {}

    def buffer(k: int) -> memoryview:
        if k % count not in made:
            made[k % count] = pipeline.scratch(nbytes)
        return made[k % count]
    return buffer


def _seal_sequential(segs: _Segments, source: _Source, sink):
    """Batches for any other input: this thread reads batch k+1 (straight into the
    segments' places in its buffer) while the workers seal batch k, so that batch k
    knows whether it holds the last segment; sealed batches are written in order, one
    write each. An in-memory input has its batches sized to it, and into an
    ``io.BytesIO`` (``sink.room``) its segments are sealed in place, in the object's own
    buffer."""
    S, C, B = segs.S, segs.S + TAG_SIZE, segs.per_batch
    count = _in_memory_segments(source, S)
    room = None
    if count is not None:
        B = min(B, count)
        if hasattr(sink, "room"):
            room = sink.room(source.size + count * TAG_SIZE)
    if room is not None:
        def buffer(k):  # every batch before k was full
            return room[k * B * C:]

        def write(batch, _):
            pass
    else:
        buffer = _batch_buffers(_DEPTH + 2, B * C)

        def write(batch, _):
            sink.write(batch.payload)

    def read(buf):
        return _read_pieces(source, buf, B, C, S)

    first, k = 0, 0
    pieces = read(buffer(0))
    while True:
        full = len(pieces) == B and len(pieces[-1]) == S
        following = read(buffer(k + 1)) if full else []
        final = not following
        buf = buffer(k)
        if not pieces:  # an empty input is one empty segment
            pieces = [buf[:0]]
        slots = {first + j: buf[j * C:(j + 1) * C] for j in range(len(pieces))}
        jobs = [segs.job(first + j, final and j == len(pieces) - 1, piece, slots[first + j],
                         len(piece)) for j, piece in enumerate(pieces)]
        used = (len(pieces) - 1) * C + len(pieces[-1]) + TAG_SIZE
        yield pipeline.Batch(jobs, store=segs.store_tag(slots), done=write, payload=buf[:used])
        if final:
            return
        first, pieces, k = first + len(pieces), following, k + 1


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
    if hasattr(src, "read"):  # through a source: it waits when a non-blocking read says "nothing yet"
        return _parse_source_header(_FileSource(src, probe=False))
    try:
        view = memoryview(src).cast("B")
    except TypeError:
        raise TypeError(f"src must be a path, a binary file object or bytes-like, "
                        f"not {type(src).__name__}") from None
    return _parse_source_header(_BufferSource(view))  # no copy of the data behind it


def _header_and_whole(src: Any) -> tuple[Header, Any]:
    """The header of the stream ``src`` (anything :func:`decrypt` takes), without a key,
    and what to give :func:`decrypt` for the whole stream then: ``src`` itself, rewound
    to where it was, when it can be; else the header's bytes put back in front of the
    rest (a pipe, a read-only object, an iterable of chunks: what was read is gone)."""
    if isinstance(src, (str, os.PathLike)):
        return read_header(src), src
    if hasattr(src, "read"):
        if getattr(src, "seekable", lambda: False)():
            start = src.tell()
            header = read_header(src)
            src.seek(start)
            return header, src
        header = read_header(src)
        return header, _after_header(header, src)
    try:
        memoryview(src)
    except TypeError:
        if hasattr(src, "__iter__"):
            chunks = iter(src)
            source = _IterableSource(chunks)
            header = _parse_source_header(source)
            return header, itertools.chain([_format.encode_header(header), source._left], chunks)
    return read_header(src), src  # bytes-like, read again from its start (or the TypeError)


def _after_header(header: Header, src: Any) -> Iterable[bytes]:
    """The whole stream again from a file object that cannot be rewound and whose header
    :func:`read_header` took: that header's bytes, then the rest as it arrives."""
    yield _format.encode_header(header)
    has_read1 = hasattr(src, "read1")
    read = src.read1 if has_read1 else src.read
    while True:
        chunk = read(1 << 20)
        if not chunk and has_read1:
            # read1 gives b"" for a non-blocking file with no data yet, as at its end;
            # read tells them apart (None, b"")
            chunk = src.read(1 << 20)
        if chunk is None:  # a non-blocking file with no data yet: not the end
            wait_ready(src, writing=False)
            continue
        if not chunk:
            return
        yield chunk


def _parse_source_header(source: _Source) -> Header:
    def read(n):
        return bytes(source.fill(memoryview(bytearray(n))))

    return _format.parse_header(read)


def decrypt(src: Any, dst: Any, key: Any, *, device: str = "auto",
            threads: int | None = None, _ran_on: list | None = None) -> Header:
    """Decrypt the gpucrypt stream ``src`` into ``dst``; returns its (verified) header.

    The header MAC is checked first (a wrong key fails there, before any segment).
    See the module docstring for what ``dst`` holds when an error is raised.
    ``_ran_on``: as :func:`encrypt`'s.
    """
    key = _format.check_key(key)
    _refuse_same_file(src, dst)
    with _open_source(src, allow_iterable=True) as source:
        header = _parse_source_header(source)
        _format.verify_header(key, header)
        size_hint = None if source.size is None else source.size - header.header_length
        with open_output(dst) as sink, \
                _Segments(header, key, device, threads, size_hint, "open") as segs:
            _note_device(segs, _ran_on)
            where = source.positional()
            if where is not None and not segs.on_gpu and isinstance(sink, AtomicFile):
                pipeline.run(_open_positional(segs, where, sink), segs.runner, depth=_DEPTH)
                source.skip(where[2])
            else:
                pipeline.run(_open_sequential(segs, source, sink), segs.runner, depth=_DEPTH)
    return header


def _refuse_same_file(src: Any, dst: Any) -> None:
    """ValueError when the paths ``src`` and ``dst`` name one file: the result would replace
    its own input (``decrypt("d.gc", "d.gc", key)`` put the plaintext where the only
    ciphertext was), almost always a slip. Replacing a file by its own encryption is two
    steps: write elsewhere, then rename."""
    if not isinstance(src, (str, os.PathLike)) or not isinstance(dst, (str, os.PathLike)):
        return
    try:
        same = os.path.samefile(src, dst)
    except OSError:  # dst does not exist yet (or src is missing: opening it says so)
        return
    if same:
        raise ValueError(f"src and dst are the same file ({os.fspath(dst)}): the output would "
                         f"replace its own input; write to another path (and rename it over "
                         f"the input afterwards if that is what you want)")


def _truncated_inside(index: int, got: int) -> TruncatedError:
    return TruncatedError(f"truncated file: it ends inside segment {index}, {got} bytes into "
                          f"it (shorter than its tag)", index)


def _no_segments() -> TruncatedError:
    return TruncatedError("truncated file: it ends right after the header (no segments)", 0)


def _count_segments(payload: int, C: int) -> int:
    """How many segments ``payload`` bytes of sealed ``C``-byte segments hold (the last may
    be cut). More than a stream can index is data appended to a file (a sparse one costs
    nothing to make): said as such, not as the encoder's OverflowError, which told the
    reader to choose a larger segment size."""
    count = -(-payload // C)
    if count > MAX_SEGMENTS:
        raise _too_many_segments(MAX_SEGMENTS)
    return count


def _too_many_segments(index: int) -> AuthenticationError:
    return AuthenticationError(f"the file holds more than {MAX_SEGMENTS} segments, more than a "
                               f"stream can: data appended", index)


def _open_positional(segs: _Segments, where, sink):
    """Batches for a regular input file and a file output: each worker reads its
    segments with pread, opens them in place and writes the plaintext of those that
    verified with pwrite. The output is a temporary file, renamed into place only when
    every segment verified."""
    fd, offset, payload = where
    S, C = segs.S, segs.S + TAG_SIZE
    if payload <= 0:
        raise _no_segments()
    count = _count_segments(payload, C)
    tail = payload - (count - 1) * C
    whole = count if tail >= TAG_SIZE else count - 1  # a cut tag: the segments before it first
    slot = _slot_stride(C)
    buffer = _batch_buffers(_DEPTH + 1, min(count, segs.per_batch) * slot)
    out_fd = sink.fileno()
    base = _write_position(out_fd)

    def store(job, _):
        pipeline.pwrite_all(out_fd, job.dst, base + job.ident * S)

    for k, (first, end) in enumerate(_batch_ranges(whole, segs.per_batch)):
        buf = buffer(k)
        jobs = [segs.job(i, i == count - 1, None, buf[(i - first) * slot:],
                         C if i < count - 1 else tail) for i in range(first, end)]

        def load(job, buf=buf, first=first):
            ct = buf[(job.ident - first) * slot:][:job.size]
            _format.read_at(fd, offset + job.ident * C, ct, "the input file")
            return ct

        def done(batch, results, first=first):
            def sealed_of(j):  # a failed segment was wiped in place: read it again
                job = batch.jobs[j]
                again = memoryview(bytearray(job.size))
                _format.read_at(fd, offset + job.ident * C, again, "the input file")
                return again
            _check_batch(segs, batch, results, sealed_of)

        yield pipeline.Batch(jobs, load=load, store=store, done=done)
    if whole < count:
        raise _truncated_inside(count - 1, tail)


def _check_batch(segs: _Segments, batch, results, sealed_of, plaintext=None, sink=None) -> None:
    """Raise for the first segment of ``batch`` that failed (``sealed_of(j)``: the sealed
    bytes of its job ``j``), after writing the verified ones before it to ``sink`` (a
    sequential output, ``plaintext`` the batch's; None when the workers wrote them
    already); without a failure, write the batch's ``plaintext`` to ``sink``."""
    for j, ok in enumerate(results):
        if not ok:
            if sink is not None:
                sink.write(plaintext[:j * segs.S])
            job = batch.jobs[j]
            raise _failure(segs, job.ident, sealed_of(j), job.nonce == segs.nonce(job.ident, True))
    if sink is not None:
        sink.write(plaintext)


def _open_sequential(segs: _Segments, source: _Source, sink):
    """Batches for any other input or output: this thread reads batch k+1 (each segment
    into its place in the batch's buffer) while the workers open batch k into a plaintext
    buffer; a batch is written, in order and in one write, once all its segments
    verified, and on the first failure the verified segments before it are written and
    the error raised."""
    S, C, B = segs.S, segs.S + TAG_SIZE, segs.per_batch
    count = _in_memory_segments(source, C)
    if count is not None:
        B = min(B, count)
    in_buffer = _batch_buffers(_DEPTH + 2, B * C)
    out_buffer = _batch_buffers(_DEPTH + 1, B * S)

    def read(buf):
        return _read_pieces(source, buf, B, C, C)

    def done_for(pieces, plaintext):
        return lambda batch, results: _check_batch(segs, batch, results, pieces.__getitem__,
                                                   plaintext, sink)

    first, k = 0, 0
    pieces = read(in_buffer(0))
    if not pieces:
        raise _no_segments()
    while True:
        full = len(pieces) == B and len(pieces[-1]) == C
        following = read(in_buffer(k + 1)) if full else []
        final = not following
        cut = None
        if len(pieces[-1]) < TAG_SIZE:  # the segments before it are opened first, as not last
            cut = _truncated_inside(first + len(pieces) - 1, len(pieces[-1]))
            pieces, final = pieces[:-1], False
            if not pieces:
                raise cut
        out = out_buffer(k)
        jobs = [segs.job(first + j, final and j == len(pieces) - 1, piece, out[j * S:], len(piece))
                for j, piece in enumerate(pieces)]
        used = sum(len(p) - TAG_SIZE for p in pieces)
        yield pipeline.Batch(jobs, done=done_for(pieces, out[:used]))
        if cut is not None:
            raise cut
        if final:
            return
        first, pieces, k = first + len(pieces), following, k + 1


def _failure(segs: _Segments, index: int, sealed: memoryview, last: bool) -> AuthenticationError:
    """The error for segment ``index`` (its sealed bytes ``sealed``, opened as the last
    segment or not) failing: retry it with the other last flag to tell truncation and
    splicing from tampering."""
    scratch = memoryview(bytearray(len(sealed) - TAG_SIZE))
    if segs.open_one(index, not last, sealed, scratch):
        if last:
            return TruncatedError(f"truncated file: it ends after segment {index}, which is not "
                                  f"the last segment (whole segments are missing)", index)
        return AuthenticationError(f"segment {index} is marked as the last segment but more data "
                                   f"follows (data appended or segments spliced)", index)
    if last:
        return AuthenticationError(f"segment {index}, the final one in the file, failed "
                                   f"authentication: tampered data, the file cut inside this "
                                   f"segment, segments dropped, duplicated or reordered before "
                                   f"it, or data from another file", index)
    return AuthenticationError(f"segment {index} failed authentication: tampered, reordered, "
                               f"dropped or duplicated segments, or data from another file",
                               index)


# ============================================================================ random access
class SegmentReader(io.RawIOBase):
    """A read-only, seekable view of a stream's plaintext; reads decrypt only the segments
    they touch (the last one used is cached).

    Opening verifies the header MAC and the final segment (so the size is authentic and
    truncation is caught up front); every other segment is verified when it is read, and
    a bad one raises AuthenticationError from ``read``. ``segments_decrypted`` counts the
    segments opened so far (the final one included; a cached segment is not opened again).

    ``key``: the stream's 32-byte key; or, for a file sealed for recipients or a keyset
    (:func:`gpucrypt.keys.encrypt_file`), ``identity`` (one or several) and/or ``keyset``,
    which unwrap its data key from the header's envelope.
    """

    def __init__(self, src: Any, key: Any = None, *, device: str = "cpu", keyset: Any = None,
                 identity: Any = None):
        super().__init__()
        # what close() needs, before anything can raise: a failed open is still closed
        # (by IOBase's finaliser)
        self._owns, self._cached = False, b""
        keyed = key is None or keyset is not None or identity is not None
        if not keyed:
            key = _format.check_key(key)
        if isinstance(src, (str, os.PathLike)):
            # non-blocking: a FIFO's open waited for a writer forever before it was refused
            self._file = open_regular(src, lambda kind: _not_random_access(
                f"{os.fspath(src)} is a {kind}"), block_devices=True)
            self._owns = True
        elif isinstance(src, io.TextIOBase):
            raise TypeError("src is a text file: open it in binary mode ('rb')")
        elif hasattr(src, "read") and hasattr(src, "seek"):
            if not getattr(src, "seekable", lambda: True)():  # a pipe's tell(): "Illegal seek"
                raise _not_random_access("src cannot seek (a pipe?)")
            self._file, self._owns = src, False
        else:
            raise TypeError(f"src must be a path or a seekable binary file object, "
                            f"not {type(src).__name__}")
        opened_by = None  # the envelope stanza that opened a keyed file: audited below
        try:
            # the stream starts at the file's position, as read_header and decrypt take it
            start = self._file.tell()
            try:
                self.header = _format.parse_header(self._file.read)
            except StreamError as exc:
                if start:  # earlier versions rewound: say where this one read from
                    exc.args = (f"{exc.args[0]} (read from byte {start}, the file's position: "
                                f"the stream is taken from there; seek to where it starts, "
                                f"e.g. seek(0), before opening it)",) + exc.args[1:]
                raise
            if keyed:
                from .keyed import file_key  # key management: loaded at first use

                key, opened_by = file_key(lambda: self.header, key, keyset, identity)
            _format.verify_header(key, self.header)
            self._segs = _Segments(self.header, key, device, 1, 0, "open", inline=True)
            C = self.header.segment_size + TAG_SIZE
            self._data_start = start + self.header.header_length
            payload = self._file.seek(0, io.SEEK_END) - self._data_start
            if payload <= 0:
                raise TruncatedError("truncated file: it ends right after the header "
                                     "(no segments)", 0)
            self._segments = _count_segments(payload, C)
            tail = payload - (self._segments - 1) * C
            if tail < TAG_SIZE:
                raise TruncatedError(f"truncated file: it ends inside segment "
                                     f"{self._segments - 1}, {tail} bytes into it", self._segments - 1)
            self.size = payload - self._segments * TAG_SIZE
            self._pos = 0
            self._cached_index, self._cached = -1, b""
            self.segments_decrypted = 0
            self._load(self._segments - 1)
        except BaseException as exc:
            if self._owns:
                self._file.close()
            if opened_by is not None:
                from .keyed import audit_keyed_open

                audit_keyed_open("file.open", src, opened_by, exc)
            raise
        if opened_by is not None:  # once the header and the final segment verified
            from .keyed import audit_keyed_open

            audit_keyed_open("file.open", src, opened_by)

    def _load(self, index: int) -> bytes:
        if index == self._cached_index:
            return self._cached
        C = self.header.segment_size + TAG_SIZE
        self._file.seek(self._data_start + index * C)
        ct = _format.read_up_to(self._file.read, C)  # a raw file may return less per read
        last = index == self._segments - 1
        if len(ct) < TAG_SIZE or (not last and len(ct) != C):
            raise TruncatedError(f"truncated file: segment {index} is cut short (the file "
                                 f"changed while open?)", index)
        out = memoryview(bytearray(len(ct) - TAG_SIZE))
        self.segments_decrypted += 1
        if not self._segs.open_one(index, last, memoryview(ct), out):
            raise _failure(self._segs, index, memoryview(ct), last)
        self._cached_index, self._cached = index, bytes(out)
        return self._cached

    # as io.FileIO: the questions of a closed file are ValueError, writing is unsupported
    def readable(self) -> bool:
        self._check_open()
        return True

    def seekable(self) -> bool:
        self._check_open()
        return True

    def writable(self) -> bool:
        self._check_open()
        return False

    def write(self, data: Any) -> int:
        self._check_open()
        raise io.UnsupportedOperation("write: a SegmentReader is read-only")

    def read(self, size: int | None = -1) -> bytes:
        return super().read(-1 if size is None else size)

    def tell(self) -> int:
        self._check_open()
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._check_open()
        # an integer now, as FileIO takes it (a float was kept, and failed at the next read)
        offset, whence = operator.index(offset), operator.index(whence)
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
        start = self._pos
        while done < len(view) and self._pos < self.size:
            index, offset = divmod(self._pos, S)
            try:
                plain = self._load(index)
            except BaseException:  # noqa: B036 (a bad segment, an I/O error, Ctrl-C)
                # a read that raises reads nothing: the position had moved past the bytes
                # of earlier segments, which the caller never got. (Not a short read of
                # them: readers of files, pyarrow's, take a short read as the file's end.)
                self._pos = start
                raise
            n = min(len(view) - done, len(plain) - offset)
            view[done:done + n] = plain[offset:offset + n]
            done += n
            self._pos += n
        return done

    def readline(self, size: int | None = -1) -> bytes:
        """The next line (up to and including ``b"\\n"``; the last one may lack it), at most
        ``size`` bytes where ``size`` >= 0; ``b""`` at the end. Searched in the verified
        plaintext of the segments it spans (IOBase's would read one byte per call, each
        a ``readinto``); a segment that fails raises, and the position stays where the
        line started, as ``readinto``'s does: no byte of a line is returned unless every
        segment it touches verified. Iterating the file reads its lines through this."""
        self._check_open()
        size = -1 if size is None else operator.index(size)
        S = self.header.segment_size
        start, parts, left = self._pos, [], size
        try:
            while left != 0 and self._pos < self.size:
                index, offset = divmod(self._pos, S)
                plain = self._load(index)
                stop = len(plain) if left < 0 else min(len(plain), offset + left)
                newline = plain.find(b"\n", offset, stop)
                end = stop if newline < 0 else newline + 1
                parts.append(plain[offset:end])
                self._pos += end - offset
                if left > 0:
                    left -= end - offset
                if newline >= 0:
                    break
        except BaseException:  # noqa: B036 (a bad segment, an I/O error, Ctrl-C)
            self._pos = start
            raise
        return b"".join(parts)

    def _check_open(self):
        if self.closed:
            raise ValueError("I/O operation on closed file.")

    def close(self) -> None:
        if not self.closed:
            if self._owns:
                self._file.close()
            self._cached = b""
        super().close()


def _not_random_access(what: str) -> io.UnsupportedOperation:
    return io.UnsupportedOperation(f"{what}: stream.open reads at any position, so it needs a "
                                   f"regular file (or a block device); read a pipe or a "
                                   f"character device once, in order, with stream.decrypt")


def open(src: Any, key: Any = None, *, device: str = "cpu", keyset: Any = None,  # noqa: A001
         identity: Any = None) -> SegmentReader:
    """A read-only, seekable binary file object over the plaintext of the stream ``src``
    (a path, or a seekable binary file object read from its current position), opened
    with ``key`` or with ``identity``/``keyset``; see :class:`SegmentReader`."""
    return SegmentReader(src, key, device=device, keyset=keyset, identity=identity)


# ============================================================================ key rotation
def replace_envelope(path: Any, key: Any, envelope: Any, key_id: Any = _KEEP) -> Header:
    """Rewrite the header of the stream at ``path`` with a new envelope (and key id, if
    given; None removes it), copying the segments byte for byte; returns the new header.

    ``key`` must verify the old header MAC (AuthenticationError otherwise) and MACs the
    new one. The segments do not depend on the envelope or key id, so they stay valid.
    Atomic: a temporary file in the same folder, fsync, rename. A symbolic link is
    followed: the file it points to is rewritten and the link stays. The file is held
    under its ``flock`` from the read to the rename, so rewrites and rekeys of it
    (:func:`gpucrypt.keys.rekey_file`) from any process take turns, each reading what
    the one before wrote.
    """
    key = _format.check_key(key)
    # non-blocking, regular files only: a FIFO's open waited for a writer forever; held
    # until the rename, so that a rewrite (a rekey's) overlapping this one cannot publish
    # the file it read after this one, undoing it
    with held_exclusively(os.path.realpath(path), lambda kind: ValueError(
            f"{os.fspath(path)} is a {kind}: a header is rewritten where the file lies, so it "
            f"must be a regular file"), required_as=path) as f:
        old = _format.parse_header(f.read)
        _format.verify_header(key, old)
        new_key_id = old.key_id if key_id is _KEEP else key_id
        new_key_id, envelope = _format.check_key_id_envelope(new_key_id, envelope)
        fresh = Header(old.version, old.algorithm, old.segment_size, old.salt, old.nonce_prefix,
                       new_key_id, envelope, b"", 0)
        header, header_bytes = _format.seal_header(key, fresh)
        replace_head(path, f, header_bytes)
    return header
