"""Ray Data pipelines that encrypt and decrypt datasets of files or binary columns.

``import ray`` below is the Ray package (imports are absolute), not this module.

Pieces, each usable on its own in a Ray Data pipeline::

    refs = KeyReferences(keyset="/keys/team.json")        # a path: no key in the task graph
    ds = ray.data.read_binary_files("/data/raw", include_paths=True)
    ds = ds.map_batches(EncryptBatch, fn_constructor_kwargs={"keys": refs},
                        compute=ray.data.ActorPoolStrategy(size=4), num_gpus=1,
                        batch_format="pyarrow")
    ds.write_datasink(GpucryptDatasink("/data/enc", relative_to="/data/raw"))

- :class:`EncryptBatch` / :class:`DecryptBatch`: callable classes for ``map_batches``
  (long-lived actors): each resolves its keys once, in the actor, and holds them with
  its GPU context; every row's binary ``column`` becomes a whole gpucrypt stream file
  (a fresh data key wrapped for the recipients and/or the keyset's primary) or its
  plaintext. Batches are ``numpy`` or ``pandas`` batches.
- :class:`StagedFilesDatasink` writes one file per row under a folder, and publishes them
  only when the whole job succeeded: write tasks write into a hidden staging folder
  inside it; on success each file is moved into place (a rename on local and most
  POSIX targets) and the staging folder removed; on a failure before publishing the
  staging folder is removed and nothing appears. A failure while the files are being
  moved into place keeps the staging folder, which holds the only copy of the files not
  yet moved, and raises :class:`PartialPublishError`, naming the files published and
  where the rest are. :class:`GpucryptDatasink` is one for gpucrypt files: it refuses
  rows that are not gpucrypt streams, or encrypts them itself when given keys.
- :func:`encrypt_files`, :func:`decrypt_files` run those pipelines over a folder, with
  one actor per GPU (``num_gpus=1``) where the cluster has GPUs and CPU actors
  otherwise; :func:`read_encrypted` reads gpucrypt files through the
  :mod:`gpucrypt.fs` filesystem (decrypted in the read tasks).

Keys travel by reference (:class:`KeyReferences`: paths, key URIs, provider-backed keys),
resolved in the actors and tasks that use them. Objects holding key material are refused
by a check of known types (key bytes, a loaded ``Keyset``, ``KeysetKey`` or ``Identity``,
a ``WrappingKey`` made from bytes, a ``FileKeyProvider``): any other object with
``get_key`` is taken as a provider, and whatever it holds travels in the task graph with
it. A provider of your own must hold where its keys are, not the keys.

Errors: a tampered, truncated or foreign file fails the job; the exception Ray raises
carries the gpucrypt error, whose message starts with the file's path.
"""
from __future__ import annotations

import errno
import io
import logging
import os
import posixpath
import re
import uuid
from typing import Any, Iterable

import fsspec
from fsspec.implementations.dirfs import DirFileSystem
import numpy as np
import pyarrow as pa
import ray
import ray.data
from ray.data import Datasink
from ray.data.block import BlockAccessor

from .files import stream
from .files._format import MAGIC as STREAM_MAGIC, StreamError
from .fs import (GpucryptFileSystem, move_exactly, named_error, on_local_disk,
                 plaintext_size)
from .keys import NoMatchingRecipient, encrypt_file
from .keys.portable import KeyReferences

__all__ = ["EncryptBatch", "DecryptBatch", "StagedFilesDatasink", "GpucryptDatasink",
           "PartialPublishError", "encrypt_files", "decrypt_files", "read_encrypted",
           "gpus_per_actor", "cpus_per_actor"]

_log = logging.getLogger(__name__)

#: rows per batch handed to an actor by the folder helpers (small files: amortise the
#: per-batch hand-off; large files: bounded memory)
DEFAULT_BATCH_SIZE = 32


def _columns(batch: Any, binary: str) -> dict:
    """A numpy (dict) or pandas batch as a dict of numpy arrays; the column ``binary`` as
    an object array of its values (np.asarray would make a list of bytes a fixed-width
    'S' array, which drops each value's trailing NUL bytes)."""
    return {name: _binary_values(values, name) if name == binary else np.asarray(values)
            for name, values in batch.items()}


def _binary_values(values: Any, name: str) -> np.ndarray:
    if isinstance(values, np.ndarray):
        if values.dtype.kind in "SU":  # the NULs an 'S' array dropped are gone already
            raise TypeError(f"the column {name!r} is a numpy {values.dtype} array: 'S' arrays "
                            f"drop the trailing NUL bytes of their values and 'U' arrays hold "
                            f"text; give the bytes as a list or an object array "
                            f"(np.array(values, dtype=object))")
        return values
    return _objects(list(values))


def _has_rows(batch: Any) -> bool:
    """Whether a batch holds rows. Ray hands over emptied blocks (a filter that kept none
    of a block's rows) without their columns, so an empty batch may lack ``column``."""
    if isinstance(batch, dict):
        return any(len(values) for values in batch.values())
    return len(batch) > 0  # an Arrow table's or a DataFrame's rows


