"""An fsspec filesystem of gpucrypt stream files: pandas, pyarrow and Ray read encrypted data in place.

``gpucrypt`` wraps any other fsspec filesystem (its *target*) and shows the plaintext of
the gpucrypt stream files stored there::

    pd.read_parquet("gpucrypt::file:///data/train.parquet.gc",
                    storage_options={"gpucrypt": {"keyset": "/keys/team.json"}})
    fs = fsspec.filesystem("gpucrypt", target_protocol="s3", keyset="/keys/team.json")
    pq.read_table("bucket/train.parquet.gc", filesystem=fs, columns=["label"])

It is registered under the protocol ``gpucrypt`` through the ``fsspec.specs`` entry point.
Paths are the target's paths, unchanged (no suffix is added or removed).

Contract:

- **Keys by reference.** ``keyset=``, ``identities=`` and ``recipients=`` are
  :class:`~gpucrypt.keys.portable.KeyReferences` (paths to key files, provider-backed
  keys, or URI references), resolved in the process that uses them. fsspec pickles a
  filesystem as its constructor arguments, so an instance sent to a worker carries no
  secret; objects holding key material are refused when the filesystem is made. That
  refusal is a check of known types (key bytes, a loaded ``Keyset``, ``KeysetKey`` or
  ``Identity``, a ``WrappingKey`` made from bytes, a ``FileKeyProvider``): any other
  object with ``get_key`` is taken as a provider, and whatever it holds (a key it was
  given, a cache) travels in the pickle. A provider of your own must hold where its keys
  are, not the keys. Key paths given relative are made absolute when the filesystem is
  made (its token and its pickle carry the absolute path): an ``os.chdir`` later does
  not switch keysets.
- **One instance per key text; key files are watched.** fsspec hands back a cached
  instance for arguments that print alike. A filesystem is cached (and
  ``fsspec.filesystem(...)``, pandas and pyarrow calls share it) only when every key
  reference is text (a path, a key URI, a ``KeyReferences`` of those), whose text names
  the key whole; a filesystem given key objects (a provider-backed ``WrappingKey``, a
  ``Recipient``, a provider, anything with ``resolve()``) is a new instance on every
  call, so two objects that print alike never share one, and has a token of its own: it
  equals (``==``, ``hash``, dask's token, pyarrow's ``equals``) only itself. Key
  arguments given explicitly win over fsspec's config (``fsspec.config.conf``,
  ``FSSPEC_GPUCRYPT_KEYSET=...``), ``None`` and ``[]`` included (``keyset=None`` with
  identities: read only, whatever keyset the config names), and replace the config's
  keys whole: ``keys=`` (``keys=None`` too) drops the config's ``keyset``,
  ``identities``, ``recipients`` and ``passphrase_env``, and any of those drops the
  config's ``keys``; left out, the config's apply. Keys are resolved on first use and
  again whenever a key file they name (a keyset, identity or recipient file, a
  ``file:`` URI's keyset) has changed since (its inode, size, or modification or change
  time): a keyset rotated on disk reaches the next file written or opened, by a new
  filesystem call or by one kept from before. The cost: one ``os.stat`` per key file
  each time a file is written or opened, and a sealed keyset is unsealed (scrypt) once
  per instance and again only when its file changes. A file that is removed fails the
  next write or open (``KeysetError``) rather than keep using what it held.
- **Reads are random access.** ``open(path, "rb")`` verifies the header MAC and the final
  segment (the size is authentic, truncation is caught up front); ``seek``/``read``,
  ``cat_file`` and ``cat_ranges`` then decrypt only the segments they touch. A segment
  that fails raises :class:`~gpucrypt.stream.AuthenticationError` (or
  ``TruncatedError``), its message starting with the file's path; no byte of it is
  returned. ``on_error`` of ``cat`` and ``cat_ranges`` (and so of a mapper's
  ``getitems``, zarr's reads) applies only to a missing file (``FileNotFoundError``,
  ``IsADirectoryError``, ``NotADirectoryError``, what fsspec's mappers take for a
  missing key): anything else raises whatever it says, such a failure, a file that is
  not a stream, a malformed envelope (``EnvelopeError``, its message starting with the
  file's path too), keys that cannot be loaded or reached (``KeysetError``,
  ``KeyUnavailable``, ``KeyProviderError``; a key provider's own error, such as a KMS
  that is down raising ``ConnectionError`` or ``TimeoutError``, becomes a
  ``KeyProviderError`` chained from it) and a file for other keys
  (``NoMatchingRecipient``); the key errors' messages start with the file's path too.
  A ``PermissionError`` of the target raises as well, where plain fsspec's ``cat``
  leaves it out under ``on_error="omit"``: a read refused is not a file missing, and
  left out it would read as one (a zarr chunk as its fill value). On S3 without
  ``s3:ListBucket`` a missing key answers 403 (``PermissionError``) too, so there a
  missing file raises rather than being left out: grant ``s3:ListBucket`` to have it
  answer 404 (``FileNotFoundError``). :func:`stats` counts the segments decrypted.
  Readers are independent of each other, in threads too: over ``memory://``, whose
  ``open`` hands every caller one shared file object, they read by range (``cat_file``)
  instead, so there a file replaced while a reader is open fails its next read (a local
  reader keeps reading the file it opened, unless it is rewritten in place); the error
  then says that the file changed since it was opened, and to open it again.
- **Sizes are plaintext sizes.** ``info``/``ls`` read each file's header (a few KiB)
  and report the size of its plaintext; a file that is not a gpucrypt stream keeps its
  stored size and gets ``"encrypted": False`` (opening it raises ``FormatError``); a
  stream cut inside its header or a segment's tag keeps its stored size and gets
  ``"truncated": True`` (listing, ``exists``, ``find``, ``glob`` and ``du`` work;
  opening it raises ``TruncatedError``). A file whose header cannot be read (an
  ``OSError``) keeps its stored size with ``"encrypted": None``; one gone between the
  listing and its header read is left out of ``ls``, as are gpucrypt's own temporary files
  (``.*.gpucrypt-tmp``: look for leftovers through the target, ``fs.fs``).
- **Writes are whole files, published at once.** ``open(path, "wb")`` keeps the
  plaintext in memory and seals it on ``close`` under a fresh data key wrapped for the
  recipients and/or the keyset's primary. ``algorithm``, ``segment_size`` and
  ``device`` are the filesystem's, or given to ``open`` for one file; both are checked
  where they are given, before a byte is written. So are the keys (identities only:
  ``ValueError``) and, on a local target, the path (a folder: ``IsADirectoryError``; a
  missing folder: ``FileNotFoundError``, or made where the target has ``auto_mkdir=True``,
  as its own writes do), and any other keyword argument of a write (``open(...,
  "wb")``, ``pipe_file``, ``put_file``): one that neither fsspec's ``open`` nor the
  target's methods name (``block_size``, ``cache_type``, ...: taken, and unused) raises
  ``TypeError``, so that a misspelt ``algoritm=`` cannot seal with the default. A
  local target gets the write through :mod:`gpucrypt.files._atomic` (temporary file in
  the same folder, fsync, rename), and so does ``cp_file``; any other target gets a
  temporary name in the same folder, then ``mv`` over the path (a rename where the
  target has one, a copy of the whole object on object stores: readers see the
  old file or the new one; a copy then a removal for a name holding ``*``, ``?`` or
  ``[``, which fsspec's ``mv`` takes as a pattern: :func:`move_exactly`). There a path
  that is a folder is refused
  (``IsADirectoryError``, checked before the ``mv``) and a ``mv`` that leaves no file at
  the path raises. ``"xb"`` is refused: ``pipe_file``/``put_file`` take
  ``mode="create"``. Open files are not pickled (``TypeError``): they hold plaintext.
  The audit event of a write (``file.encrypt``, :mod:`gpucrypt.audit`) is written once
  the file is at its path: "ok" after the move, "error" when the sealing or the move
  failed (or, for a ``put_file`` staged in a transaction, when the transaction was
  discarded). In a transaction that is at its end: an audit log that cannot take an
  event there stops the commit after that file, as a failed publish does (the files
  before it published, the rest dropped), where the event written at the sealing had
  failed the ``put_file`` itself.
- **Only a successful close publishes.** Nothing is published (the old file stays) when
  a ``with`` block is left by an exception, when ``close`` runs while an exception is
  propagating (text mode, ``compression=`` and writers such as pandas close the file on
  their way out of a failure), when ``discard()`` is called, or when a writer is dropped
  without being closed, or closed by the finaliser of one of :mod:`io`'s wrappers
  (``TextIOWrapper``, ``BufferedWriter``) collected unclosed, which tell the file so.
  A ``close`` inside an ``except`` clause therefore discards too, unless the file was
  opened inside that clause; call ``commit()`` there to publish. Opened there, it is
  discarded all the same when that exception, raised again, leaves a ``with`` block of
  the writer or of ``fsspec.open``/``open_files``. Raised again and closed otherwise
  (a plain ``f.close()`` in a ``finally:``, ``contextlib.closing``, an ``ExitStack``
  callback), the close cannot be told from one after the exception was raised and
  caught again inside the clause (a helper that sorts exceptions by raising them), and
  publishes: write there in the writer's own ``with`` block, or call ``discard()``.
  Not caught either: a close by the finaliser of another library's writer that was left
  unclosed after a failure that has since been handled (pyarrow's ``ParquetWriter``,
  collected after a job failed between batches, writes its footer and closes the file:
  what was written so far is published). Such a close looks, to the file, exactly like
  a successful one, so close those writers yourself: in a ``with`` block (``with
  pq.ParquetWriter(path, schema, filesystem=fs) as w:``), or call the gpucrypt file's
  ``discard()`` when the job fails.
  Inside ``with fs.transaction:`` (``autocommit=False``) ``close`` stages the file and
  the transaction publishes it (``commit``) or drops it (``discard``), file by file: a
  publish that fails part-way leaves the files before it published. A publish that
  fails (an error of the target) raises and keeps the plaintext: a later ``close()``
  does nothing, as any file's, and ``commit()`` publishes it or raises again. Large files
  are better written with :func:`gpucrypt.stream.encrypt`, which streams.
- **A file is not bound to its path.** Every file is authenticated on its own (header,
  every segment, its length), but nothing in it names the path it was written to, so
  files under the same keys can be swapped or renamed by someone with write access to
  the target, undetected: ``labels_train.gc`` may come back with ``labels_test.gc``'s
  content, or an older version of itself (rollback). That is also what lets ``cp`` and
  ``mv`` copy or move the stored bytes as they are. Where it matters, keep a list of
  the files with their digests where the reader can trust it, or use one keyset per
  dataset (a file from another keyset fails with ``NoMatchingRecipient``).
- Data keys unwrapped from envelopes are kept (by envelope) in the instance, never
  pickled, until the key files change.
- **No cache above gpucrypt.** fsspec's caching filesystems over gpucrypt
  (``filecache::``, ``simplecache::``, ``blockcache::gpucrypt::...``) would keep the
  plaintext on disk in their cache folder: reading through them is refused
  (``ValueError``), also through ``dir::`` between them, or a ``ReferenceFileSystem``
  given gpucrypt in its ``fs=`` dict (``fs={"gpucrypt": gpucrypt_fs}``). It is told by
  the caller: a ``CachingFileSystem`` whose targets (``.fs``, ``.fss``, down the chain)
  lead to this filesystem. Not caught: a cache of another kind, and a cache over an
  ``AsyncFileSystemWrapper`` of gpucrypt (``simplecache`` with
  ``fs=AsyncFileSystemWrapper(gpucrypt_fs)``), whose calls reach gpucrypt in a worker
  thread, with no caller to tell: such a cache keeps the plaintext. That is also how a
  ``ReferenceFileSystem`` holds gpucrypt when it makes it (``remote_protocol=
  "gpucrypt"``, ``simplecache::reference://``) or is given it alone (``fs=gpucrypt_fs``):
  a cache over those is not caught either. Put the cache below:
  ``gpucrypt::simplecache::PROTOCOL://...`` caches the ciphertext. Writing through
  ``filecache::``/``simplecache::`` cannot be refused: those caches write the plaintext
  into their cache folder and call gpucrypt only when the file is closed, to encrypt
  it, and keep the plaintext copy there. Don't write through them.
- ``get_file(rpath, lpath)`` refuses a local ``lpath`` that is ``rpath``'s stored file
  itself (``ValueError``, as :func:`gpucrypt.stream.decrypt` refuses it), before
  anything is written: the plaintext would replace the only ciphertext. It compares
  files, not paths (links followed): the descriptor the stored file is read through,
  where the target has one, and the local file a local target stores it as, also under
  ``dir::`` or a cache below gpucrypt. ``lpath`` is taken as fsspec's local filesystem
  takes it (``file://`` stripped).
- ``put_file`` follows fsspec: ``mode="create"`` refuses an existing target
  (``FileExistsError``, checked before writing, not atomically, as fsspec's own
  filesystems check it); inside ``with fs.transaction:`` the file is sealed at once into
  a hidden temporary file beside its target (``.NAME.XXXXXXXX.gpucrypt-tmp``, NAME cut
  to its first 64 bytes: any name the folder takes can be staged), moved into place
  when the transaction commits and removed when it is discarded. On a local target, as
  outside a transaction, a target that is a symbolic link is refused (``OSError``
  ELOOP, at the put and again at the commit), and SIGTERM/SIGHUP remove the staged file
  (:mod:`gpucrypt.files._atomic`'s signal cleanup; SIGKILL can leave it). On other
  targets a process killed inside the transaction leaves it: a signal handler cannot
  remove a remote file (delete ``.*.gpucrypt-tmp`` files found there).
"""
from __future__ import annotations