def _row_names(batch: dict, path_column: str | None, count: int) -> list[str]:
    if path_column and path_column in batch:
        return [str(p) for p in batch[path_column]]
    return [f"row {i} of its batch" for i in range(count)]


def _objects(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


#: the batch format the folder helpers ask for: Arrow binary columns are read in place
#: and written as one buffer per batch (numpy batches copy every value into a ``bytes``)
BATCH_FORMAT = "pyarrow"


def _binary_views(column: Any) -> list[memoryview]:
    """The values of an Arrow binary column as views of its data buffers (no copy)."""
    views: list[memoryview] = []
    for chunk in getattr(column, "chunks", [column]):
        if pa.types.is_binary(chunk.type):
            offset_type = np.int32
        elif pa.types.is_large_binary(chunk.type):
            offset_type = np.int64
        else:
            raise TypeError(f"the column must be binary, not {chunk.type}")
        if chunk.null_count:
            raise ValueError("the column holds nulls: every row needs bytes")
        _, offsets, data = chunk.buffers()
        ends = np.frombuffer(offsets, offset_type)[chunk.offset:chunk.offset + len(chunk) + 1]
        data = memoryview(data if data is not None else b"")
        ends = ends.tolist()
        views += [data[a:b] for a, b in zip(ends[:-1], ends[1:])]
    return views


class _Packed:
    """Files written one after another into one growing buffer, then given as an Arrow
    binary array over that buffer (no copy). ``expected``: about the bytes to come."""

    def __init__(self, expected: int):
        self.out = io.BytesIO()
        if expected:  # one allocation up front; the rest is written in place
            self.out.seek(expected - 1)
            self.out.write(b"\0")
            self.out.seek(0)
        self.ends = [0]

    def add(self, write: Any) -> None:
        """``write(file_object)`` writes one file."""
        write(self.out)
        self.ends.append(self.out.tell())

    def array(self) -> "pa.Array":
        size = self.ends[-1]
        self.out.truncate(size)
        kind, offset_type = (pa.binary(), np.int32) if size < 2**31 else (pa.large_binary(), np.int64)
        data = pa.py_buffer(self.out.getbuffer()[:size])  # keeps the buffer alive
        return pa.Array.from_buffers(kind, len(self.ends) - 1,
                                     [None, pa.py_buffer(np.asarray(self.ends, offset_type)), data])


def _with_column(table: "pa.Table", name: str, values: "pa.Array") -> "pa.Table":
    return table.set_column(table.schema.get_field_index(name), name, values)


def _actor_cpus() -> int:
    """The whole CPUs Ray gave this actor (at least 1): its threads for the cipher."""
    if not ray.is_initialized():  # called outside Ray: asking would start a local Ray
        return 1
    context = ray.get_runtime_context()
    if context.worker.mode != ray.WORKER_MODE:  # the driver has no share of its own
        return 1
    return max(1, int(context.get_assigned_resources().get("CPU", 1)))


class _Sealer:
    """Seals byte strings into whole gpucrypt stream files with keys resolved here."""

    def __init__(self, keys: KeyReferences, options: dict):
        self._keys = keys.resolve()
        if not self._keys.can_encrypt():
            raise ValueError("encrypting needs recipients= or keyset= (only identities given)")
        self._options = options

    def seal_to(self, data: Any, out: Any) -> None:
        """Write the stream file of ``data`` to the file object ``out``."""
        encrypt_file(memoryview(data), out, recipients=self._keys.wrappers(), **self._options)

    def seal(self, data: Any) -> bytes:
        out = io.BytesIO()
        self.seal_to(data, out)
        return out.getvalue()


class EncryptBatch:
    """``map_batches`` callable class: every row's ``column`` (bytes) becomes a gpucrypt stream
    file's bytes. ``keys`` is a :class:`KeyReferences` (or give ``keyset=``/``recipients=``),
    resolved in the actor. ``algorithm``, ``segment_size``, ``device`` and ``threads`` are
    :func:`gpucrypt.stream.encrypt`'s (``threads`` default: the CPUs Ray gave the actor).

    A ``pyarrow`` batch (:data:`BATCH_FORMAT`) is read in place and its files are written
    into one buffer, which the returned table's column is; numpy and pandas batches give
    a dict of numpy arrays (a ``bytes`` object per file)."""

    def __init__(self, keys: KeyReferences | None = None, *, column: str = "bytes",
                 algorithm: str = "chacha20-poly1305",
                 segment_size: int = stream.DEFAULT_SEGMENT_SIZE, device: str = "auto",
                 threads: int | None = None, **references: Any):
        self.column = column
        self.segment_size = segment_size
        self._sealer = _Sealer(KeyReferences.of(keys, **references),
                               {"algorithm": algorithm, "segment_size": segment_size,
                                "device": device, "threads": threads or _actor_cpus()})

    def __call__(self, batch: Any) -> Any:
        if not _has_rows(batch):
            return batch
        if isinstance(batch, pa.Table):
            values = _binary_views(batch.column(self.column))
            # the output's size less its headers (a few hundred bytes each, grown into)
            expected = sum(len(v) + 16 * (-(-len(v) // self.segment_size) or 1) for v in values)
            packed = _Packed(expected + 512 * len(values))
            for value in values:
                packed.add(lambda out, value=value: self._sealer.seal_to(value, out))
            return _with_column(batch, self.column, packed.array())
        columns = _columns(batch, self.column)
        columns[self.column] = _objects([self._sealer.seal(v) for v in columns[self.column]])
        return columns


class DecryptBatch:
    """``map_batches`` callable class: every row's ``column`` (a gpucrypt stream file's bytes)
    becomes its plaintext, verified whole. A file that fails raises, naming it by
    ``path_column`` (``read_binary_files(..., include_paths=True)`` gives it)."""

    def __init__(self, keys: KeyReferences | None = None, *, column: str = "bytes",
                 path_column: str | None = "path", device: str = "auto",
                 threads: int | None = None, **references: Any):
        self.column, self.path_column, self.device = column, path_column, device
        self.threads = threads or _actor_cpus()
        self._keys = KeyReferences.of(keys, **references).resolve()

    def open(self, data: Any, name: str) -> bytes:
        """The plaintext of the stream file ``data`` (called ``name`` in errors)."""
        out = io.BytesIO()
        self.open_to(data, name, out)
        return out.getvalue()

    def open_to(self, data: Any, name: str, out: Any) -> None:
        """Write the plaintext of the stream file ``data`` to the file object ``out``; on an
        error, what it wrote is not to be used (see :func:`gpucrypt.stream.decrypt`)."""
        try:
            header = stream.read_header(data)
            if not header.envelope:
                raise NoMatchingRecipient("this file carries no envelope (it was encrypted "
                                          "with a raw key)")
            stream.decrypt(data, out, self._keys.data_key(header.envelope, header.salt),
                           device=self.device, threads=self.threads)
        except StreamError as exc:
            raise named_error(exc, name) from None
        except NoMatchingRecipient as exc:
            raise NoMatchingRecipient(f"{name}: {exc}") from None

    def __call__(self, batch: Any) -> Any:
        if not _has_rows(batch):
            return batch
        if isinstance(batch, pa.Table):
            values = _binary_views(batch.column(self.column))
            names = (batch.column(self.path_column).to_pylist()
                     if self.path_column in batch.column_names
                     else _row_names({}, None, len(values)))
            packed = _Packed(sum(len(v) for v in values))
            for value, name in zip(values, names):
                packed.add(lambda out, value=value, name=name: self.open_to(value, name, out))
            return _with_column(batch, self.column, packed.array())
        columns = _columns(batch, self.column)
        values = columns[self.column]
        names = _row_names(columns, self.path_column, len(values))
        columns[self.column] = _objects([self.open(v, n) for v, n in zip(values, names)])
        return columns


class PartialPublishError(Exception):
    """Publishing a sink's files failed part-way: ``published`` (names relative to the
    folder) are in place, ``remaining`` are still in the staging folder ``staging``, kept
    (the first of them, being moved when the error came, may be in either place). The
    cause is chained (``__cause__``)."""

    def __init__(self, message: str, published: Iterable[str] = (),
                 remaining: Iterable[str] = (), staging: str = ""):
        super().__init__(message)
        self.published, self.remaining = list(published), list(remaining)
        self.staging = staging

    def __reduce__(self):  # the lists survive a pickle (Ray sends errors between processes)
        return type(self), (str(self), self.published, self.remaining, self.staging)


def _some(names: list[str], shown: int = 5) -> str:
    """A few of ``names``, and how many more: an error message stays readable."""
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more" if more > 0 else "") if names \
        else "none"


class StagedFilesDatasink(Datasink):
    """Writes each row's ``column`` as a file under ``path`` (a local folder or an fsspec URL;
    ``filesystem`` an fsspec filesystem to use instead of the URL's), published only when the
    whole job succeeded (see the module docstring).

    File names: the row's ``path_column`` relative to ``relative_to`` (its base name when
    None), less ``strip_suffix``, plus ``suffix``. A source outside ``relative_to`` raises
    ``ValueError``, and so does a name that would not name a file of the folder (a path
    component that is empty, ``.`` or ``..``: the source ``...gc`` less ``.gc``);
    ``..config`` is a file like any other.

    Publishing: on a local target whose folder does not exist yet when the sink is made,
    the staging folder is its hidden sibling and becomes the folder in one rename (all
    files appear at once, or none). Elsewhere (an existing folder, an object store) the
    files are moved into place one by one: an error of the target during those moves
    raises :class:`PartialPublishError` (which files are published, which are left) and
    keeps the staging folder (``.gpucrypt-staging-*``), where the files not yet moved
    are, for the user to move or remove; a crash there leaves the same state unreported.
    A rerun of the job replaces the published files. A dataset without rows publishes an
    empty folder. A file whose place in the folder is taken by a folder
    (``IsADirectoryError``: a move onto a folder would put the file inside it), or, on
    the local disk, one whose parent path is a file (``NotADirectoryError``), is refused
    before anything is moved: nothing is published, the staging folder is removed. An
    object store (``s3://``, ``memory://``) takes ``a/new`` where an object ``a`` is, as
    its keys are names, not folders: it is published there.

    A sink may run several jobs, one after another. A folder kept by a publish that
    stopped part-way stays kept through the sink's later jobs (a failed one adds to it
    and leaves it; on_write_failed logs where it is) until the user removes it or a job
    publishes completely, which removes it with whatever is left in it.
    """

    def __init__(self, path: str, *, column: str = "bytes", path_column: str = "path",
                 relative_to: str | None = None, suffix: str = "", strip_suffix: str = "",
                 filesystem: Any = None, storage_options: dict | None = None):
        if filesystem is None:
            filesystem, path = fsspec.core.url_to_fs(path, **(storage_options or {}))
        else:
            filesystem = _fsspec_filesystem(filesystem)
            path = filesystem._strip_protocol(path)
            if on_local_disk(filesystem) and not isinstance(filesystem, DirFileSystem):
                path = os.path.abspath(path)  # write tasks may run in another folder
        self.fs, self.root = filesystem, path.rstrip("/")
        self.column, self.path_column = column, path_column
        # the rows' paths are the source's, not this sink's: spelled by the source's protocol
        self.relative_to = None if relative_to is None else _source_folder(relative_to)
        self.suffix, self.strip_suffix = suffix, strip_suffix
        staging = f"{_STAGING}{uuid.uuid4().hex}"
        # decided here, before Ray ships the sink to its write tasks
        self.whole = _takes_os_paths(self.fs) and not self.fs.exists(self.root)
        if self.whole:
            parent, name = posixpath.split(self.root)
            self.staging = posixpath.join(parent, f".{name}{staging}")
        else:
            self.staging = posixpath.join(self.root, staging)
        #: this job's names moved into place so far; None until publishing file by file
        #: starts, after which the staging folder holds the only copy of the rest
        self._published: list[str] | None = None
        #: a publish of this sink stopped part-way and kept the staging folder: a later
        #: job of the sink that fails keeps it too (it may hold that job's only copies)
        self._kept = False

    def name_of(self, source_path: str) -> str:
        """The output name (relative to the folder) of a row read from ``source_path``."""
        source_path = str(source_path)
        if self.relative_to is None:
            name = posixpath.basename(source_path)
        else:
            name = posixpath.relpath(source_path, self.relative_to)
        # relpath normalises: a name leaving the folder is ".." or starts with "../"
        # ("..config" is a file of the folder)
        if name == ".." or name.startswith("../") or posixpath.isabs(name) or not name \
                or name == ".":
            raise ValueError(f"{source_path} is not inside {self.relative_to}: give "
                             f"relative_to= the folder the rows were read from")
        if self.strip_suffix and name.endswith(self.strip_suffix):
            name = name[:-len(self.strip_suffix)]
        name += self.suffix
        # checked as it is written: stripping a suffix can leave "..", "." or "sub/.."
        # (the sources "...gc", "..gc", "sub/...gc"), which name a folder, not a file
        if any(part in ("", ".", "..") for part in name.split("/")):
            raise ValueError(f"{source_path} would be written as {name!r}, which names no "
                             f"file of {self.root} (a part of it is empty, '.' or '..'): "
                             f"rename the source file, or give a suffix= or strip_suffix= "
                             f"that leaves a file name")
        return name

    def prepare(self, data: bytes, name: str) -> bytes:
        """The bytes written for one row (subclasses check or transform them)."""
        return data

    def on_write_start(self, schema: Any = None) -> None:
        self._published = None  # a new job: nothing of it is published yet
        if self._kept and not self.fs.exists(self.staging):
            self._kept = False  # the user moved or removed what an earlier publish kept
        self.fs.makedirs(self.staging, exist_ok=True)

    def write(self, blocks: Iterable[Any], ctx: Any) -> list[str]:
        written = []
        for block in blocks:
            table = BlockAccessor.for_block(block).to_arrow()
            if not _has_rows(table):  # an emptied block comes without its columns
                continue
            values = table.column(self.column).to_pylist()
            sources = table.column(self.path_column).to_pylist()
            for data, source in zip(values, sources):
                name = self.name_of(source)
                staged = posixpath.join(self.staging, name)
                self.fs.makedirs(posixpath.dirname(staged), exist_ok=True)
                self.fs.pipe_file(staged, self.prepare(data, source))
                written.append(name)
        return written

    def on_write_complete(self, write_result: Any) -> None:
        names = [name for returned in write_result.write_returns for name in returned]
        if len(set(names)) != len(names):
            if not self._kept:  # else on_write_failed keeps it (an earlier job's files)
                self._remove_staging()
            raise ValueError(f"two rows map to the same output file under {self.root}: give "
                             f"relative_to= so that names keep their folders")
        # Ray starts the write only with a first block: a dataset without rows never made
        # the staging folder, and publishes it empty (an empty folder, as for no files)
        self.fs.makedirs(self.staging, exist_ok=True)
        self._check_staged(names)
        if self.whole and self._publish_whole():
            return
        self._refuse_what_is_in_the_way(names)
        self._published = []
        for name in names:
            final = posixpath.join(self.root, name)
            try:
                self.fs.makedirs(posixpath.dirname(final), exist_ok=True)
                move_exactly(self.fs, posixpath.join(self.staging, name), final)
            except Exception as exc:
                self._kept = True
                done = list(self._published)
                rest = names[len(done):]
                raise PartialPublishError(
                    f"publishing into {self.root} failed after {len(done)} of {len(names)} "
                    f"files ({type(exc).__name__}: {exc}). Published: {_some(done)}. Not "
                    f"published, kept in {self.staging}: {_some(rest)} ({rest[0]}, being "
                    f"moved, may be in either place). Move them into place by hand, or rerun "
                    f"the job (it replaces the published files); then remove {self.staging}",
                    done, rest, self.staging) from exc
            self._published.append(name)
        try:
            self._remove_staging()
        except Exception as exc:
            raise PartialPublishError(
                f"every file was published into {self.root}, but the staging folder "
                f"{self.staging} could not be removed ({type(exc).__name__}: {exc}): "
                f"remove it", names, (), self.staging) from exc
        # done: the sink's next job starts afresh (a failure of it before publishing
        # removes its staging folder)
        self._published, self._kept = None, False

    def _refuse_what_is_in_the_way(self, names: list[str]) -> None:
        """Raise, before any file is moved, when something other than a free place stands
        where one of ``names`` must go: a folder at the file's own path
        (``IsADirectoryError``: ``mv`` onto a folder moves the file inside it, local and
        fsspec's generic move alike, and reports success, so the job would look done
        with the file under another name), or a file (anything but a folder) at one of
        its parent paths (``NotADirectoryError``: the moves before it would be published,
        the job failing part-way at it). Told by one listing per folder the files go
        into that exists (one for names without folders), not one request per file.
        Checked first, not atomically with the moves: what is made meanwhile is still
        in the way. A folder at a file's path is refused on every target, object stores
        too (where an object and a prefix may share a name); a file at a parent path
        only where folders are real (the local disk,
        :func:`gpucrypt.fs.on_local_disk`): an object store takes ``a/new`` beside an
        object ``a``, as its own moves do."""
        kinds: dict[str, set] = {}  # path -> the types listed under it

        def kinds_of(relative: str) -> set:
            return kinds.get(posixpath.join(self.root, relative), set())

        parents = {posixpath.dirname(name) for name in names}
        for parent in list(parents):
            while parent:
                parent = posixpath.dirname(parent)
                parents.add(parent)
        for folder in sorted(parents, key=lambda f: (f.count("/"), f)):  # "" (the root) first
            if folder and "directory" not in kinds_of(folder):
                continue  # not there (nothing below it is), or a file only
            try:
                entries = self.fs.ls(posixpath.join(self.root, folder) if folder else self.root,
                                     detail=True)
            except FileNotFoundError:
                continue
            for entry in entries:
                path, kind = entry["name"].rstrip("/"), entry["type"]
                if entry.get("islink"):  # a local listing's link: what it points to counts
                    try:
                        kind = self.fs.info(path)["type"]
                    except FileNotFoundError:
                        pass  # a broken link: replaced by a move, as a file is
                kinds.setdefault(path, set()).add(kind)
        folders = [name for name in names if "directory" in kinds_of(name)]
        inside_files = []
        for name in names if on_local_disk(self.fs) else ():
            parts = name.split("/")[:-1]
            for depth in range(1, len(parts) + 1):
                parent = "/".join(parts[:depth])
                if kinds_of(parent) - {"directory"}:
                    inside_files.append(f"{name}: {parent} is a file")
                    break
        if not folders and not inside_files:
            return
        said = []
        if folders:
            said.append(f"{len(folders)} of the file(s) to publish would replace a folder "
                        f"({_some(folders)})")
        if inside_files:
            said.append(f"{len(inside_files)} of the file(s) to publish would go inside a "
                        f"file, not a folder ({_some(inside_files)})")
        error, code = (IsADirectoryError, errno.EISDIR) if folders else \
            (NotADirectoryError, errno.ENOTDIR)
        raise error(code, f"{'; '.join(said)}: nothing was published; remove or rename what "
                          f"is in the way, or write the rows under other names (suffix=, "
                          f"relative_to=), and run the job again", self.root)

    def _check_staged(self, names: list[str]) -> None:
        """Every file the write tasks reported is in the staging folder as this process sees
        it. A local path on a cluster of several machines is each machine's own disk:
        the tasks that ran elsewhere wrote there, and publishing this machine's folder
        would report success without their files."""
        if not on_local_disk(self.fs):  # dir:: over the local disk too: each node's own
            return  # an object store, or a filesystem of the caller's: one place for all
        found = {posixpath.relpath(p, self.staging) for p in self.fs.find(self.staging)}
        missing = [name for name in names if name not in found]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of {len(names)} file(s) the write tasks wrote are not in "
                f"{self.staging} on this machine ({_some(missing)}): the tasks ran on other "
                f"nodes, whose local disks hold them under that path; remove them there. "
                f"On a cluster of several nodes, write to a folder they all share (a "
                f"network filesystem) or to an object store URL; nothing was published")

    def _publish_whole(self) -> bool:
        """The staging folder renamed to the folder (atomic); False when something made
        the folder meanwhile and put files in it (then they are moved one by one)."""
        try:
            os.rename(self.staging, self.root)  # replaces an empty folder, never a full one
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            return False
        return True

    def on_write_failed(self, error: Exception) -> None:
        """Ray's call after any failure of the job, ``on_write_complete``'s included: the
        staging folder is removed unless publishing had started, when it holds the only
        copy of the files not yet published (the error says which), or an earlier job's
        publish of this sink stopped part-way and kept it."""
        if self._published is not None:
            _log.error("%s: the job failed once publishing had started (%d file(s) "
                       "published); kept the staging folder %s, which holds every file not "
                       "yet published: %s", self.root, len(self._published), self.staging,
                       error)
        elif self._kept:
            _log.error("%s: the job failed before publishing; kept the staging folder %s, "
                       "which still holds the files an earlier job of this sink left "
                       "unpublished: move them into place or remove it: %s", self.root,
                       self.staging, error)
        else:
            self._remove_staging()

    def _remove_staging(self) -> None:
        if self.fs.exists(self.staging):
            _remove_folder(self.fs, self.staging)


class GpucryptDatasink(StagedFilesDatasink):
    """A :class:`StagedFilesDatasink` of gpucrypt files (``suffix`` ``.gc`` by default).

    Without ``keys``, rows must already hold gpucrypt streams (from :class:`EncryptBatch`);
    one that does not raises rather than be stored in the clear. Without keys only the
    structure is checked: a row must start with a well-formed header and have a length
    that a whole stream under that header has; a header alone, or one followed by fewer
    bytes than a tag (16), after it or after a segment's end, is refused. Nothing is
    authenticated: any other cut stream, or a header followed by plaintext of such a
    length, is stored as it is and fails when it is read. With ``keys`` (a
    :class:`KeyReferences`) and stream options, the write tasks encrypt the rows.
    """

    def __init__(self, path: str, *, keys: KeyReferences | None = None, suffix: str = ".gc",
                 algorithm: str = "chacha20-poly1305",
                 segment_size: int = stream.DEFAULT_SEGMENT_SIZE, device: str = "auto",
                 **options: Any):
        super().__init__(path, suffix=suffix, **options)
        self.keys = keys
        self.stream_options = {"algorithm": algorithm, "segment_size": segment_size,
                               "device": device}
        self._sealer: _Sealer | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_sealer": None}  # resolved keys stay where they were made

    def prepare(self, data: bytes, name: str) -> bytes:
        if self.keys is not None:
            if self._sealer is None:
                self._sealer = _Sealer(self.keys, self.stream_options)
                # a pipeline that ran EncryptBatch and gave keys= too encrypts twice, which
                # works but doubles the work and the readers' keys: its first row tells
                if bytes(data[:len(STREAM_MAGIC)]) == STREAM_MAGIC:
                    _log.warning("%s: this row is a gpucrypt stream already, and is encrypted "
                                 "again (keys= was given to the sink): leave keys= out if the "
                                 "rows come from EncryptBatch", name)
            return self._sealer.seal(data)
        try:
            header = stream.read_header(data)
        except StreamError:
            raise ValueError(f"{name}: this row is not a gpucrypt stream; encrypt it first "
                             f"(EncryptBatch) or give GpucryptDatasink keys=") from None
        # a header alone, or one followed by a length no stream under it has (cut inside
        # a tag, a header glued to a short plaintext): the rest needs the keys
        if plaintext_size(header, len(data)) is None:
            raise ValueError(f"{name}: this row starts with a gpucrypt header but its "
                             f"length ({len(data)} bytes) is not that of a whole stream "
                             f"under it: cut short, or a header followed by something else; "
                             f"encrypt the rows whole (EncryptBatch) or give "
                             f"GpucryptDatasink keys=")
        return data


def _default_extensions(reader: Any) -> list[str] | None:
    """The extensions a Ray file reader keeps by default (``read_parquet``'s
    ``["parquet"]``), or None where it keeps every file or takes no such argument."""
    import inspect

    try:
        parameter = inspect.signature(reader).parameters.get("file_extensions")
    except (TypeError, ValueError):
        return None
    default = None if parameter is None else parameter.default
    return list(default) if isinstance(default, (list, tuple)) else None


def _fsspec_filesystem(filesystem: Any) -> Any:
    """``filesystem`` as fsspec's: a pyarrow one (what Ray's own datasinks take) wrapped."""
    if isinstance(filesystem, fsspec.AbstractFileSystem):
        return filesystem
    from pyarrow.fs import FileSystem

    if isinstance(filesystem, FileSystem):
        from fsspec.implementations.arrow import ArrowFSWrapper

        return ArrowFSWrapper(filesystem)
    raise TypeError(f"filesystem must be an fsspec or a pyarrow filesystem, not "
                    f"{type(filesystem).__name__}")


def _source_folder(folder: Any) -> str:
    """``relative_to`` as the rows' paths spell it: a local folder made absolute (Ray's
    listings give absolute paths), a URL less its protocol as that protocol's filesystem
    writes its paths (``s3://bucket/raw`` -> ``bucket/raw``, as pyarrow's and s3fs's
    listings do), whatever filesystem the sink itself writes to."""
    folder = os.fspath(folder)
    protocol, rest = fsspec.core.split_protocol(folder)
    if protocol in (None, "file", "local"):
        return os.path.abspath(rest).rstrip("/") or "/"
    try:
        stripped = fsspec.get_filesystem_class(protocol)._strip_protocol(folder)
    except (ImportError, ValueError):  # its package is missing here: the usual spelling
        stripped = rest
    return stripped.rstrip("/") or "/"


def _remove_folder(fs: Any, folder: str) -> None:
    """Remove ``folder`` and everything under it. ``rm(recursive=True)`` globs a path
    holding ``*``, ``?`` or ``[`` on an object store (a root such as ``out[1]``: it
    removed nothing and raised); such a folder is emptied file by file, by exact name,
    then its folders (see :func:`gpucrypt.fs.move_exactly`)."""
    from glob import has_magic  # what fsspec itself asks

    if not has_magic(folder):
        fs.rm(folder, recursive=True)
        return
    found = fs.find(folder, withdirs=True, detail=True)
    for path, info in found.items():
        if info["type"] != "directory":
            fs.rm_file(path)
    for path in sorted((p for p, i in found.items() if i["type"] == "directory"),
                       key=len, reverse=True) + [folder]:
        try:
            fs.rmdir(path)
        except FileNotFoundError:
            pass  # an object store's folders are prefixes: gone with their last file


def _takes_os_paths(fs: Any) -> bool:
    """Whether ``fs``'s paths are this machine's own (``os.rename`` takes them): the local
    disk by protocol, not under a ``dir::`` prefix (whose paths are the prefix's)."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def gpus_per_actor(num_gpus: float | None = None) -> float:
    """``num_gpus``, or 1 when the cluster has a GPU (one actor per GPU), else 0 (CPU actors)."""
    if num_gpus is not None:
        return num_gpus
    return 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0


def _local_folder(path: Any) -> str:
    path = os.fspath(path)
    return os.path.abspath(path) if "://" not in path else path


#: CPUs reserved by each read and write task of the folder helpers: they move bytes, the
#: actors do the cipher work
IO_TASK_CPUS = 0.25


def cpus_per_actor(actors: int, num_cpus: float | None = None) -> float:
    """``num_cpus``, or each actor's share of the cluster's CPUs once a read and a write task
    have theirs (at most 1). Actors that took every CPU would leave the read tasks that feed
    them waiting for ever: Ray Data keeps an actor pool's CPUs reserved for its lifetime."""
    if num_cpus is not None:
        return num_cpus
    cpus = ray.cluster_resources().get("CPU", 1)
    return max(0.1, min(1.0, (cpus - 2 * IO_TASK_CPUS) / actors))


#: what the name of a sink's staging folder holds (``.gpucrypt-staging-<uuid>``, or
#: ``.<folder>.gpucrypt-staging-<uuid>`` beside a new folder)
_STAGING = ".gpucrypt-staging-"
_STAGING_NAME = re.compile(r"\.(?:.+\.)?gpucrypt-staging-[0-9a-f]{32}")


def _files_under(folder: str) -> tuple[list[str], Any, str]:
    """Every file under ``folder`` (a local path or a URL), its pyarrow filesystem, and
    ``folder`` as that filesystem spells it (``bucket/raw`` for ``s3://bucket/raw``: the
    start of each listed path). Listed here because Ray's listing of a folder leaves out
    names starting with "." or "_" (``_SUCCESS``, ``.crc`` files beside Parquet parts),
    with no option to keep them in ``read_binary_files``; the files of a list are read as
    they are. Left out, and logged: what lies in the staging folders of this module's
    sinks (a crashed job's, or a running one's), whose files are not the folder's; a
    folder is one only by its exact name, a file is never one."""
    from pyarrow.fs import FileSelector, FileSystem, FileType

    filesystem, root = FileSystem.from_uri(folder)
    found = filesystem.get_file_info(FileSelector(root, recursive=True))
    files, staged = [], set()
    for f in found:
        if f.type != FileType.File:
            continue
        folders = posixpath.relpath(f.path, root).split("/")[:-1]
        staging = next((part for part in folders if _STAGING_NAME.fullmatch(part)), None)
        if staging is None:
            files.append(f.path)
        else:
            staged.add(staging)
    if staged:
        _log.warning("%s: left out the files of %d staging folder(s) of gpucrypt sinks "
                     "(%s): a running job's, or one that stopped; remove them once no job "
                     "writes there", folder, len(staged), _some(sorted(staged)))
    return sorted(files), filesystem, root


def _run_over_files(transform: type, src: Any, sink: StagedFilesDatasink, keys: KeyReferences,
                    actors: int, num_gpus: float | None, num_cpus: float | None,
                    batch_size: int, options: dict) -> None:
    paths, filesystem, root = _files_under(_local_folder(src))
    # names relative to the folder as the listing spells the rows' paths, whichever
    # filesystem the sink writes to (an S3 source's rows are "bucket/raw/...")
    sink.relative_to = root.rstrip("/") or "/"
    if not paths:  # read_binary_files refuses no paths; the sink publishes an empty folder
        ray.data.from_items([]).write_datasink(sink)
        return
    ds = ray.data.read_binary_files(paths, filesystem=filesystem, include_paths=True,
                                    num_cpus=IO_TASK_CPUS)
    ds = ds.map_batches(transform, fn_constructor_kwargs={"keys": keys, **options},
                        compute=ray.data.ActorPoolStrategy(size=actors),
                        num_cpus=cpus_per_actor(actors, num_cpus),
                        num_gpus=gpus_per_actor(num_gpus), batch_size=batch_size,
                        batch_format=BATCH_FORMAT)
    ds.write_datasink(sink, ray_remote_args={"num_cpus": IO_TASK_CPUS})


def encrypt_files(src: Any, dst: Any, *, keys: KeyReferences | None = None, actors: int = 2,
                  num_gpus: float | None = None, num_cpus: float | None = None,
                  batch_size: int = DEFAULT_BATCH_SIZE,
                  suffix: str = ".gc", algorithm: str = "chacha20-poly1305",
                  segment_size: int = stream.DEFAULT_SEGMENT_SIZE, **references: Any) -> None:
    """Encrypt every file under the folder ``src`` into ``dst`` (same relative names plus
    ``suffix``) with ``actors`` :class:`EncryptBatch` actors; published when all succeeded.
    Every file means names starting with "." or "_" too, which Ray's own listing of a
    folder leaves out; an empty folder gives an empty one.
    ``num_gpus``/``num_cpus`` per actor: see :func:`gpus_per_actor`, :func:`cpus_per_actor`."""
    keys = KeyReferences.of(keys, **references)
    sink = GpucryptDatasink(_local_folder(dst), suffix=suffix)
    _run_over_files(EncryptBatch, src, sink, keys, actors, num_gpus, num_cpus, batch_size,
                    {"algorithm": algorithm, "segment_size": segment_size})


def decrypt_files(src: Any, dst: Any, *, keys: KeyReferences | None = None, actors: int = 2,
                  num_gpus: float | None = None, num_cpus: float | None = None,
                  batch_size: int = DEFAULT_BATCH_SIZE,
                  strip_suffix: str = ".gc", **references: Any) -> None:
    """Decrypt every gpucrypt file under ``src`` into ``dst`` (relative names less
    ``strip_suffix``) with ``actors`` :class:`DecryptBatch` actors. A file that fails fails
    the job, naming it, and nothing is published."""
    keys = KeyReferences.of(keys, **references)
    sink = StagedFilesDatasink(_local_folder(dst), strip_suffix=strip_suffix)
    _run_over_files(DecryptBatch, src, sink, keys, actors, num_gpus, num_cpus, batch_size, {})


def read_encrypted(paths: Any, *, keys: KeyReferences | None = None,
                   target_protocol: str = "file", target_options: dict | None = None,
                   reader: Any = None, suffix: str = ".gc",
                   **read_args: Any) -> "ray.data.Dataset":
    """A dataset read from gpucrypt files through the :mod:`gpucrypt.fs` filesystem:
    ``reader`` (default ``ray.data.read_binary_files``; ``read_parquet`` and the other
    file readers work too) gets it as a pyarrow filesystem, and the read tasks decrypt.
    A folder is listed by the reader's own rules, as for files that are not encrypted:
    Ray's leave out names starting with "." or "_" (``_SUCCESS`` beside Parquet parts);
    give such files by name, in a list, to read them. A reader that keeps only its own
    extensions (``read_parquet``: ``.parquet``) keeps them also followed by ``suffix``
    (``train.parquet.gc``, as :func:`encrypt_files` names it) unless ``file_extensions=``
    is given. ``keys`` or ``keyset=``/``identities=``: references, resolved in each read
    task."""
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    references = {k: read_args.pop(k) for k in ("keyset", "identities", "recipients",
                                                 "passphrase_env") if k in read_args}
    fs = GpucryptFileSystem(target_protocol=target_protocol, target_options=target_options,
                            keys=KeyReferences.of(keys, **references))
    reader = reader or ray.data.read_binary_files
    if suffix and "file_extensions" not in read_args:
        extensions = _default_extensions(reader)
        if extensions:
            # both: a file encrypted under its own name (fsspec, a sink with suffix="")
            read_args["file_extensions"] = extensions + [ext + suffix for ext in extensions]
    if isinstance(paths, (str, os.PathLike)) and target_protocol == "file":
        paths = _local_folder(paths)
    return reader(paths, filesystem=PyFileSystem(FSSpecHandler(fs)), **read_args)