import difflib
import errno
import functools
import inspect
import io
import logging
import os
import posixpath
import re
import shutil
import sys
import threading
import uuid
from typing import Any

import fsspec
from fsspec.config import apply_config
from fsspec.core import OpenFile, OpenFiles
from fsspec.implementations.cached import CachingFileSystem
from fsspec.implementations.chained import ChainedFileSystem
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.utils import isfilelike, stringify_path, tokenize

from . import audit
from .files import stream
from .backends import check_device
from .files._format import (MAGIC, TAG_SIZE, AuthenticationError, FormatError, StreamError,
                            TruncatedError, UnsupportedVersion, check_algorithm,
                            check_segment_size, parse_header)
from .files._atomic import AtomicFile, OutputExists, _naming, _track, _untrack, fsync_folder
from .keys import (KeyManagementError, KeyProviderError, KeyReference, NoMatchingRecipient,
                   encrypt_file)
from .keys.portable import KeyReferences, ResolvedKeys, _is_key_uri

__all__ = ["GpucryptFileSystem", "GpucryptFile", "stats", "reset_stats", "named_error"]

_log = logging.getLogger(__name__)

#: the plaintext size of a stream file cut inside a segment's tag (it has none)
_TRUNCATED = -1
#: bytes fetched to parse a header; a longer one (a large envelope) is fetched again whole
_HEAD_BYTES = 4096
_MAX_HEADER_BYTES = 2 << 20
#: a size not in the cache (None there means "not a stream")
_UNKNOWN = object()
#: what says that no file is there, as fsspec's mappers take it (``FSMap``'s
#: ``missing_exceptions``): the only errors that the reads taking ``on_error`` (``cat``,
#: ``cat_ranges``, a mapper's ``getitems``) return or leave out. Every other error (a
#: tampered, truncated or foreign file, one that is not a stream, a malformed envelope,
#: keys that cannot be loaded or reached) raises whatever ``on_error`` says: left out, a
#: zarr chunk reads as missing, its fill value. Raised while the keys are resolved, these
#: become a ``KeyProviderError`` (:meth:`GpucryptFileSystem._data_key`), as does any
#: other error of a key provider's own: a key's file missing is not this file missing
_MISSING = (FileNotFoundError, IsADirectoryError, NotADirectoryError)


class _Counter:
    """A thread-safe count of segments decrypted by this module's readers, for tests and
    benchmarks that check a read touched only the segments it needed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.segments_decrypted = 0
        self.files_opened = 0

    def add(self, segments: int = 0, files: int = 0) -> None:
        with self._lock:
            self.segments_decrypted += segments
            self.files_opened += files


_COUNTER = _Counter()


#: what filesystems report that changes when a file is replaced, as their ``info`` names
#: it: local (inode, mtime, created), memory (created), http (ETag, Last-Modified,
#: Content-MD5, Digest: those the server sends), s3fs (ETag, LastModified, VersionId),
#: gcsfs (generation, md5Hash, crc32c, etag, updated, mtime), adlfs (etag, last_modified,
#: creation_time, version_id), webhdfs (modificationTime), sftp and smb (mtime; not their
#: "time", the access time, which a read changes), ftp (modify), arrow (mtime), github
#: (sha), git (hex), Hugging Face (blob_id, last_commit), zip (CRC, date_time)
_VERSION_FIELDS = ("ino", "mtime", "created", "ETag", "etag", "LastModified", "last_modified",
                   "CRC", "date_time",
                   "Last-Modified", "Content-MD5", "Digest", "generation", "VersionId",
                   "version_id", "md5Hash", "crc32c", "updated", "creation_time",
                   "modificationTime", "modification_time", "modify", "sha", "hex",
                   "blob_id", "last_commit")


def _version_of(info: dict) -> tuple:
    """The fields of ``info`` that tell one version of a file from the next: a file
    replaced by another of the same stored size (another header, or no stream at all) is
    then read again, not given the first one's size. Unhashable values count by ``repr``.
    Empty when the target reports none of them (an HTTP server that sends neither ETag
    nor Last-Modified): such a file's size is then not remembered (see
    :meth:`GpucryptFileSystem._plain_info`). A time kept to the second (Last-Modified)
    tells apart replacements a second apart or more."""
    version = []
    for name in _VERSION_FIELDS:
        value = info.get(name)
        if value is not None:
            try:
                hash(value)
            except TypeError:
                value = repr(value)
            version.append((name, value))
    return tuple(version)


_WRITE_OPTIONS = ("algorithm", "segment_size", "device")


#: what fsspec's ``open`` and its files take beside a path and a mode (and pass on to
#: ``_open``), which a write here accepts and has no use for: the plaintext is buffered
#: and sealed whole, so no block size, cache or expected size of the target applies
_FSSPEC_FILE_OPTIONS = frozenset({"block_size", "cache_type", "cache_options", "autocommit",
                                  "size", "compression", "encoding", "errors", "newline"})
#: the target's methods whose keyword arguments a write through gpucrypt accepts (and
#: ignores, as it always did), by the call they reach gpucrypt through
_TARGET_METHODS = {"open": ("open", "_open", "pipe_file", "_pipe_file"),
                   "put_file": ("open", "_open", "put_file", "_put_file")}


@functools.lru_cache(maxsize=64)
def _target_write_options(target_class: type, call: str) -> frozenset:
    """The keyword arguments that ``target_class``'s methods for ``call`` name (see
    :data:`_TARGET_METHODS`): named parameters only, its ``**kwargs`` taking any name
    (local and memory filesystems have one) would let every typo through."""
    names: set[str] = set()
    for method in _TARGET_METHODS[call]:
        function = getattr(target_class, method, None)
        if function is None:
            continue
        try:
            parameters = inspect.signature(function).parameters.values()
        except (TypeError, ValueError):  # a builtin or a wrapper without a signature
            continue
        names.update(p.name for p in parameters
                     if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    names.discard("self")
    return frozenset(names)


def _write_options(algorithm: Any, segment_size: Any, device: Any) -> dict:
    """The options files are sealed with, checked where they are given: found wrong only
    when a writer publishes, they would cost everything written to it."""
    algorithm = check_algorithm(algorithm)
    check_segment_size(segment_size)
    device = check_device(device)
    return {"algorithm": algorithm, "segment_size": segment_size, "device": device}


def stats() -> dict:
    """``{"segments_decrypted", "files_opened"}`` since the last :func:`reset_stats`, in this
    process."""
    return {"segments_decrypted": _COUNTER.segments_decrypted,
            "files_opened": _COUNTER.files_opened}


def reset_stats() -> None:
    global _COUNTER
    _COUNTER = _Counter()


def named_error(exc: Exception, path: str) -> Exception:
    """``exc`` again, of the same class, with ``path`` leading its message (and in ``.path``):
    a :class:`StreamError`, or one of gpucrypt's key errors (whose classes take a message)."""
    message = f"{path}: {exc}"
    if isinstance(exc, UnsupportedVersion):
        new: StreamError = UnsupportedVersion(message, exc.version)
    elif isinstance(exc, AuthenticationError):
        new = type(exc)(message, exc.segment)
    else:
        new = type(exc)(message)
    new.path = path  # type: ignore[attr-defined]
    return new


def plaintext_size(header: stream.Header, stored_size: int) -> int | None:
    """The plaintext size of a stream of ``stored_size`` bytes with ``header``; None when no
    whole stream has that size (truncated inside the header or a tag)."""
    payload = stored_size - header.header_length
    if payload <= 0:
        return None
    sealed = header.segment_size + TAG_SIZE
    segments = -(-payload // sealed)
    if payload - (segments - 1) * sealed < TAG_SIZE:
        return None
    return payload - segments * TAG_SIZE


class GpucryptFile(stream.SegmentReader):
    """A read-only, seekable file of a stream's plaintext over a target file object; errors
    name ``path``. ``key``: the stream's key, or a function of its (unverified) header that
    returns it. Closing this file closes the target file, and so does failing to open."""

    mode = "rb"

    def __init__(self, target_file: Any, key: Any, path: str, device: str = "cpu",
                 changed: Any = None):
        self.path = path
        # whether the stored file changed since it was opened (see _change_check): said
        # when a segment then fails, which is then likely no tampering
        self._changed = changed
        try:
            if callable(key):
                header = stream.read_header(target_file)
                target_file.seek(0)  # the reader takes the stream from the file's position
                key = key(header)
            super().__init__(target_file, key, device=device)  # reads the header again
        except StreamError as exc:
            target_file.close()
            raise named_error(exc, path) from None
        except BaseException:
            target_file.close()
            raise
        self._target_file = target_file
        self._counted = 0
        self._count()
        _COUNTER.add(files=1)

    @property
    def name(self) -> str:
        return self.path

    @property
    def blocksize(self) -> int:
        # what a block cache asks of a file it caches: blocks of this file's plaintext
        # would be kept on disk in the clear. Said instead of a bare AttributeError (fsspec's
        # own blockcache is refused before, when it opens the file: _refuse_cache_above)
        raise AttributeError(f"{self.path}: gpucrypt files are not cached above gpucrypt "
                             f"(blockcache::gpucrypt:: would keep plaintext blocks on disk): put "
                             f"the cache below it, gpucrypt::blockcache::PROTOCOL://..., which "
                             f"caches the ciphertext")

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(f"an open gpucrypt reader ({self.path}) holds its data key and "
                        f"decrypted plaintext and is not pickled: send the filesystem and "
                        f"the path, and open the file again where it is read")

    def _count(self) -> None:
        if self.segments_decrypted != self._counted:  # no lock taken per line read
            _COUNTER.add(segments=self.segments_decrypted - self._counted)
            self._counted = self.segments_decrypted

    def readinto(self, buf) -> int:
        try:
            return super().readinto(buf)
        except StreamError as exc:
            raise self._failure(exc) from None
        finally:
            self._count()

    def readline(self, size: int | None = -1) -> bytes:
        try:
            return super().readline(size)
        except StreamError as exc:
            raise self._failure(exc) from None
        finally:
            self._count()

    def _failure(self, exc: StreamError) -> Exception:
        """``exc`` named for this file; a segment that failed in a file that has changed
        since it was opened (another writer replaced it: over ``memory://`` every read
        is a range of whatever the path holds now) says so: not a sign of tampering."""
        failure = named_error(exc, self.path)
        if isinstance(exc, AuthenticationError) and self._changed is not None:
            try:
                changed = self._changed()
            except Exception:  # noqa: BLE001 - the failure itself is what to raise
                changed = False
            if changed:
                failure.args = (f"{failure.args[0]}; but the stored file has changed since "
                                f"it was opened (replaced or rewritten), which explains "
                                f"that: open it again to read it as it is now (should a "
                                f"new open fail too, the file is damaged or tampered "
                                f"with)",) + failure.args[1:]
        return failure

    def close(self) -> None:
        if not self.closed:
            super().close()
            self._target_file.close()


#: frames looked through, at most, from gpucrypt's check up to the method of a cache that
#: reads it (gpucrypt's own methods, fsspec's base methods, a ``dir::`` prefix, a
#: ``reference::`` filesystem: a dozen)
_CALLER_FRAMES = 24
#: the modules of the frames looked through on the way up: gpucrypt's own methods and
#: those fsspec's wrappers reach it by (``AbstractFileSystem`` methods, ``dir::``,
#: ``reference::``). A frame of any other module (the application's) ends the look
#: without its locals being read: on Python 3.11 reading a frame's ``f_locals`` keeps a
#: snapshot of them, and so keeps alive whatever that function deletes afterwards (a
#: plaintext buffer)
_PASSED_THROUGH = frozenset({__name__, "fsspec.spec", "fsspec.asyn",
                             "fsspec.implementations.dirfs",
                             "fsspec.implementations.reference"})
#: the module of fsspec's caching filesystems, whose frames' ``self`` is looked at
_CACHES_MODULE = CachingFileSystem.__module__
#: wrappers looked through, at most, from a cache down to the filesystem it caches
_CHAIN_DEPTH = 16
#: fsspec's wrappers that hand their target every path unchanged
_SAME_PATH_WRAPPERS: tuple = (CachingFileSystem,)
try:
    from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper
except ImportError:  # fsspec before 2024.12
    pass
else:
    _SAME_PATH_WRAPPERS += (AsyncFileSystemWrapper,)


def _inners(fs: Any) -> tuple:
    """The filesystems that ``fs`` wraps, where it is one of fsspec's wrappers: ``.fs`` of
    a ChainedFileSystem (caches, ``dir::``, gpucrypt itself), ``.sync_fs`` of an
    AsyncFileSystemWrapper, every value of ``.fss`` of a ReferenceFileSystem (one per
    protocol its references name); empty otherwise. Read from the instance's
    ``__dict__``: a CachingFileSystem hands most attribute look-ups to its target."""
    try:
        attributes = object.__getattribute__(fs, "__dict__")
    except AttributeError:
        return ()
    inner = attributes.get("fs")
    if inner is None:
        inner = attributes.get("sync_fs")
    if inner is not None:
        return (inner,)
    targets = attributes.get("fss")
    return tuple(targets.values()) if isinstance(targets, dict) else ()


def _wraps(outer: Any, fs: Any) -> bool:
    """Whether ``fs`` is found below ``outer`` through fsspec's wrappers (see
    :func:`_inners`), at most :data:`_CHAIN_DEPTH` wrappers down."""
    level = [outer]
    for _ in range(_CHAIN_DEPTH):
        level = [inner for wrapper in level for inner in _inners(wrapper)]
        if not level:
            return False
        if any(inner is fs for inner in level):
            return True
    return False


def _refuse_cache_above(fs: "GpucryptFileSystem", path: str) -> None:
    """Raise ``ValueError`` when ``fs`` is read by one of fsspec's caching filesystems
    over it (``filecache::``, ``simplecache::``, ``blockcache::gpucrypt::...``), directly
    or through wrappers (``dir::``, ``reference::``): they download the whole file
    (``get_file``) or its blocks (``_open``, ``cat_ranges``) into their cache folder,
    which would then hold the plaintext on disk, unencrypted, for as long as the cache
    keeps it. Told by the caller: up the stack, past gpucrypt's own frames and those of
    fsspec's base methods, ``dir::`` and ``reference::`` (:data:`_PASSED_THROUGH`), the
    first other frame is a method of a :class:`CachingFileSystem` whose targets (``.fs``,
    ``.sync_fs``, ``.fss``, down the chain) lead to ``fs``. Not recognised: a cache of
    another kind (not derived from CachingFileSystem), and one whose calls reach
    gpucrypt in another thread (a cache over an ``AsyncFileSystemWrapper``, which runs
    gpucrypt's methods in a thread pool, as does a ``reference::`` made with
    ``remote_protocol="gpucrypt"``)."""
    frame = sys._getframe(1)
    for _ in range(_CALLER_FRAMES):
        if frame is None:
            return
        module = frame.f_globals.get("__name__")
        if module == _CACHES_MODULE:
            caller = frame.f_locals.get("self")  # a frame of fsspec's caches only
            if isinstance(caller, CachingFileSystem) and _wraps(caller, fs):
                protocol = caller.protocol if isinstance(caller.protocol, str) \
                    else caller.protocol[0]
                raise ValueError(
                    f"{path}: gpucrypt files are not cached above gpucrypt "
                    f"({protocol}::gpucrypt:: would keep their plaintext on disk, in its "
                    f"cache folder): put the cache below it, gpucrypt::{protocol}::"
                    f"PROTOCOL://..., which caches the ciphertext")
        elif module not in _PASSED_THROUGH:
            return
        frame = frame.f_back


def _local_path_of(fs: Any, path: str) -> str | None:
    """The local file that ``path`` of ``fs`` is stored as, where ``fs`` reaches the local
    disk through wrappers that keep or prefix paths (``dir::``, fsspec's caches, an
    async wrapper); None for any other filesystem."""
    for _ in range(_CHAIN_DEPTH):
        if isinstance(fs, LocalFileSystem):
            return fs._strip_protocol(path)
        if isinstance(fs, DirFileSystem):
            path = fs._join(path)
        elif not isinstance(fs, _SAME_PATH_WRAPPERS):
            return None
        inners = _inners(fs)
        if not inners:
            return None
        fs = inners[0]
    return None


def _refuse_same_local_file(fs: Any, target: str, source: Any, lpath: str) -> None:
    """Raise ``ValueError`` (as :func:`gpucrypt.stream.decrypt` does for two paths) when
    the local ``lpath`` is the stored file ``target`` of ``fs``, open as ``source``: the
    plaintext would replace the only ciphertext. Told by identity (device and inode,
    links followed): of the descriptor ``source`` reads, where it has one, and of the
    local file ``target`` is stored as, where ``fs`` is the local disk under wrappers
    (:func:`_local_path_of`; a cache below gpucrypt reads its own copy)."""
    try:
        wanted = os.stat(lpath)
    except OSError:
        return  # not there yet (or unreachable: the write says so)
    found = []
    try:
        found.append(os.fstat(source.fileno()))
    except (AttributeError, OSError, ValueError):
        pass  # no descriptor (memory, object stores)
    local = _local_path_of(fs, target)
    if local is not None:
        try:
            found.append(os.stat(local))
        except OSError:
            pass
    if any(os.path.samestat(st, wanted) for st in found):
        raise ValueError(f"src and dst are the same file ({lpath}): decrypting {target} "
                         f"there would replace its only ciphertext with its plaintext; "
                         f"write to another path")


class _RangeFile(io.RawIOBase):
    """A read-only, seekable file over stateless range reads (``cat_file(path, start=,
    end=)``) of one target file, with a position of its own: for targets whose ``open``
    hands every caller the same file object (fsspec's memory filesystem gives each
    ``open("rb")`` one shared ``BytesIO``), where two readers' seek-then-read pairs would
    interleave. Its size is taken when it is made; a file replaced after that reads short
    or fails authentication, as a replaced file does through any reader."""

    def __init__(self, fs: Any, path: str):
        super().__init__()
        self._fs, self.path = fs, path
        info = fs.info(path)  # FileNotFoundError, as the target's open would raise
        if info["type"] != "file":
            raise IsADirectoryError(errno.EISDIR, "it is a folder, not a file to read", path)
        self.info = info  # what it was when opened (see _change_check)
        self._size, self._pos = int(info["size"]), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}.get(whence)
        if base is None:
            raise ValueError(f"invalid whence ({whence!r})")
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buf) -> int:
        view = memoryview(buf).cast("B")
        end = min(self._size, self._pos + len(view))
        if end <= self._pos:
            return 0
        data = self._fs.cat_file(self.path, start=self._pos, end=end)
        view[:len(data)] = data
        self._pos += len(data)
        return len(data)


def _change_check(fs: Any, path: str, stored: Any) -> Any:
    """A function that tells whether the stored file ``path`` of ``fs``, just opened as
    ``stored``, has changed since this call, for the error of a segment that fails later;
    None where that cannot be told. Costs nothing more at open: a local file is
    ``fstat``'ed (its descriptor: rewritten in place, it has a new size or time; replaced
    by a rename, the descriptor still reads the old file, which does not fail); a
    :class:`_RangeFile` or an fsspec file that fetched its ``info`` when it opened (s3fs's,
    gcsfs's) keeps it, and ``fs.info`` is asked again only once a segment has failed."""
    try:
        descriptor = stored.fileno()
    except (AttributeError, OSError, ValueError):
        descriptor = None
    if isinstance(descriptor, int):
        def stat_version() -> tuple:
            st = os.fstat(descriptor)
            return st.st_ino, st.st_size, st.st_mtime_ns  # not ctime: chmod, a link move it
        try:
            opened = stat_version()
        except OSError:
            return None
        return lambda: stat_version() != opened
    # an fsspec file's info, where its open fetched it (``details`` would fetch it now)
    info = stored.info if isinstance(stored, _RangeFile) else getattr(stored, "_details", None)
    if not isinstance(info, dict) or info.get("size") is None:
        return None
    opened = (int(info["size"]), _version_of(info))

    def changed() -> bool:
        try:
            now = fs.info(path)
        except FileNotFoundError:
            return True  # removed since
        return (int(now.get("size") or -1), _version_of(now)) != opened
    return changed


def _shares_file_objects(fs: Any) -> bool:
    """Whether ``fs.open(path, "rb")`` may hand two callers one file object (and one
    position): fsspec's memory filesystem, also under a ``dir::`` prefix."""
    while isinstance(fs, DirFileSystem):
        fs = fs.fs
    return isinstance(fs, MemoryFileSystem)


#: the ``__exit__`` of fsspec's context managers that close the files they opened
#: (``fsspec.open``'s ``OpenFile``, ``open_files``' ``OpenFiles``), as ``__exit__(self,
#: *args)``: they close a writer without passing on the exception that ends their block
_FSSPEC_EXITS = frozenset({OpenFile.__exit__.__code__, OpenFiles.__exit__.__code__})
#: the modules of the frames between a writer's close and such an ``__exit__``
_CLOSING_MODULES = frozenset({__name__, "fsspec.core"})


def _closed_by_a_failing_with() -> bool:
    """Whether this close is made by a ``with fsspec.open(...)`` (or ``open_files``) block
    left by an exception: by its ``__exit__``, found up the stack past this module's and
    fsspec.core's frames only, given an exception. Asked only where ``sys.exc_info()``
    cannot tell: a writer opened inside an ``except`` clause, closed while the same
    exception is the one handled, the same traceback too. A bare ``raise`` of it inside
    the block leaves both unchanged, and fsspec's ``__exit__`` closes its files without
    passing on what it was given. Only those frames' locals are read: an application
    frame ends the look unread (see :data:`_PASSED_THROUGH`)."""
    frame = sys._getframe(1)
    try:
        for _ in range(_CALLER_FRAMES):
            if frame is None:
                return False
            if frame.f_code in _FSSPEC_EXITS:
                args = frame.f_locals.get("args") or (None,)
                return args[0] is not None
            if frame.f_globals.get("__name__") not in _CLOSING_MODULES:
                return False
            frame = frame.f_back
        return False
    finally:
        del frame  # no cycle through this frame


class _EncryptingWriter(io.RawIOBase):
    """Plaintext written here is sealed into one stream file and published by a
    successful ``close`` (see the module docstring). Dropped instead: on ``discard()``, a
    ``with`` block left by an exception, a ``close`` while an exception propagates (the
    close that ``TextIOWrapper`` or a compressor makes on its way out of a failure), a
    writer collected unclosed, and one closed by the finaliser of an :mod:`io` wrapper
    collected unclosed. With ``autocommit=False`` (an fsspec transaction) ``close`` keeps
    it for ``commit()``.

    Limit: a ``close`` is all a file is told. One made by another library's finaliser
    after a failure was handled (pyarrow's ``ParquetWriter.__del__``) comes with no
    exception and no sign of where it comes from, and publishes: close such writers in
    a ``with`` block, or call :meth:`discard` when the work fails."""

    mode = "wb"

    def __init__(self, fs: "GpucryptFileSystem", path: str, autocommit: bool = True,
                 options: dict | None = None):
        super().__init__()
        self._fs, self.path, self._chunks = fs, path, []
        self._options = options  # this file's write options; None: the filesystem's
        self.autocommit, self._written = autocommit, 0
        # an exception already being handled where the file is opened (its with block
        # inside an except clause) is not one that fails the writing. Its traceback says
        # nothing either way: the clause may raise it again and catch it (a helper that
        # sorts exceptions by raising them, a failed future's result()), then write on
        self._handling = sys.exc_info()[1]
        # set when an io wrapper's finaliser is about to close this file (_dealloc_warn)
        self._collected_wrapper: str | None = None

    @property
    def name(self) -> str:
        return self.path

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._written

    def write(self, data) -> int:
        if self.closed:
            raise ValueError("I/O operation on closed file.")
        chunk = bytes(memoryview(data))  # not bytes(): write(5) would write five zero bytes
        self._chunks.append(chunk)
        self._written += len(chunk)
        return len(chunk)

    def discard(self) -> None:
        self._chunks = None
        super().close()

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(f"an open gpucrypt writer ({self.path}) holds the plaintext written "
                        f"to it and is not pickled: send the filesystem and the path, and "
                        f"write in the process that has the data")

    def close(self) -> None:
        if self.closed:
            # as any file: a second close does nothing (a finaliser or an outer with block
            # closing again must not raise again); a failed publish is retried by commit()
            return
        if self._collected_wrapper is not None:
            self.discard()
            if self._written:
                _log.warning("%s: the write was discarded, not published: the %s over it "
                             "was collected without being closed, and its finaliser closed "
                             "this file; close the wrapper (or write in a with block) to "
                             "publish", self.path, self._collected_wrapper)
            return
        failing = sys.exc_info()[1]
        if failing is not None and (failing is not self._handling
                                    or _closed_by_a_failing_with()):
            self.discard()
            if self._written:  # logged, not warned: a warning could replace that exception
                _log.warning("%s: the write was discarded, not published: the file was "
                             "closed while an exception was being handled (%s); call "
                             "commit() to publish there", self.path, type(failing).__name__)
        else:
            self._finish()

    def _dealloc_warn(self, source: Any) -> None:
        # what io's C wrappers (TextIOWrapper, BufferedWriter, ...) call on the raw file
        # when they are collected unclosed, right before their finaliser closes it (FileIO
        # warns "unclosed file" there): that close is no successful end of the writing. It
        # may come long after the failure that left the wrapper unclosed was handled, with
        # nothing else to tell it from a successful close
        self._collected_wrapper = type(source).__name__

    def _finish(self) -> None:
        """The successful close: publish, or in a transaction, stage for it."""
        if self.autocommit:
            self.commit()
        else:
            super().close()  # staged: the transaction commits or discards it

    def commit(self) -> None:
        """Publish what was written (also where ``close`` would not: inside an ``except``
        clause; and again after a ``close`` whose publish failed, which kept the
        plaintext). In a transaction, the file must have been closed."""
        if not self.closed:
            if not self.autocommit:
                self.discard()
                raise ValueError(f"{self.path} was still open when its transaction committed: "
                                 f"close it (or leave its with block) inside the transaction")
            super().close()
        elif self._chunks is None:
            return  # discarded, or published already
        # kept until published: a publish that fails (a transient error of the target)
        # raises, and a retried commit() or close() publishes them or raises again
        self._fs._publish(self.path, self._chunks, self._options)
        self._chunks = None

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.discard()
        elif not self.closed:
            # its own block ended normally: whatever sys.exc_info() holds is not this write's
            # (an ExitStack's suppress() of an earlier exception, say)
            self._finish()

    def __del__(self) -> None:
        # dropped without close: whatever was written is abandoned, not published
        if not self.closed:
            self.discard()


class _CompressingWriter:
    """A compressor (``GzipFile``, ...) over an :class:`_EncryptingWriter`, whose ``close``
    closes the writer too, which publishes it (fsspec's ``open(compression=...)`` leaves
    the file under a compressor open, to be closed by its finaliser, which now discards
    it). Everything else is the compressor's."""

    def __init__(self, compressor: Any, writer: _EncryptingWriter):
        self._compressor, self._writer = compressor, writer

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_compressor", "_writer"):
            raise AttributeError(name)  # not set yet (copy, pickle): no endless lookup
        return getattr(self._compressor, name)

    def __iter__(self):
        return iter(self._compressor)

    def close(self) -> None:
        self._close_compressor()
        self._writer.close()  # discards instead while an exception is propagating

    def _finish(self) -> None:
        """The successful end (a with block that ended normally): publish."""
        self._close_compressor()
        if not self._writer.closed:
            self._writer._finish()

    def discard(self) -> None:
        try:
            self._compressor.close()
        finally:
            self._writer.discard()

    def commit(self) -> None:
        """Close the compressor (its trailer) and publish (see
        :meth:`_EncryptingWriter.commit`)."""
        self._close_compressor()
        self._writer.commit()

    def __reduce_ex__(self, protocol: Any) -> Any:
        return self._writer.__reduce_ex__(protocol)  # refused, saying why

    def _close_compressor(self) -> None:
        try:
            self._compressor.close()  # its trailer, into the writer
        except BaseException:
            self._writer.discard()
            raise

    def __enter__(self) -> "_CompressingWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self._finish()  # whatever the surroundings are handling (see _EncryptingWriter)
        else:
            self.discard()


class _TextWriter(io.TextIOWrapper):
    """Text mode over a writer (:class:`_EncryptingWriter` or :class:`_CompressingWriter`),
    whose ``with`` block publishes when it ends normally and discards when it ends by an
    exception, whatever the surroundings are handling (a plain TextIOWrapper's close
    cannot tell its own block's end from an exception being handled around it)."""

    def __del__(self) -> None:
        # dropped without close: abandoned, as a binary writer is (TextIOWrapper's own
        # finaliser would close, which publishes)
        try:
            if not self.closed:
                self.buffer.discard()
        except Exception:  # noqa: BLE001 - a finaliser must not raise
            pass

    def __reduce_ex__(self, protocol: Any) -> Any:
        return self.buffer.__reduce_ex__(protocol)  # refused, saying why

    def commit(self) -> None:
        """Publish what was written (see :meth:`_EncryptingWriter.commit`): where
        ``close`` would not, or again after a ``close`` whose publish failed."""
        if not self.closed:
            self.flush()
        self.buffer.commit()

    def discard(self) -> None:
        """Drop what was written, the text not yet flushed included: nothing is published
        and the old file stays. The file is closed (``closed`` is true: it is the binary
        writer's), and a later ``close()`` does nothing."""
        self.buffer.discard()  # before any close() could flush the pending text into it

    def __exit__(self, exc_type, exc, tb) -> None:
        writer = self.buffer
        if exc_type is None:
            if not self.closed:
                self.flush()
                writer._finish()
        else:
            writer.discard()  # before close() could flush what was left into it
        super().__exit__(exc_type, exc, tb)  # closes (a no-op on a closed writer)


#: the keyword arguments that name keys (see :class:`KeyReferences`)
_KEY_ARGUMENTS = ("keys", "keyset", "identities", "recipients", "passphrase_env")


def _as_text(ref: Any) -> str | None:
    """A key reference as the text that names it whole (a path, a key URI), or None for
    an object that text cannot stand for (a provider, a ``WrappingKey``, a ``Recipient``:
    its repr may be shared by another key, a ``KeyReference``'s leaves out its query)."""
    if isinstance(ref, KeyReference):
        return ref.uri  # canonical: every attribute, x-wrap and sources included
    if isinstance(ref, str):
        return ref
    if isinstance(ref, os.PathLike) and type(ref).__module__.startswith("pathlib"):
        return os.fspath(ref)  # other PathLikes may print as something else than their path
    return None


def _absolute_path(ref: Any) -> Any:
    """``ref`` as an absolute path where it is a path given as text (a ``str`` that is not
    a key URI, a ``pathlib`` path), else as it is: a relative one would be looked up again
    from the current folder at each use, another keyset after an ``os.chdir``."""
    if isinstance(ref, str) and not _is_key_uri(ref):
        return os.path.abspath(ref)
    if isinstance(ref, os.PathLike) and type(ref).__module__.startswith("pathlib"):
        return os.path.abspath(os.fspath(ref))
    return ref


def _absolute_key_paths(kwargs: dict) -> dict:
    """``kwargs`` with the key files they name (``keyset``, ``identities``,
    ``recipients``, the same inside ``keys=``) made absolute (see :func:`_absolute_path`),
    so that the instance, its token and its pickle name the files meant when it was made."""
    out = dict(kwargs)
    refs = out.get("keys")
    if isinstance(refs, KeyReferences):
        out["keys"] = KeyReferences(
            keyset=None if refs.keyset is None else _absolute_path(refs.keyset),
            identities=[_absolute_path(r) for r in refs.identities],
            recipients=[_absolute_path(r) for r in refs.recipients],
            passphrase_env=refs.passphrase_env)
    if out.get("keyset") is not None:
        out["keyset"] = _absolute_path(out["keyset"])
    for name in ("identities", "recipients"):
        given = out.get(name)
        if isinstance(given, (list, tuple)):
            out[name] = [_absolute_path(r) for r in given]
        elif given is not None:
            out[name] = _absolute_path(given)
    return out


def _key_arguments_as_text(kwargs: dict) -> dict | None:
    """``kwargs`` (fsspec's config applied) with the keys spelled out whole as text: every
    key argument present (``keyset`` a text or None, ``identities`` and ``recipients``
    lists of texts, ``passphrase_env``), ``keys=`` a KeyReferences spelled out as its
    fields (passphrase_env included, which its repr leaves out). None when one of them is
    an object, or when they are given in a way ``__init__`` refuses (it then says why).

    Every key argument is present so that fsspec, which applies its config again after
    this, cannot fill one in: an explicit ``keyset=None`` (identities only: read, never
    write) stays None over a config default. And one spelling per set of keys:
    ``keys=KeyReferences(keyset=p)`` and ``keyset=p``, or one identity and a list of it,
    are the same filesystem."""
    out = dict(kwargs)
    refs = out.pop("keys", None)
    if refs is not None:
        if not isinstance(refs, KeyReferences) or any(
                out.get(name) is not None for name in _KEY_ARGUMENTS):
            return None
        out.update(keyset=refs.keyset, identities=list(refs.identities),
                   recipients=list(refs.recipients), passphrase_env=refs.passphrase_env)
    keyset = out.get("keyset")
    if keyset is not None:
        keyset = _as_text(keyset)
        if keyset is None:
            return None
    lists = {}
    for name in ("identities", "recipients"):
        given = out.get(name)
        given = [] if given is None else given if isinstance(given, (list, tuple)) else [given]
        lists[name] = [_as_text(r) for r in given]
        if None in lists[name]:
            return None
    passphrase_env = out.get("passphrase_env")
    if passphrase_env is not None and not isinstance(passphrase_env, str):
        return None
    # in one order (fsspec's token is the printed dict); keys= present too, spelled out
    # here, so that a config's keys= stays out
    spelled = {name: value for name, value in out.items() if name not in _KEY_ARGUMENTS}
    spelled.update(keyset=keyset, **lists, passphrase_env=passphrase_env, keys=None)
    return spelled


#: the key arguments other than ``keys=``, which a ``keys=`` KeyReferences holds
_SEPARATE_KEY_ARGUMENTS = ("keyset", "identities", "recipients", "passphrase_env")


def _apply_config(cls: type, kwargs: dict) -> dict:
    """``kwargs`` over fsspec's config (``fsspec.config.conf``, the ``FSSPEC_GPUCRYPT_*``
    environment variables), where the keys the caller named replace the config's whole:
    ``keys=`` and the separate key arguments are two spellings of one set of keys, and
    a config's ``keyset`` filled in beside a caller's ``keys=`` (or the config's
    ``keys=`` beside a caller's ``keyset``) made every such call fail ("give keys= or
    keyset=..., not both"). The config's are dropped as explicit ``None``, so that
    fsspec, which applies its config again after this, cannot fill them in either."""
    given = kwargs
    kwargs = apply_config(cls, kwargs)
    if "keys" in given:  # keys=None included: explicit, it wins as any key argument does
        for name in _SEPARATE_KEY_ARGUMENTS:
            kwargs[name] = given.get(name)
    if any(name in given for name in _SEPARATE_KEY_ARGUMENTS):
        kwargs["keys"] = given.get("keys")
    return kwargs


class _CachedForKeyText(type(ChainedFileSystem)):
    """fsspec's instance cache (the metaclass of its filesystems), which finds an instance
    by the printed form of the constructor's arguments, kept only where that form names
    the keys whole: key references given as text are cached (spelled out, so that the
    token and the pickle carry that text); a call with key objects makes a new instance
    (fsspec's ``skip_instance_cache``) with a token of its own, so that two objects that
    print alike (two providers' ``WrappingKey(id='prod')``) never share one, nor its
    keys, and the two filesystems are not equal either (fsspec's ``==``, ``hash`` and
    dask token, and pyarrow's ``equals``, are that token: equal, they would let a cache
    keyed by filesystem hand one caller's reads to the other)."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        kwargs = _apply_config(cls, kwargs)  # as fsspec does first: config may name keys
        kwargs = _absolute_key_paths(kwargs)
        as_text = _key_arguments_as_text(kwargs)
        if as_text is not None:
            return super().__call__(*args, **as_text)
        kwargs["skip_instance_cache"] = True
        obj = super().__call__(*args, **kwargs)
        obj._fs_token_ = tokenize(obj._fs_token_, uuid.uuid4().hex)
        return obj


def _key_files(refs: KeyReferences) -> tuple[str, ...]:
    """The local files ``refs`` loads keys from: paths, and ``file:`` URIs' keysets."""
    files = []
    for ref in (refs.keyset, *refs.identities, *refs.recipients):
        if isinstance(ref, (str, os.PathLike)):
            files.append(os.fspath(ref))
        elif isinstance(ref, KeyReference) and ref.scheme == "file":
            files.append(ref.attributes["path"])
    return tuple(files)


def _file_versions(files: tuple[str, ...]) -> tuple:
    """What changes when one of ``files`` is replaced or rewritten (a missing one: None)."""
    versions = []
    for path in files:
        try:
            st = os.stat(path)
        except OSError:
            versions.append(None)
        else:
            versions.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(versions)


def _reloading(refs: KeyReferences) -> KeyReferences:
    """``refs`` with each ``file:`` KeyReference new: a KeyReference keeps the keyset it
    loaded first for the life of the process, and the file it names has changed."""
    def fresh(ref: Any) -> Any:
        return KeyReference(ref.uri) if isinstance(ref, KeyReference) and ref.scheme == "file" \
            else ref
    return KeyReferences(keyset=None if refs.keyset is None else fresh(refs.keyset),
                         identities=[fresh(r) for r in refs.identities],
                         recipients=[fresh(r) for r in refs.recipients],
                         passphrase_env=refs.passphrase_env)


class _WatchedKeys:
    """The keys ``refs`` names, resolved in this process on first use and again whenever a
    key file it names has changed since (inode, size, modification or change time: a
    keyset saved anew is a new file, or at least a new time), so that a rotation on disk
    reaches the next write and read of a filesystem made before it. Unchanged files cost
    one ``os.stat`` each per :meth:`get`, and no new resolution (a sealed keyset's scrypt
    runs once per change). The files are looked at before they are loaded: one replaced
    in between is loaded again on the next call. Thread-safe; never pickled."""

    def __init__(self, refs: KeyReferences):
        self._refs, self._files = refs, _key_files(refs)
        self._lock = threading.Lock()
        self._resolved: ResolvedKeys | None = None
        self._versions: tuple | None = None

    def get(self) -> ResolvedKeys:
        with self._lock:
            versions = _file_versions(self._files)
            if self._resolved is None or versions != self._versions:
                # the unwrapped data keys go with the keys that unwrapped them
                self._resolved = _reloading(self._refs).resolve()
                self._versions = versions
            return self._resolved


#: bytes of a target's name kept in its temporary file's name (a hint of whose it is)
_TEMP_NAME_HINT = 64


def on_local_disk(fs: Any) -> bool:
    """Whether ``fs`` is the local disk, whose folders are real: fsspec's local filesystem
    (by class or protocol, or under a ``dir::`` prefix) or a pyarrow local one wrapped.
    There a path is a file or a folder; on an object store (``s3``, ``memory``) an
    object and a prefix may share a name, and an object may have keys below its name."""
    if isinstance(fs, DirFileSystem):  # a dir:: prefix over another filesystem
        return on_local_disk(fs.fs)
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return isinstance(fs, LocalFileSystem) or "file" in protocols or "local" in protocols \
        or getattr(getattr(fs, "fs", None), "type_name", None) == "local"


def move_exactly(fs: Any, source: str, target: str) -> Any:
    """Move the file ``source`` to ``target`` on ``fs``, both taken as exact names; returns
    what the target's call returned. fsspec's generic ``mv`` (object stores) takes a name
    holding ``*``, ``?`` or ``[`` as a glob pattern: ``a[1]`` was never written, and
    files the pattern matched (``a1``) were moved into a folder named ``a[1]``. Names
    without those characters keep the target's ``mv``, a rename where it has one (the
    local disk's, under a ``dir::`` prefix too; HDFS's): a copy would rewrite every byte,
    and on the local disk truncate the old file first. The local disk's ``mv`` globs
    nothing."""
    from glob import has_magic  # what fsspec itself asks

    if on_local_disk(fs) or not (has_magic(source) or has_magic(target)):
        return fs.mv(source, target)
    copied = fs.cp_file(source, target)
    fs.rm_file(source)
    return copied


def _temp_beside(target: str) -> str:
    """A fresh hidden name in ``target``'s folder, ``.NAME.XXXXXXXX.gpucrypt-tmp``, NAME
    the target's name cut to its first 64 bytes: at most 87 bytes, so that staging a
    file adds no limit of its own on the target's name (a target named up to its
    folder's limit, 255 bytes on most, can be staged; the full name would need 23 more)."""
    parent, base = posixpath.split(target)
    hint = base.encode("utf-8", "ignore")[:_TEMP_NAME_HINT].decode("utf-8", "ignore")
    return posixpath.join(parent, f".{hint}.{os.urandom(4).hex()}.gpucrypt-tmp")


#: the names :func:`_temp_beside` and :mod:`gpucrypt.files._atomic` give temporary files
_TEMP_NAME = re.compile(r"\..*\.[0-9a-f]{8}\.gpucrypt-tmp", re.DOTALL)


def _is_temp_name(path: str) -> bool:
    """Whether ``path`` names a gpucrypt temporary file (``.NAME.XXXXXXXX.gpucrypt-tmp``)."""
    return _TEMP_NAME.fullmatch(posixpath.basename(path.rstrip("/"))) is not None


def _raise_as_target(exc: BaseException, temp: str, target: str) -> None:
    """Called handling ``exc``: when it is an error of ``target``'s temporary file ``temp``
    (a full disk while it was sealed, its folder gone before the move), raise it again
    naming ``target``: errors name the path the caller gave, never a temporary name, as
    :mod:`gpucrypt.files._atomic`'s do. Any other returns, for the caller to raise."""
    if isinstance(exc, OSError) and temp in (exc.filename, exc.filename2):
        raise _naming(exc, target) from None


def _refuse_link(target: str) -> None:
    """Raise ``OSError`` (ELOOP) naming ``target`` when it is a symbolic link, as
    :class:`~gpucrypt.files._atomic.AtomicFile` does for every local write."""
    if os.path.islink(target):
        raise OSError(errno.ELOOP, f"it is a symbolic link (to {os.readlink(target)}); "
                      f"gpucrypt does not write through links: give the file it points to "
                      f"as the output, or remove the link first", target)


class _StagedPut:
    """A ``put_file`` inside a transaction: already sealed into ``temp`` beside its target
    (fsspec's transaction calls :meth:`commit` or :meth:`discard` when it ends)."""

    def __init__(self, fs: "GpucryptFileSystem", temp: str, target: str, events: list):
        self._fs, self._temp, self.path = fs, temp, target
        self._events = events  # its sealing's audit events, held until it is placed

    def commit(self) -> None:
        self._fs._place_recorded(self._temp, self.path, self._events)

    def discard(self) -> None:
        try:
            self._fs._drop_temp(self._temp)
        finally:
            audit._release(self._events, error="discarded: its transaction did not commit")


#: what fsspec's own AbstractFileSystem takes (instance caching, listings cache, async)
_FSSPEC_OPTIONS = frozenset({"skip_instance_cache", "use_listings_cache", "listings_expiry_time",
                             "max_paths", "asynchronous", "loop"})


class GpucryptFileSystem(ChainedFileSystem, metaclass=_CachedForKeyText):
    """fsspec filesystem of gpucrypt stream files over a target filesystem (see the module
    docstring for the contract).

    ``target_protocol``/``target_options`` name and configure the target (what a chained
    URL ``gpucrypt::PROTOCOL://...`` passes), or ``fs`` gives an instance. Keys:
    ``keyset``, ``identities``, ``recipients``, ``passphrase_env`` (see
    :class:`~gpucrypt.keys.portable.KeyReferences`), or ``keys=`` a KeyReferences.
    Writing: ``algorithm``, ``segment_size``, ``device`` as :func:`gpucrypt.stream.encrypt`
    takes them. Reading decrypts on ``read_device`` (the CPU: one segment at a time).
    """

    protocol = "gpucrypt"
    root_marker = ""
    _strip_tokenize_options = ("fo",)

    def __init__(self, target_protocol: str | None = None, target_options: dict | None = None,
                 fs: Any = None, *, keys: KeyReferences | None = None, keyset: Any = None,
                 identities: Any = None, recipients: Any = None,
                 passphrase_env: str | None = None, algorithm: str = "chacha20-poly1305",
                 segment_size: int = stream.DEFAULT_SEGMENT_SIZE, device: str = "auto",
                 read_device: str = "cpu", fo: Any = None, **kwargs: Any):
        unknown = sorted(set(kwargs) - _FSSPEC_OPTIONS)
        if unknown:  # a typo (kyeset=) or key bytes (key=) would be dropped without a word
            raise TypeError(
                f"unexpected option(s) for the gpucrypt filesystem: {', '.join(unknown)}; "
                f"keys are named by reference (keyset=, identities=, recipients=, "
                f"passphrase_env= or keys=KeyReferences(...): paths and URIs, never key "
                f"bytes, since fsspec pickles filesystems to workers), and the stored files' "
                f"filesystem by target_protocol= and target_options=")
        super().__init__(**kwargs)
        if fs is not None and target_protocol is not None:
            raise ValueError("give a target filesystem as fs= or as target_protocol=, not both")
        self.keys = KeyReferences.of(keys, keyset=keyset, identities=identities,
                                     recipients=recipients, passphrase_env=passphrase_env)
        self.fs = fs if fs is not None else fsspec.filesystem(target_protocol or "file",
                                                              **(target_options or {}))
        self.write_options = _write_options(algorithm, segment_size, device)
        self.read_device = read_device
        self._watched_keys = _WatchedKeys(self.keys)
        # (path, stored size, version fields) -> plaintext size; None: not a stream; _TRUNCATED
        self._sizes: dict[tuple, int | None] = {}

    # --------------------------------------------------------------------- paths and keys
    @classmethod
    def _strip_protocol(cls, path: Any) -> str:
        path = stringify_path(path)
        for prefix in ("gpucrypt://", "gpucrypt::"):
            if path.startswith(prefix):
                return path[len(prefix):]
        return path

    def _target(self, path: Any) -> str:
        return self.fs._strip_protocol(self._strip_protocol(path))

    def _keys(self) -> ResolvedKeys:
        """The keys, as their files are now (see :class:`_WatchedKeys`)."""
        return self._watched_keys.get()

    def _data_key(self, header: stream.Header, path: str) -> bytes:
        if not header.envelope:
            raise NoMatchingRecipient(f"{path}: this file carries no envelope (it was encrypted "
                                      f"with a raw key); read it with gpucrypt.stream.open")
        try:
            return self._keys().data_key(header.envelope, header.salt)
        except KeyManagementError as exc:
            if type(exc).__module__.partition(".")[0] == "gpucrypt":
                raise named_error(exc, path) from None  # gpucrypt's classes take a message
            failure: Exception = exc  # a provider's own class, whose constructor may differ
        except Exception as exc:
            failure = exc
        # a provider's own error (a KMS down: ConnectionError, TimeoutError; a key's file
        # missing, which is not this file missing: never to be left out as missing), said
        # as this file's, as every failure of a read is
        raise KeyProviderError(f"{path}: its keys could not be loaded "
                               f"({type(failure).__name__}: {failure})") from failure

    def _header(self, path: str) -> stream.Header:
        """The header of the stream at target ``path`` (not verified: no key is used)."""
        head = self.fs.cat_file(path, start=0, end=_HEAD_BYTES)
        try:
            return parse_header(io.BytesIO(head).read)
        except TruncatedError:
            if len(head) < _HEAD_BYTES:
                raise
        return parse_header(io.BytesIO(self.fs.cat_file(path, start=0,
                                                        end=_MAX_HEADER_BYTES)).read)

    def _plain_info(self, info: dict) -> dict:
        """``info`` (the target's) with the plaintext size (see the module docstring).
        A file gone before its header is read raises ``FileNotFoundError``; one whose
        header cannot be read (another ``OSError``) keeps its stored size with
        ``"encrypted": None`` (unknown, not remembered: asked again next time)."""
        info = dict(info)
        if info.get("type") != "file" or info.get("size") is None:
            return info
        path, stored = info["name"], int(info["size"])
        key = (path, stored, _version_of(info))
        # one look-up, kept in ``size``: another thread may clear the cache right after it
        size = self._sizes.get(key, _UNKNOWN)
        if size is _UNKNOWN:
            try:
                header = self._header(path)
            except TruncatedError:
                # raised only for a file that starts as a stream does (wrong magic bytes
                # are a FormatError): one at least as long as the magic has it whole, and
                # is a stream cut inside its header, listed as one cut inside a tag is;
                # a shorter one (the three bytes "GPU") is taken for some other file
                size = _TRUNCATED if stored >= len(MAGIC) else None
            except FormatError:
                size = None
            except FileNotFoundError:
                raise
            except OSError as exc:  # unreadable: listed all the same, as a plain listing does
                _log.debug("%s: header unreadable (%s): its size is the stored one", path, exc)
                info["stored_size"], info["encrypted"] = stored, None
                return info
            else:
                size = plaintext_size(header, stored)
                if size is None:  # listed all the same: exists, find, glob and du keep working
                    size = _TRUNCATED
            # remembered only where the target says which version of the file this is:
            # without, a file replaced by another of the same stored size (another header
            # length) would keep the first one's plaintext size
            if key[2]:
                if len(self._sizes) > 65536:
                    self._sizes.clear()
                self._sizes[key] = size
        info["stored_size"] = stored
        info["encrypted"] = size is not None
        if size == _TRUNCATED:
            info["truncated"] = True  # and the stored size: opening it raises TruncatedError
        elif size is not None:
            info["size"] = size
        return info

    # --------------------------------------------------------------------- listing
    def ls(self, path: Any, detail: bool = True, **kwargs: Any):
        """The target's listing, less this module's in-flight temporary files
        (``.NAME.XXXXXXXX.gpucrypt-tmp``); with ``detail``, plaintext sizes, and a file
        removed between the listing and its header read left out (another writer's
        temporary file renamed into place, say), as a local listing leaves out a file
        removed before it is stat'ed."""
        entries = [e for e in self.fs.ls(self._target(path), detail=True, **kwargs)
                   if not _is_temp_name(e["name"])]
        if not detail:
            return [e["name"] for e in entries]
        listed = []
        for entry in entries:
            try:
                listed.append(self._plain_info(entry))
            except FileNotFoundError:
                continue
        return listed

    def info(self, path: Any, **kwargs: Any) -> dict:
        return self._plain_info(self.fs.info(self._target(path), **kwargs))

    def modified(self, path: Any):
        return self.fs.modified(self._target(path))

    def created(self, path: Any):
        return self.fs.created(self._target(path))

    # --------------------------------------------------------------------- reading
    def open(self, path: Any, mode: str = "rb", block_size: Any = None, cache_options: Any = None,
             compression: str | None = None, **kwargs: Any):
        """fsspec's ``open``; a compressed file opened for writing is published when the
        compressor is closed (see :class:`_CompressingWriter`); a text one is a
        :class:`_TextWriter` over the binary writer."""
        if "r" not in mode and "b" not in mode:
            text = {k: kwargs.pop(k) for k in ("encoding", "errors", "newline") if k in kwargs}
            binary = self.open(path, mode.replace("t", "") + "b", block_size=block_size,
                               cache_options=cache_options, compression=compression, **kwargs)
            return _TextWriter(binary, **text)
        if compression is None or "r" in mode:
            return super().open(path, mode, block_size=block_size,
                                cache_options=cache_options, compression=compression, **kwargs)
        from fsspec.compression import compr
        from fsspec.core import get_compression

        writer = super().open(path, mode, block_size=block_size, cache_options=cache_options,
                              **kwargs)
        try:
            codec = get_compression(self._strip_protocol(path), compression)  # "infer": or None
            if codec is None:
                return writer
            return _CompressingWriter(compr[codec](writer, mode="w"), writer)
        except BaseException:
            writer.discard()
            raise

    def _open(self, path: Any, mode: str = "rb", block_size: Any = None, autocommit: bool = True,
              cache_options: Any = None, **kwargs: Any):
        target = self._target(path)
        if mode == "rb":
            return self._open_reader(target, **kwargs)
        if mode == "wb":
            options = self._file_options(kwargs, target)
            self._encrypting_keys()
            if isinstance(self.fs, LocalFileSystem):
                self._local_destination(target)
            return _EncryptingWriter(self, target, autocommit, options)
        if mode.startswith("x"):
            raise ValueError(f"exclusive create ({mode!r}) is not supported by gpucrypt files: "
                             f"use pipe_file(path, data, mode='create') or put_file(local, "
                             f"path, mode='create'), which refuse an existing file "
                             f"(FileExistsError; checked first, not atomically), or check "
                             f"exists(path) yourself and open with 'wb'")
        raise ValueError(f"gpucrypt files open as 'rb' or 'wb', not {mode!r}: a stream file is "
                         f"written whole (appending would need its last segment resealed)")

    def _file_options(self, kwargs: dict, path: str, call: str = "open") -> dict | None:
        """Write options given for one file (``open(path, "wb", segment_size=...)``,
        ``pipe_file``, ``put_file``), over the filesystem's and checked now; None if none
        are given. Any other keyword argument must be one fsspec's ``open`` or the
        target's methods for ``call`` take (see :func:`_target_write_options`), else
        ``TypeError``, as the constructor refuses an option it does not take: a misspelt
        ``algoritm=`` dropped without a word would seal the file with the default."""
        unknown = sorted(set(kwargs) - set(_WRITE_OPTIONS) - _FSSPEC_FILE_OPTIONS
                         - _target_write_options(type(self.fs), call))
        if unknown:
            hints = [f"{name}= (did you mean {close[0]}=?)" if close else f"{name}="
                     for name in unknown
                     for close in [difflib.get_close_matches(name, _WRITE_OPTIONS, 1)]]
            protocol = self.fs.protocol if isinstance(self.fs.protocol, str) \
                else self.fs.protocol[0]
            raise TypeError(f"{path}: unexpected option(s) for writing a gpucrypt file: "
                            f"{', '.join(hints)}; a file is sealed with algorithm=, "
                            f"segment_size= and device=, and besides those a write takes "
                            f"only what fsspec's open and the target's ({protocol}) named "
                            f"arguments are (none is passed on: the sealed file is written "
                            f"whole): correct the name, or leave it out; nothing was written")
        given = {name: kwargs[name] for name in _WRITE_OPTIONS if name in kwargs}
        return _write_options(**{**self.write_options, **given}) if given else None

    def _open_target(self, target: str, **kwargs: Any) -> Any:
        """The stored file at ``target``, for reading, with a position no other reader
        moves (see :class:`_RangeFile`); elsewhere the target's own file object (local: a
        descriptor of its own per open, as fast as before). Every read of a stored file
        opens it here, and is refused here when a cache above would keep its plaintext
        (:func:`_refuse_cache_above`)."""
        _refuse_cache_above(self, target)
        if _shares_file_objects(self.fs):
            return _RangeFile(self.fs, target)
        return self.fs.open(target, "rb", **kwargs)

    def _open_reader(self, target: str, **kwargs: Any) -> GpucryptFile:
        stored = self._open_target(target, **kwargs)
        try:
            changed = _change_check(self.fs, target, stored)
        except BaseException:
            stored.close()
            raise
        return GpucryptFile(stored, lambda header: self._data_key(header, target), target,
                            device=self.read_device, changed=changed)

    def cat_file(self, path: Any, start: int | None = None, end: int | None = None,
                 **kwargs: Any) -> bytes:
        with self._open_reader(self._target(path)) as f:
            return _read_range(f, start, end)

    def cat(self, path: Any, recursive: bool = False, on_error: str = "raise",
            **kwargs: Any) -> Any:
        """fsspec's ``cat``, except that ``on_error`` applies only to a missing file
        (:data:`_MISSING`); any other error (a tampered or foreign file, keys that fail)
        raises whatever it says. fsspec's own would leave such a file out under
        ``"omit"``, as if it were missing, and a mapper's ``getitems(on_error="omit")``
        (zarr's reads) would then read a tampered chunk as a missing one, its fill value."""
        paths = self.expand_path(path, recursive=recursive, **kwargs)
        if not (len(paths) > 1 or isinstance(path, list)
                or paths[0] != self._strip_protocol(path)):
            return self.cat_file(paths[0], **kwargs)  # one file named: its bytes, as fsspec
        out = {}
        for p in paths:
            try:
                out[p] = self.cat_file(p, **kwargs)
            except _MISSING as exc:
                if on_error == "raise":
                    raise
                if on_error == "return":
                    out[p] = exc
        return out

    def cat_ranges(self, paths: list, starts: Any, ends: Any, max_gap: Any = None,
                   on_error: str = "return", **kwargs: Any) -> list:
        """Byte ranges of plaintext, one file opened once for all its ranges.
        ``on_error="return"`` returns a missing file's error (:data:`_MISSING`) in place of
        its ranges, as fsspec does; any other error raises whatever ``on_error`` says."""
        count = len(paths)
        starts = [starts] * count if not isinstance(starts, list) else starts
        ends = [ends] * count if not isinstance(ends, list) else ends
        if not len(starts) == len(ends) == count:
            raise ValueError("paths, starts and ends must have the same length")
        out: list = [None] * count
        by_path: dict[str, list[int]] = {}
        for i, p in enumerate(paths):
            by_path.setdefault(self._target(p), []).append(i)
        for target, indices in by_path.items():
            try:
                with self._open_reader(target) as f:
                    for i in _reading_order(f, [starts[i] or 0 for i in indices], indices):
                        out[i] = _read_range(f, starts[i], ends[i])
            except _MISSING as exc:
                if on_error != "return":
                    raise
                for i in indices:
                    out[i] = exc
        return out

    def get_file(self, rpath: Any, lpath: Any, callback: Any = None, outfile: Any = None,
                 **kwargs: Any) -> None:
        """Decrypt ``rpath`` into the local file ``lpath`` (its folder made), atomically
        (renamed into place only once every segment verified), or, as fsspec does, into
        a file object given as ``lpath`` or ``outfile`` (on an error it may hold the
        verified plaintext of the segments before the bad one: not to be used). A folder
        ``rpath`` makes the local folder (``get(..., recursive=True)`` passes folders).
        ``lpath`` is a local path as fsspec's local filesystem takes it (``file://``
        stripped); one that is the stored file itself is refused before anything is
        written (see :func:`_refuse_same_local_file`)."""
        target = self._target(rpath)
        if outfile is None and isfilelike(lpath):
            outfile = lpath
        elif outfile is None and self.fs.isdir(target):
            os.makedirs(LocalFileSystem._strip_protocol(lpath), exist_ok=True)
            return
        if outfile is None:
            lpath = os.path.abspath(LocalFileSystem._strip_protocol(lpath))
        with self._open_target(target) as f:
            if outfile is None:
                _refuse_same_local_file(self.fs, target, f, lpath)
                os.makedirs(os.path.dirname(lpath), exist_ok=True)
            try:
                key = self._data_key(stream.read_header(f), target)
                f.seek(0)
                stream.decrypt(f, lpath if outfile is None else outfile, key,
                               device=self.write_options["device"])
            except StreamError as exc:
                raise named_error(exc, target) from None

    # --------------------------------------------------------------------- writing
    def _publish(self, target: str, source: Any, options: dict | None = None) -> None:
        """Seal ``source`` (plaintext chunks, or a local path) into a stream file at target
        path ``target``, published at once (see the module docstring); ``options``: write
        options for this file, else the filesystem's."""
        seal = self._sealing(options)
        if isinstance(self.fs, LocalFileSystem):
            self._local_destination(target)
            encrypt_file(source, target, **seal)  # AtomicFile: temp, fsync, rename
            return
        temp, events = self._seal_beside(target, source, seal)
        self._place_recorded(temp, target, events)

    def _encrypting_keys(self) -> ResolvedKeys:
        """The keys as their files are now, refused (``ValueError``) when they cannot
        encrypt: checked when a writer opens, before any plaintext is buffered, and again
        when it is sealed (the key files may have changed)."""
        keys = self._keys()
        if not keys.can_encrypt():
            raise ValueError("writing a gpucrypt file needs recipients= or keyset= (this "
                             "filesystem was given identities only): make a filesystem "
                             "with keyset= or recipients= to write")
        return keys

    def _sealing(self, options: dict | None) -> dict:
        """``encrypt_file``'s arguments for one file: the keys as their files are now."""
        return dict(recipients=self._encrypting_keys().wrappers(),
                    **(options or self.write_options))

    def _local_destination(self, target: str) -> None:
        """Refuse a local ``target`` that a write could only fail on at its end: a folder
        (``IsADirectoryError``), or one whose folder is missing (``FileNotFoundError``),
        which is made instead where the target filesystem has ``auto_mkdir`` (as its own
        writes do). A symbolic link is left to the write, which refuses it (ELOOP)."""
        if not os.path.islink(target) and os.path.isdir(target):
            raise IsADirectoryError(errno.EISDIR, "it is a folder: give the path of a file "
                                    "inside it, or remove the folder first", target)
        folder = os.path.dirname(target) or "."
        if getattr(self.fs, "auto_mkdir", False):
            os.makedirs(folder, exist_ok=True)
        elif not os.path.isdir(folder):
            raise FileNotFoundError(errno.ENOENT, f"its folder {folder} does not exist: make it "
                                    f"first (fs.makedirs), or give the target auto_mkdir=True "
                                    f"(target_options={{'auto_mkdir': True}})", target)

    def _seal_beside(self, target: str, source: Any, seal: dict) -> tuple[str, list]:
        """Seal ``source`` into a new hidden temporary file in ``target``'s folder (see
        :func:`_temp_beside`); its path (nothing is left there if this fails), and the
        sealing's audit events, held back for :meth:`_place_recorded` (written at once if
        this fails). On a local target it is created exclusively, fsynced, and tracked for
        the signal cleanup of :mod:`gpucrypt.files._atomic` until :meth:`_place` or
        :meth:`_drop_temp` ends it."""
        with audit._held("file.encrypt") as events:
            return self._seal_temp(target, source, seal), events

    def _seal_temp(self, target: str, source: Any, seal: dict) -> str:
        """:meth:`_seal_beside`'s work: the temporary file's path."""
        if not isinstance(self.fs, LocalFileSystem):
            temp = _temp_beside(target)
            try:
                with self.fs.open(temp, "wb") as out:
                    encrypt_file(source, out, **seal)
            except BaseException as exc:
                self._remove_quietly(temp)
                _raise_as_target(exc, temp, target)
                raise
            return temp
        self._local_destination(target)
        for _ in range(100):
            temp = _temp_beside(target)
            # tracked before it exists, as _atomic's own temporary files are
            _track(temp)
            try:
                # sealed into an unnamed file where the system has them, then linked to
                # ``temp`` (never over an existing file): fsynced, only a rename is left
                with AtomicFile(temp, overwrite=False) as out:
                    encrypt_file(source, out, **seal)
                return temp
            except OutputExists:
                _untrack(temp)  # another file's name (32 random bits): not ours to remove
                continue
            except BaseException as exc:
                self._drop_temp(temp)
                _raise_as_target(exc, temp, target)
                raise
        raise FileExistsError(f"no free temporary name beside {target} after 100 tries")

    def _place_recorded(self, temp: str, target: str, events: list) -> None:
        """:meth:`_place`, then the sealing's held audit ``events`` written: as they are
        once the file is in place, as errors naming what failed if it could not be moved
        there (the caller is told it failed: the log must not say it was done)."""
        try:
            self._place(temp, target)
        except BaseException as exc:
            audit._release(events, error=audit.error_fields(exc))
            raise
        audit._release(events)

    def _place(self, temp: str, target: str) -> None:
        """Move the sealed ``temp`` over ``target`` (a rename where the target has one);
        on failure ``temp`` is removed and the error raised. A local ``target`` that is a
        symbolic link is refused (``OSError`` ELOOP), as every local write refuses it
        (:class:`~gpucrypt.files._atomic.AtomicFile`): renamed over, the link's own
        target would keep the old data. Elsewhere a ``target`` that is a folder is refused
        (``IsADirectoryError``; checked before the move, not atomically with it), and a
        move that leaves no file at ``target`` raises ``OSError``."""
        try:
            if isinstance(self.fs, LocalFileSystem):
                _refuse_link(target)
                os.replace(temp, target)
                _untrack(temp)  # renamed: nothing of it left for the signal cleanup
                fsync_folder(os.path.dirname(target) or ".")
            else:
                # fsspec's generic mv copies into a folder: the file would land inside it
                # under its temporary name, and the write look done
                if self.fs.isdir(target):
                    raise IsADirectoryError(errno.EISDIR, "it is a folder: the file was not "
                                            "written; give the path of a file inside it, or "
                                            "remove the folder first", target)
                moved = move_exactly(self.fs, temp, target)
                # some targets report a failed move by what they return, not by raising
                if not self.fs.isfile(target):
                    raise OSError(errno.EIO, f"the target's move left no file there (it "
                                  f"returned {moved!r}): the file was not written; retry "
                                  f"commit(), or check the target", target)
        except BaseException as exc:
            self._drop_temp(temp)
            _raise_as_target(exc, temp, target)
            raise

    def _drop_temp(self, temp: str) -> None:
        """Remove a temporary file of :meth:`_seal_beside` (if it is there) and stop
        tracking it."""
        try:
            self._remove_quietly(temp)
        finally:
            if isinstance(self.fs, LocalFileSystem):
                _untrack(temp)

    def _remove_quietly(self, temp: str) -> None:
        try:
            self.fs.rm_file(temp)
        except Exception:  # noqa: BLE001 - never created, or already moved
            pass

    def put_file(self, lpath: Any, rpath: Any, callback: Any = None, mode: str = "overwrite",
                 **kwargs: Any) -> None:
        """Encrypt the local file ``lpath`` into ``rpath`` (streamed, published at once).
        ``mode="create"`` refuses an existing ``rpath`` (``FileExistsError``, as fsspec's
        filesystems do); inside a transaction the sealed file waits beside ``rpath``
        until the transaction ends (see the module docstring)."""
        target = self._target(rpath)
        options = self._file_options(kwargs, target, "put_file")  # first: a typo does nothing
        if mode == "create" and self.exists(rpath):
            raise FileExistsError(f"{rpath} exists and put_file was given mode='create': "
                                  f"remove it first, or put with mode='overwrite'")
        if os.path.isdir(lpath):
            self.makedirs(rpath, exist_ok=True)
            return
        if not self._intrans:
            self._publish(target, os.fspath(lpath), options)
            return
        if isinstance(self.fs, LocalFileSystem):
            _refuse_link(target)  # now, as outside a transaction (and again at the commit)
        # staged now (the local file may change before the end), published by the commit
        temp, events = self._seal_beside(target, os.fspath(lpath), self._sealing(options))
        self.transaction.files.append(_StagedPut(self, temp, target, events))

    # --------------------------------------------------------------------- plain delegation
    def mkdir(self, path: Any, create_parents: bool = True, **kwargs: Any) -> None:
        self.fs.mkdir(self._target(path), create_parents=create_parents, **kwargs)

    def makedirs(self, path: Any, exist_ok: bool = False) -> None:
        self.fs.makedirs(self._target(path), exist_ok=exist_ok)

    def rmdir(self, path: Any) -> None:
        self.fs.rmdir(self._target(path))

    def rm_file(self, path: Any) -> None:
        self.fs.rm_file(self._target(path))

    def rm(self, path: Any, recursive: bool = False, maxdepth: int | None = None) -> None:
        paths = path if isinstance(path, list) else [path]
        self.fs.rm([self._target(p) for p in paths], recursive=recursive, maxdepth=maxdepth)

    def cp_file(self, path1: Any, path2: Any, **kwargs: Any) -> None:
        """Copy the stored bytes: a stream file does not depend on its name, so the copy
        decrypts as the original does (and a file moved or swapped by someone else is not
        detected either: see the module docstring). On a local target the copy is
        published at once, as every write is (the target's own ``cp_file`` truncates the
        destination and rewrites it in place: a copy cut short would leave it clobbered,
        and a reader holding it open would see the new bytes); elsewhere it is the
        target's copy (an object store's is whole)."""
        source, target = self._target(path1), self._target(path2)
        if not isinstance(self.fs, LocalFileSystem) or not os.path.isfile(source):
            self.fs.cp_file(source, target, **kwargs)  # folders, missing files: as the target
            return
        self._local_destination(target)
        with open(source, "rb") as src, AtomicFile(target) as out:
            shutil.copyfileobj(src, out, 1 << 20)

    def mv(self, path1: Any, path2: Any, **kwargs: Any) -> None:
        """The target's ``mv``, as fsspec's: a name holding ``*``, ``?`` or ``[`` is a glob
        pattern there (object stores), as in ``rm``; :func:`move_exactly` moves a file by its
        exact name (what this filesystem's own writes use)."""
        self.fs.mv(self._target(path1), self._target(path2), **kwargs)


def _read_range(f: GpucryptFile, start: int | None, end: int | None) -> bytes:
    """Plaintext bytes ``[start, end)`` of ``f`` (negative: from the end; None: the edge)."""
    size = f.size
    start = 0 if start is None else _resolve(start, size)
    end = size if end is None else min(_resolve(end, size), size)
    if end <= start:
        return b""
    f.seek(start)
    return f.read(end - start)


def _resolve(offset: int, size: int) -> int:
    """A byte offset as fsspec gives it (negative: from the end) as one from the start."""
    return max(0, size + offset) if offset < 0 else offset


def _reading_order(f: GpucryptFile, starts: list[int], indices: list[int]) -> list[int]:
    """``indices`` in the order that decrypts fewest segments: the ranges starting in the final
    segment first (the reader holds it, verified on opening), then the rest by offset (the
    reader keeps the segment it read last, so a segment shared by neighbours opens once)."""
    S = f.header.segment_size
    final = max(0, f.size - 1) // S

    def key(pair):
        start = _resolve(pair[0], f.size)
        return start // S != final, start
    return [i for _, i in sorted(zip(starts, indices), key=key)]
