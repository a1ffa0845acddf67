"""Encrypted sharded checkpoints: a storage writer and reader for ``torch.distributed.checkpoint``.

Use them where DCP takes a storage writer or reader; everything else about DCP (the
planners, DTensor and FSDP2 state dicts, resharding on load, the collectives) stays
as it is::

    dcp.save(state_dict, storage_writer=EncryptedWriter(path, keyset=keyset))
    dcp.load(state_dict, storage_reader=EncryptedReader(path, keyset=keyset))

What goes where (``docs/DISTRIBUTED.md`` has the details and the threat model):

- **Data files.** Each rank writes one file, ``__{rank}_{16 hex digits}.gcdistcp`` (a
  name new to every save): a gpucrypt model
  file (``docs/MODEL_FORMAT.md``) holding the rank's write items, one entry per item
  (a tensor chunk, or the bytes of a non-tensor value), under a fresh **data key of
  its own**, wrapped in the file's envelope for the recipients and/or keyset. Tensors
  on a GPU are sealed there (their plaintext never reaches host memory); entry names,
  shapes and offsets are encrypted. The (encrypted, authenticated) table also binds the
  file to its own name, to the item each entry holds and, in a save sealed for a
  public-key recipient, to the save (a random id the coordinator sends in the plan).
  Segments never cross an entry, so a rank reading some entries of a file decrypts
  only their segments.
- **Metadata.** The coordinator writes ``.metadata`` as a gpucrypt stream file, sealed
  under yet another data key for the same recipients: DCP's ``Metadata`` (tensor names,
  shapes, chunk placement) plus a manifest naming every data file with its length and
  its header MAC (which commits to the file's salt, nonce prefix, entry table and
  envelope). Loading decrypts and authenticates it before unpickling it (and unpickles
  only DCP's metadata classes), then holds every data file to the manifest: a file
  swapped with another rank's, renamed, replaced, truncated or extended is refused,
  naming the file. With public-key recipients anyone holding their public keys can
  write a ``.metadata`` that pins genuine files, so each file's table is held to it
  too: the name it lists the file by, the save id it records (which that person cannot
  read), and the item it reads from each entry; a ``.metadata`` that recombines
  entries or files of other saves is refused (files of earlier versions carry no save
  id: see :class:`EncryptedReader`). The manifest names only data files of the
  checkpoint's folder (plain names as above): any other name ("../x", an absolute
  path) is refused.
- **Saving over a checkpoint.** ``.metadata`` is published last, and no save writes a
  file the published ``.metadata`` refers to, so a save that fails at any point leaves
  the previous checkpoint whole. Once the new ``.metadata`` is in place the coordinator
  removes the data files it does not name (files named as above only), and warns of a
  plain DCP checkpoint's data files left there (plaintext, not this writer's to
  remove). Before publishing, it refuses a save whose ranks sealed their files for
  different keys (each reports its envelope's public labels with its write results)
  or passphrases (each opens ``.metadata``'s envelope, which the coordinator seals
  before the ranks write, with its own passphrase, and reports it).
- **Non-tensor values** are pickles (DCP's ``torch.save``), which DCP's planner unpickles
  with ``torch.load(weights_only=False)``. With public-key recipients anyone holding
  their public keys can write a checkpoint, so the reader hands the planner only values
  that ``torch.load(weights_only=True)`` accepted (``non_tensors=``: "weights_only",
  "refuse" or "pickle"; see :class:`EncryptedReader`). "pickle" loads any value, and
  runs any code a pickle holds: only for checkpoints from writers you trust with the
  machine.
- **Keys.** Every rank makes its own data key, so no key crosses a collective; only
  wrapped keys (envelopes) and public header MACs are ever written or sent. A reader
  needs its keyset or identity only. Writers and readers refuse to be pickled while
  they hold key material.

Loading is all or nothing. Every rank decrypts and verifies every entry it needs in
``prepare_local_plan``, which DCP runs on all ranks before the plan is gathered (each
entry where its target tensors are, with ``device="auto"``), and unpickles its
non-tensor values there (with "pickle" too); one rank's failure there fails the load
on every rank before any tensor of the caller's state dict is written. Only errors
raised after that, while ``read_data`` places the values (the planner's own, a device
failing a copy), can leave the values placed before them. The price: a rank holds the
plaintext of its share of the checkpoint once more, until ``read_data`` has copied it
into place, plus one entry at a time while it cuts the parts it reads out of entries
it needs only in part (a checkpoint loaded on more ranks than saved it: only the parts
are kept). When another rank fails, DCP
raises on this one without calling its reader again, so the reader keeps that
plaintext staged until it is used again (``reset``, which ``dcp.load`` calls first, and
``read_metadata`` zero it) or collected (a finaliser zeroes it); a failure inside this
reader zeroes what it decrypted at once.
"""
from __future__ import annotations

import dataclasses
import hashlib
import hmac
import io
import json
import os
import pickle
import re
import sys
import threading
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint.filesystem import (CURRENT_DCP_VERSION, FileSystemReader,
                                                     FileSystemWriter, _StoragePrefix)
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import (LoadItemType, LoadPlanner, SavePlan,
                                                   WriteItemType)
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from .. import audit, pipeline
from .._errors import KeyManagementError, KeysetError, KeyUnavailable, NoMatchingRecipient
from ..backends import check_device
from ..files import keyed, models, stream
from ..files._atomic import open_regular
from ..files._format import (DEFAULT_SEGMENT_SIZE, MAGIC, AuthenticationError, FormatError,
                             StreamError, TruncatedError, UnsupportedVersion, check_algorithm,
                             check_segment_size)
from ..files.keyed import _identities_for, _primary_key_id, gather
from ..keys import Passphrase, _envelope
from ..keys import generate_dek
from ..keys.passphrase import STANZA_KIND as _SCRYPT
from ..keys.recipients import _KEMS, Identity, Recipient, open_data_key
from ..keys.recipients import seal_envelope_with_labels

__all__ = ["EncryptedWriter", "EncryptedReader", "EncryptedStorageInfo", "DATA_SUFFIX",
           "METADATA_FORMAT", "METADATA_VERSION"]

#: suffix of the data files: they are gpucrypt model files, not DCP's ``.distcp``
DATA_SUFFIX = ".gcdistcp"
METADATA_FORMAT = "gpucrypt-dcp-metadata"
METADATA_VERSION = 1
#: the key of the data file's own name in its (encrypted) table's metadata
_FILE_NAME_KEY = "dcp.file"
#: the key of the save's id in its data files' tables (saves sealed for a public-key
#: recipient; ``.metadata`` records it as "save"): files of two saves never load as one
_SAVE_KEY = "dcp.save"
#: the key of what item each entry of the file holds (every file since the save id):
#: ``.metadata`` cannot point an item at another entry (:func:`_items_record`)
_ITEMS_KEY = "dcp.items"
#: what EncryptedReader's non_tensors= takes (see its docstring)
_NON_TENSORS = ("weights_only", "refuse", "pickle")
#: the data files EncryptedWriter writes: ``__{rank}_{16 hex digits}.gcdistcp`` (a name
#: new to every save), or ``__{rank}_0.gcdistcp`` (earlier versions wrote that one name
#: on every save; their checkpoints still load, the manifest names the files)
_DATA_FILE = re.compile(rf"__\d+_(?:0|[0-9a-f]{{16}}){re.escape(DATA_SUFFIX)}", re.ASCII)
#: the data files DCP's own FileSystemWriter writes (``__{rank}_{n}.distcp``)
_PLAIN_DCP_FILE = re.compile(r"__\d+_\d+\.distcp", re.ASCII)


@dataclasses.dataclass(frozen=True)
class EncryptedStorageInfo:
    """Where one write item lives: the entry ``entry`` of the data file ``relative_path``
    (relative to the checkpoint's folder). DCP keeps one per item in the metadata."""

    relative_path: str
    entry: str


@dataclasses.dataclass(frozen=True)
class _WrittenItem:
    """What a rank's ``write_data`` reports about an item to the coordinator: where it
    is, the identity of its file (public values: a length and a header MAC), and whom
    the file's envelope is sealed for (its stanzas' public labels, sorted: key ids and
    recipient fingerprints), so that the coordinator can refuse a save whose ranks
    sealed for different keys before it publishes anything."""

    info: EncryptedStorageInfo
    file: "_FileIdentity"
    #: None from a rank whose gpucrypt reports none (one before the check): refused
    sealed_for: tuple[str, ...] | None = None
    #: a rank sealing for a passphrase: what it knows of its passphrase (labels cannot
    #: tell passphrases apart: every one is "scrypt")
    passphrase_check: "_PassphraseCheck | None" = None
    #: the save id written into the file's table (None: the save binds none, or the rank
    #: runs a gpucrypt from before binding; read with getattr, as that one has no field)
    save_id: str | None = None


@dataclasses.dataclass(frozen=True)
class _PassphraseCheck:
    """What a rank that seals for a passphrase reports to the coordinator, envelopes only
    (public: they are in files' headers anyway; a digest of the passphrase would be a
    value to guess it from offline): ``opens``, an envelope its passphrase opens (the
    coordinator's ``.metadata`` envelope from the plan, else its own data file's), and
    ``failed``, the coordinator's envelope when its passphrase did not open that one."""

    opens: bytes | None  # None only inside write_data, until its own envelope is sealed
    failed: bytes | None = None


@dataclasses.dataclass
class _StoragePlan(_StoragePrefix):
    """What the coordinator sends each rank with its part of the global plan: DCP's file
    prefix, and, when the coordinator seals for a passphrase, the envelope of this save's
    ``.metadata`` (public: it is written in that file's header), which a rank opens with
    its own passphrase (EncryptedWriter._check_passphrase); when it seals for a public-key
    recipient, the id of this save, which every rank writes into its file's encrypted
    table (see :func:`_binds_files`)."""

    passphrase_check: bytes | None = None
    save_id: str | None = None


@dataclasses.dataclass(frozen=True)
class _FileIdentity:
    """A data file as the manifest records it: its length, its header MAC (which names
    it: a MAC under its own data key over its salt, nonce prefix and entry table) and
    the SHA-256 of its whole header (so an altered envelope is caught before it is
    unwrapped). All public values."""

    length: int
    header_mac: bytes
    header_sha256: bytes

    def as_tuple(self) -> tuple:
        return (self.length, self.header_mac, self.header_sha256)


def _refuse_pickling(obj: Any) -> None:
    """Writers, readers and extensions hold keys (keysets, identities, or at least public
    keys and a data key): none of it may land in a pickle."""
    raise TypeError(f"a {type(obj).__name__} holds keys and cannot be pickled (a pickle would "
                    f"carry them): make one in each process from its key file or provider, and "
                    f"use dcp.async_save's thread executor, not the process one")


# ============================================================================ errors
def _in_file(path: Any, exc: BaseException) -> BaseException:
    """``exc`` again, its message starting with the file it is about (``.path`` holds it
    too). The type is kept (an AuthenticationError stays one), except for types whose
    instances could not be rebuilt from a message after crossing a collective (DCP sends
    exceptions between ranks pickled): those become FormatError or OSError."""
    where = os.fspath(path)
    # a message that names the file already (gpucrypt.models' "PATH is a FIFO") keeps its
    # one mention: "PATH: PATH is a FIFO" said it twice
    message = str(exc) if str(exc).startswith(where) else f"{where}: {exc}"
    if isinstance(exc, AuthenticationError):
        new: BaseException = type(exc)(message, exc.segment)
    elif isinstance(exc, UnsupportedVersion):
        new = FormatError(message)
    elif isinstance(exc, (StreamError, KeyManagementError)):
        new = type(exc)(message)
    elif isinstance(exc, OSError):
        new = OSError(exc.errno, f"{exc.strerror or exc}: {where}")
    else:
        new = FormatError(message)
    new.path = where
    return new


# ============================================================================ metadata pickle
_DCP_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
#: every global the metadata pickle refers to (found by pickling the metadata of saves of
#: every tensor dtype, empty and 0-d tensors, non-tensor values, paths and FSDP/DTensor
#: state dicts with DCP's default planners), by exact module and name: a whole module is
#: not safe to allow, as it holds whatever it imported (``os`` in DCP's metadata module)
_METADATA_CLASSES = ("Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorStorageMetadata",
                     "BytesStorageMetadata", "TensorProperties", "StorageMeta",
                     "_MEM_FORMAT_ENCODING")
_ALLOWED = {(_DCP_METADATA_MODULE, name) for name in _METADATA_CLASSES} | {
    ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("pathlib", "Path"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"), (__name__, "EncryptedStorageInfo")}
#: Python 3.13 moved pathlib's classes to pathlib._local and pickles them under that name;
#: read as pathlib's (the same classes), so that such a document loads on 3.11 and 3.12 too
_MOVED_MODULES = {"pathlib._local": "pathlib"}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's metadata classes, torch's dtypes and sizes, paths and plain Python
    values; anything else is refused. The bytes were authenticated before this runs;
    this is a second wall for checkpoints sealed only for public-key recipients, which
    anyone holding those public keys could have written."""

    def find_class(self, module: str, name: str) -> Any:
        # pickle protocol 4 looks a dotted name up attribute by attribute, so an allowed
        # module's "os.system" would be os.system: no allowed name has a dot
        if "." not in name:
            module = _MOVED_MODULES.get(module, module)
            if (module, name) in _ALLOWED:
                return super().find_class(module, name)
            if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
                return getattr(torch, name)
        raise FormatError(f"the checkpoint metadata refers to {module}.{name}, which is not part "
                          f"of DCP's metadata: refusing to unpickle it (the file was forged by "
                          f"someone holding the recipients' public keys, or written by a torch "
                          f"whose metadata this gpucrypt does not know: load it with the torch "
                          f"that saved it, or report it)")


def _load_metadata_document(plaintext: bytes) -> tuple[Metadata, dict, str | None]:
    """DCP's Metadata, the file manifest (name -> _FileIdentity) and the save id (None in
    saves that bind none: those not sealed for a public-key recipient, and every save of
    an earlier version) of a decrypted ``.metadata``."""
    try:
        doc = _MetadataUnpickler(io.BytesIO(plaintext)).load()
    except FormatError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a malformed file
        raise FormatError(f"malformed checkpoint metadata ({type(exc).__name__})") from None
    if not isinstance(doc, dict) or doc.get("format") != METADATA_FORMAT:
        raise FormatError("not gpucrypt checkpoint metadata")
    if doc.get("version") != METADATA_VERSION:
        raise FormatError(f"unsupported checkpoint metadata version {doc.get('version')!r} "
                          f"(this gpucrypt reads version {METADATA_VERSION})")
    metadata, files = doc.get("metadata"), doc.get("files")
    if not isinstance(metadata, Metadata) or not isinstance(files, dict):
        raise FormatError("malformed checkpoint metadata (no Metadata or no file list)")
    # an optional field of version 1: earlier readers ignore it and load such a save, and
    # what this reader requires of it comes from the data files' own tables (_check_table)
    save = doc.get("save")
    if save is not None and not (isinstance(save, str) and _SAVE_ID.fullmatch(save)):
        raise FormatError("malformed checkpoint metadata (save id)")
    identities = {}
    for name, identity in files.items():
        if not (isinstance(name, str) and isinstance(identity, tuple) and len(identity) == 3
                and isinstance(identity[0], int)
                and all(isinstance(v, bytes) for v in identity[1:])):
            raise FormatError("malformed checkpoint metadata (file list)")
        # the reader opens these names in the checkpoint's folder: a .metadata sealed for
        # public-key recipients could otherwise make it open (and decrypt with the
        # reader's key) any file of the reader's, "../x" or "/abs/x"; the writer only
        # ever names its files as _DATA_FILE does, a plain name in the folder
        if not _DATA_FILE.fullmatch(name):
            raise FormatError(f"malformed checkpoint metadata: its file list names "
                              f"{name[:200]!r}, which is not a data file of this checkpoint's "
                              f"folder (__{{rank}}_{{16 hex digits}}{DATA_SUFFIX}); refusing to "
                              f"open it (the metadata was forged, or damaged: restore the "
                              f"checkpoint from a copy)")
        identities[name] = _FileIdentity(*identity)
    for index, info in (metadata.storage_data or {}).items():
        if not isinstance(info, EncryptedStorageInfo) or info.relative_path not in identities:
            raise FormatError(f"malformed checkpoint metadata: item {index} is in no recorded "
                              f"data file")
    return metadata, identities, save


#: a save id: 16 random bytes, in hex
_SAVE_ID = re.compile(r"[0-9a-f]{32}", re.ASCII)


def _items_record(placed: Any) -> str:
    """What a data file's table records of the items its entries hold, from ``placed``,
    (MetadataIndex, entry name) pairs: JSON, entry name -> :func:`_item_digest` of its
    item. The reader holds every item ``.metadata`` reads from the file to it."""
    return json.dumps({entry: _item_digest(index) for index, entry in placed},
                      ensure_ascii=True, sort_keys=True, separators=(",", ":"))


def _item_digest(index: Any) -> str:
    """An item (a MetadataIndex: fqn, and chunk offsets for a tensor) as the table records
    it: 16 bytes of the SHA-256 of its canonical JSON, in hex. A digest, not the fqn: the
    table stays small whatever the keys' length (it is inside the encrypted, authenticated
    table, so it needs no key of its own)."""
    text = json.dumps([index.fqn, None if index.offset is None
                       else [int(o) for o in index.offset]], ensure_ascii=True,
                      separators=(",", ":"))
    return hashlib.sha256(text.encode("ascii")).hexdigest()[:32]


def _binds_files(recipients: list) -> bool:
    """Whether a writer sealing for ``recipients`` binds its data files to the save (a
    random save id, sent to the ranks in the plan): where one is a public key, anyone
    holding that public key can write a ``.metadata`` the recipient's reader opens, and
    without the id it could name genuine data files of other saves. Symmetric keys
    (keysets, KMS/HSM keys, passphrases) only their holders can seal for: those saves
    send DCP's own plans, which a rank on an earlier gpucrypt reads."""
    return any(isinstance(item, (Recipient, Identity)) for item in recipients)


def _opened_by_public_key(label: str) -> bool:
    """Whether the envelope stanza labelled ``label`` (as open_envelope names the one
    that opened) is a public-key recipient's (``x25519:<hex>``): such a file may have
    been sealed by anyone holding that public key."""
    return label.partition(":")[0] in _KEMS


# ============================================================================ writer
def _entry_name(index: Any, taken: set, position: int) -> str:
    """A readable, unique entry name for the write item at ``position`` of a rank's plan:
    ``fqn@offsets`` for a tensor chunk (DCP's own MetadataIndex, which is unique per
    checkpoint), ``fqn`` for bytes; ``<item {position}>`` where that is no model-file name
    (over ``models.MAX_NAME_BYTES`` of UTF-8, or not UTF-8 at all: a lone surrogate),
    which DCP saves. Readers find entries by the name the metadata records, never by
    the fqn, so any unique name loads, in this version and earlier ones."""
    name = index.fqn if index.offset is None else \
        f"{index.fqn}@{','.join(str(int(o)) for o in index.offset)}"
    name = name or "<empty>"
    unique = _unique(name, taken)
    if not _model_file_name(unique):
        unique = _unique(f"<item {position}>", taken)
    taken.add(unique)
    return unique


def _unique(name: str, taken: set) -> str:
    unique, n = name, 1
    while unique in taken or unique == "__metadata__":
        unique, n = f"{name}#{n}", n + 1
    return unique


def _model_file_name(name: str) -> bool:
    """Whether gpucrypt.models takes ``name`` as a tensor name (the other rules, non-empty
    and not ``__metadata__``, _entry_name keeps itself)."""
    try:
        return len(name.encode("utf-8")) <= models.MAX_NAME_BYTES
    except UnicodeEncodeError:
        return False


class EncryptedWriter(FileSystemWriter):
    """A DCP storage writer that seals every rank's shards (see the module docstring).

    ``path``: the checkpoint's folder. ``recipients``: one or a sequence of
    :class:`~gpucrypt.keys.Recipient`/:class:`~gpucrypt.keys.Identity` (public-key
    HPKE), :class:`~gpucrypt.keys.Keyset`, ``KeysetKey`` or ``WrappingKey``;
    ``keyset``: a keyset whose primary key also wraps the data keys (at least one of
    the two). ``algorithm``/``segment_size``: the model files' (``docs/MODEL_FORMAT.md``).
    ``device``: where the segments are sealed: "auto" (the GPU for tensors already on
    one, so their plaintext never reaches host memory; ``BackendUnavailable`` where
    gpucrypt's GPU backend cannot run), "cpu" or "gpu". ``threads``: CPU
    sealing threads per rank (default: the usable cores). ``overwrite``: as DCP's.

    Files are written atomically (temporary file, fsync, rename), mode 0600. Checkpoints
    with rank-local metadata (``use_collectives=False``) are not supported.
    """

    def __init__(self, path: str | os.PathLike, *, recipients: Any = None, keyset: Any = None,
                 algorithm: str = "chacha20-poly1305",
                 segment_size: int = DEFAULT_SEGMENT_SIZE, device: str = "auto",
                 threads: int | None = None, overwrite: bool = True):
        self._recipients = gather(recipients, keyset)
        algorithm = check_algorithm(algorithm)
        check_segment_size(segment_size)
        # checked here, not where they are used: inside dcp.save a wrong value would fail
        # every rank's write, wrapped in DCP's CheckpointException
        device = check_device(device)
        if threads is not None:
            pipeline.cpu_threads(threads)
        if not isinstance(overwrite, bool):
            raise TypeError(f"overwrite must be True or False, not {overwrite!r}")
        super().__init__(path, single_file_per_rank=True, sync_files=True, thread_count=1,
                         overwrite=overwrite)
        self.algorithm, self.segment_size = algorithm, segment_size
        self.device, self.threads = device, threads
        self._key_id = _primary_key_id(self._recipients)
        # the coordinator's .metadata keys, sealed in prepare_global_plan and used once by
        # finish: (data key, salt, envelope, key id, labels), as keyed.new_file_key makes them
        self._metadata_key: tuple | None = None
        # the coordinator's id of the save under way (prepare_global_plan to finish), in a
        # save that binds its files (_binds_files), else None
        self._save_id: str | None = None

    def __getstate__(self) -> dict:
        _refuse_pickling(self)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        super().set_up_storage_writer(is_coordinator, *args, **kwargs)
        self._metadata_key = None  # a failed save's, if any: never used for another file
        self._save_id = None
        if not self.use_collectives:
            raise ValueError("EncryptedWriter needs one global metadata file: save with "
                             "collectives (DCP's default), not use_collectives=False")

    def prepare_global_plan(self, plans: list) -> list:
        """The coordinator's step before any rank writes: seal ``.metadata``'s data key now
        (finish writes the file with it), so that its envelope's labels are what ranks are
        held to even when the coordinator writes no data file (no envelope sealed for
        nothing: one more KMS call or scrypt, one more audit event), and, for a passphrase,
        so that every rank can check its own passphrase against it (see write_data)."""
        plans = super().prepare_global_plan(plans)
        self._metadata_key = keyed.new_file_key(self._recipients)
        # a new id for every save, plans cached by DCP or not (write_data takes it from the
        # plan DCP scattered for this save, _save_id_for)
        self._save_id = os.urandom(16).hex() if _binds_files(self._recipients) else None
        check = self._metadata_key[2] if _passphrase_of(self._recipients) else None
        if check is None and self._save_id is None:  # DCP's own plans: a rank running an
            return plans  # earlier gpucrypt reads them (it has no _StoragePlan to unpickle)
        return [dataclasses.replace(plan, storage_data=_StoragePlan(
                    plan.storage_data.prefix, check, self._save_id))
                if isinstance(plan.storage_data, _StoragePrefix) else plan
                for plan in plans]

    def write_data(self, plan, planner) -> Future:
        """Seal this rank's items into one data file under a fresh data key."""
        # a name no earlier save used: the files the published .metadata refers to stay
        # whole until a new .metadata replaces it, whatever fails before that
        name = f"{plan.storage_data.prefix}{os.urandom(8).hex()}{DATA_SUFFIX}"
        path = self.fs.concat_path(self.path, name)
        save_id = _save_id_for(plan)
        entries: dict[str, Any] = {}
        placed: list[tuple[Any, str]] = []
        taken: set = set()
        for position, item in enumerate(plan.items):
            data = planner.resolve_data(item)
            entry = _entry_name(item.index, taken, position)
            if item.type == WriteItemType.BYTE_IO:
                raw = bytes(data.getbuffer())
                entries[entry] = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw \
                    else torch.empty(0, dtype=torch.uint8, device="cpu")
            else:
                entries[entry] = data.detach()
            placed.append((item.index, entry))
        # the table binds the file to its name, its save and its entries' items: checked
        # by the reader (_check_table), as .metadata, which names all three, may have been
        # sealed by someone holding only the recipients' public keys
        table = {_FILE_NAME_KEY: name, _ITEMS_KEY: _items_record(placed)}
        if save_id is not None:
            table[_SAVE_KEY] = save_id
        results = []
        if entries:  # a rank with nothing to write (all its items deduplicated) writes no file
            with audit.timed("checkpoint.write", path=os.fspath(path)) as ev:
                dek = generate_dek()  # this file's own: never leaves this process unwrapped
                envelope, labels, check = self._seal_and_check(
                    dek, getattr(plan.storage_data, "passphrase_check", None))
                header = models.save_encrypted(
                    entries, path, dek, table, algorithm=self.algorithm,
                    encrypt_names=True, segment_size=self.segment_size, device=self.device,
                    key_id=self._key_id, envelope=envelope, threads=self.threads)
                del dek
                ev.update(key_id=self._key_id, recipients=labels, algorithm=self.algorithm,
                          bytes=header.data_length, count=len(entries))
            if check is not None and check.opens is None:
                check = _PassphraseCheck(envelope, check.failed)  # it opens our own
            sealed_for = _sealed_for(labels)
            identity = _FileIdentity(header.file_length, header.header_mac,
                                     _header_sha256(path, header.header_length))
            for index, entry in placed:
                results.append(WriteResult(
                    index=index, size_in_bytes=entries[entry].nbytes,
                    storage_data=_WrittenItem(EncryptedStorageInfo(name, entry), identity,
                                              sealed_for, check, save_id)))
        future: Future = Future()
        future.set_result(results)
        return future

    def _seal_and_check(self, dek: bytes, coordinators: bytes | None) -> tuple:
        """This rank's envelope for ``dek``, its labels, and what _check_passphrase reports
        of ``coordinators`` (the coordinator's envelope). For a passphrase both are one
        scrypt, and scrypt releases the GIL: the check runs beside the sealing, so that
        where a core is free it adds no time to the save."""
        if _passphrase_of(self._recipients) is None or self._metadata_key is not None:
            envelope, labels = seal_envelope_with_labels(dek, self._recipients)
            return envelope, labels, self._check_passphrase(coordinators)
        with ThreadPoolExecutor(1, thread_name_prefix="gpucrypt-passphrase-check") as pool:
            checking = pool.submit(self._check_passphrase, coordinators)
            envelope, labels = seal_envelope_with_labels(dek, self._recipients)
            return envelope, labels, checking.result()

    def _check_passphrase(self, envelope: bytes | None) -> "_PassphraseCheck | None":
        """What this rank reports of its passphrase (None: it seals for none): whether it
        opens ``envelope``, the coordinator's ``.metadata`` envelope from the plan (one
        scrypt at the coordinator's work factor, on every rank at once; none on the
        coordinator, which seals ``.metadata`` itself). ``opens`` is None where the caller
        is to put its own data file's envelope: none came (the coordinator seals for no
        passphrase), or it did not open.

        Not refused here: DCP may hand a rank a plan it cached from an earlier save
        (``DefaultSavePlanner(enable_plan_caching=True)``), whose envelope the coordinator
        sealed then, maybe with an earlier passphrase; the coordinator, which knows its own
        envelope, decides in finish (``_check_sealed_alike``)."""
        mine = _passphrase_of(self._recipients)
        if mine is None:
            return None
        if self._metadata_key is not None:  # the coordinator: .metadata's passphrase is ours
            return _PassphraseCheck(self._metadata_key[2])
        if envelope is None:
            return _PassphraseCheck(None)
        try:
            opens = _opens_as_sealed(mine, envelope)
        except (KeyUnavailable, KeysetError, _envelope.EnvelopeFormatError):
            opens = None  # not known (a work factor above this rank's limit): finish tries
        if opens:
            return _PassphraseCheck(envelope)
        return _PassphraseCheck(None, envelope if opens is False else None)

    def finish(self, metadata: Metadata, results: list) -> None:
        """Write ``.metadata``: DCP's metadata and the manifest of data files, sealed.
        ``ValueError`` (nothing published, nothing of the previous checkpoint touched) when
        the ranks sealed their data files for different keys or passphrases."""
        # sealed by prepare_global_plan, which DCP calls first (made here only for a
        # caller of finish alone); used once: a data key and salt seal one file
        metadata_key = self._metadata_key or keyed.new_file_key(self._recipients)
        save_id, self._metadata_key, self._save_id = self._save_id, None, None
        dek, salt, envelope, key_id, labels = metadata_key
        metadata.version = CURRENT_DCP_VERSION
        storage, files = {}, {}
        for written in (w for rank_results in results for w in rank_results):
            record = written.storage_data
            storage[written.index] = record.info
            files[record.info.relative_path] = record.file.as_tuple()
        self._check_sealed_alike(results, files, labels, envelope)
        self._check_bound_alike(results, files, save_id)
        metadata.storage_data = storage
        metadata.storage_meta = self.storage_meta()
        if metadata.storage_meta is not None and isinstance(metadata.storage_meta.checkpoint_id,
                                                            os.PathLike):
            # a str: a path's class pickles under a module name of its Python's own
            # (pathlib._local from 3.13), which an older Python cannot unpickle
            metadata.storage_meta.checkpoint_id = os.fspath(metadata.storage_meta.checkpoint_id)
        document = {"format": METADATA_FORMAT, "version": METADATA_VERSION}
        if save_id is not None:  # absent otherwise, as in every earlier save
            document["save"] = save_id
        document.update(metadata=metadata, files=files)
        document = pickle.dumps(document, protocol=4)
        path = self._get_metadata_path()
        # keyed.encrypt_file's steps, with the keys sealed before the ranks wrote; atomic:
        # a temporary file beside it, fsync, rename over any older one
        with audit.timed("file.encrypt", path=os.fspath(path)) as ev:
            ev.update(key_id=key_id, recipients=labels, algorithm=self.algorithm, device="cpu",
                      bytes=len(document))
            stream.encrypt(document, path, dek, key_id=key_id, envelope=envelope, _salt=salt,
                           algorithm=self.algorithm, device="cpu")
        del dek, metadata_key
        self._remove_unreferenced(files)
        self._warn_plain_shards()

    def _check_sealed_alike(self, results: list, files: dict, labels: list[str],
                            envelope: bytes) -> None:
        """Refuse a save whose ranks sealed their data files for other keys than
        ``.metadata`` (``labels``, ``envelope``) is sealed for (a rank, the coordinator
        included, read a stale key file, or was given another keyset or passphrase):
        published, no one key would open the whole checkpoint, and the previous one, whose
        files the publication removes, would be lost with it.

        Keys are compared by their envelopes' labels, which are public (key ids,
        fingerprints) and may cross the collective; two different keys under one id are
        not told apart here (their readers' unwrap is). A passphrase's label is always
        "scrypt": each rank reports an envelope its passphrase opens (``.metadata``'s,
        checked in write_data), and one that is not ``.metadata``'s costs one scrypt here
        (an earlier save's, from a plan DCP cached then; or the rank's own, when its
        passphrase did not open that one either)."""
        expected = _sealed_for(labels)
        groups: dict[tuple[str, ...], list[int]] = {expected: []}
        checks: dict[_PassphraseCheck | None, list[int]] = {}
        for rank, rank_results in enumerate(results):
            for written in rank_results[:1]:  # one data file per rank: one record
                record = written.storage_data
                sealed_for = getattr(record, "sealed_for", None) or (
                    "nothing reported (an earlier gpucrypt: give every rank this version)",)
                groups.setdefault(sealed_for, []).append(rank)
                checks.setdefault(getattr(record, "passphrase_check", None), []).append(rank)
        if len(groups) > 1:
            shown = "; ".join(
                f"{_who(ranks, metadata=sealed_for == expected)} for "
                f"{', '.join(sealed_for) or 'no one'}"
                for sealed_for, ranks in sorted(groups.items(), key=_group_order(expected)))
            self._refuse(files, f"its ranks sealed their data files for different keys, so no "
                                f"one key would open it all: {shown}. Give every rank the same "
                                f"recipients/keyset (a rank, the coordinator included, may have "
                                f"read a stale key file; during a key rotation, every rank needs "
                                f"the new keyset before the next save: docs/DISTRIBUTED.md)")
        mine = _passphrase_of(self._recipients)
        if mine is None:
            return
        alike, other, unchecked = [], [], []
        tried: dict[bytes, bool | None] = {}  # an envelope the coordinator opened: its answer
        for check, ranks in checks.items():
            if check is not None and check.opens == envelope:
                alike.extend(ranks)  # the rank opened .metadata's envelope: no cost here
            elif check is not None and check.failed == envelope:
                other.extend(ranks)  # it failed to open it: no cost here either
            elif check is None:  # reported nothing: a gpucrypt older than this one
                unchecked.extend(ranks)
            else:  # a plan DCP cached from an earlier save: one scrypt per envelope
                if check.opens not in tried:
                    try:
                        tried[check.opens] = _opens_as_sealed(mine, check.opens)
                    except (KeyUnavailable, KeysetError, _envelope.EnvelopeFormatError):
                        tried[check.opens] = None
                opens = tried[check.opens]
                (alike if opens else other if opens is False else unchecked).extend(ranks)
        if other or unchecked:
            shown = f"{_who(sorted(alike), metadata=True)} share one passphrase"
            if other:
                shown += (f"; {_who(sorted(other))} sealed with another (not "
                          f"necessarily one and the same)")
            if unchecked:
                shown += f"; {_who(sorted(unchecked))} could not be checked against it"
            self._refuse(files, f"its ranks sealed their data files with different passphrases, "
                                f"so no one passphrase would open it all: {shown}. Give every "
                                f"rank the same passphrase (a per-node environment variable or "
                                f"passphrase file may differ) and save again")

    def _check_bound_alike(self, results: list, files: dict, save_id: str | None) -> None:
        """Refuse a save whose ranks did not all bind their data files to ``save_id``, the
        id this save's ``.metadata`` records (None: it binds none, as for symmetric keys):
        published, the reader would refuse every such file, and the previous checkpoint
        would be gone. A rank on a gpucrypt from before binding reports none; a rank
        writing from a plan DCP cached from an earlier save reports that save's id where
        this save's scattered plan could not be found (a DCP whose save step differs)."""
        odd: dict[str, list[int]] = {}
        for rank, rank_results in enumerate(results):
            for written in rank_results[:1]:  # one data file per rank: one record
                bound = getattr(written.storage_data, "save_id", None)
                if bound != save_id:
                    why = ("bound theirs to no save (a gpucrypt from before files were bound to "
                           "their save: give every rank this version)" if bound is None else
                           "bound theirs to an earlier save, from a plan DCP cached then "
                           "(save without DCP's plan caching on this torch)" if save_id else
                           "bound theirs to an earlier save, from a plan DCP cached then, "
                           "though this save binds none (save without DCP's plan caching, or "
                           "restart the processes)")
                    odd.setdefault(why, []).append(rank)
        if odd:
            shown = "; ".join(f"{_who(ranks)} {why}" for why, ranks in odd.items())
            self._refuse(files, f"its ranks did not all bind their data files to this save, so "
                                f"its reader would refuse them: {shown}")

    def _refuse(self, files: dict, why: str) -> None:
        """Remove this save's data files and refuse to publish it, saying ``why``."""
        # the refused files are this save's own (names no earlier save used): removed, so
        # that copies sealed for a stale key are not left behind; best effort (a rank's own
        # disk is not the coordinator's to see)
        for name in files:
            try:
                os.remove(os.path.join(self.path, name))
            except OSError:
                pass
        raise ValueError(f"refusing to publish the checkpoint in {os.fspath(self.path)}: {why}; "
                         f"the previous checkpoint there is unchanged")

    def _remove_unreferenced(self, keep: dict) -> None:
        """Remove the data files of earlier (or failed) saves into this folder, now that
        the new ``.metadata`` refers to none of them: only files named as this writer
        names them, and only those the coordinator's folder shows (ranks writing to
        local disks of their own keep theirs)."""
        for name in os.listdir(self.path):
            if _DATA_FILE.fullmatch(name) and name not in keep:
                try:
                    os.remove(os.path.join(self.path, name))
                except FileNotFoundError:
                    pass
                except OSError as exc:  # the save itself succeeded: say so, and what is left
                    warnings.warn(f"the checkpoint in {os.fspath(self.path)} was saved, but the "
                                  f"previous save's data file {name} could not be removed "
                                  f"({exc}): remove it by hand", stacklevel=2)

    def _warn_plain_shards(self) -> None:
        """Warn of DCP's own data files (a plain checkpoint saved here before) left in the
        folder beside the encrypted one: they hold its tensors in plaintext.

        Warned of, not removed nor refused: they are not this writer's files (it removes
        only files named as it names them), a user may keep them on purpose (they are
        migrating the folder, or keep the plain copy elsewhere in mind), and removing them
        would suggest the plaintext is gone when an unlink scrubs nothing from the disk or
        its backups. Refusing the save would break a load-plain-then-save-encrypted run
        that works today. Files that start as gpucrypt streams (saved with DCP's
        FileSystemWriter and gpucrypt's EncryptionExtension) are not plaintext: not named."""
        plain = sorted(name for name in os.listdir(self.path)
                       if _PLAIN_DCP_FILE.fullmatch(name)
                       and _may_be_plaintext(os.path.join(self.path, name)))
        if plain:
            shown = ", ".join(plain[:8]) + (f" and {len(plain) - 8} more" if len(plain) > 8 else "")
            warnings.warn(f"the encrypted checkpoint in {os.fspath(self.path)} was saved, but the "
                          f"folder still holds DCP data files of a plain (unencrypted) checkpoint: "
                          f"{shown}. They hold its tensors in plaintext and were not removed: "
                          f"if that plaintext must not stay, remove them (and treat what they "
                          f"held as exposed)", UserWarning, stacklevel=2)


def _may_be_plaintext(path: str) -> bool:
    """Whether the DCP data file at ``path`` may hold plaintext: a regular file that does
    not start as a gpucrypt stream (what EncryptionExtension writes), or one that cannot
    be read to tell. Not a regular file (a FIFO, opened without waiting): no data."""
    try:
        with open_regular(path, lambda kind: FormatError(kind)) as f:
            return f.read(len(MAGIC)) != MAGIC
    except FormatError:
        return False
    except OSError:
        return True


def _sealed_for(labels: list[str]) -> tuple[str, ...]:
    """An envelope's stanza labels as ranks compare them: order and repeats aside."""
    return tuple(sorted(set(labels)))


def _passphrase_of(recipients: list) -> Passphrase | None:
    """The passphrase a writer seals for (sealing takes a passphrase alone), or None."""
    return recipients[0] if len(recipients) == 1 and isinstance(recipients[0], Passphrase) \
        else None


def _opens_as_sealed(passphrase: Passphrase, envelope: bytes) -> bool | None:
    """Whether ``passphrase``, in the one form it seals with, opens ``envelope``, a
    passphrase's (one scrypt, at the envelope's work factor); None when ``envelope`` is no
    passphrase's. ``KeyUnavailable`` when that work factor is above the passphrase's
    ``max_log_n``.

    Not ``passphrase.unwrap`` as given: it also tries the forms that open files sealed by
    earlier versions (a passphrase file's earlier reading), and a rank whose earlier
    form is another rank's passphrase seals with its first form, which the other's
    readers cannot open."""
    stanzas = _envelope.decode(envelope)
    if len(stanzas) != 1 or stanzas[0].kind != _SCRYPT:
        return None
    try:
        passphrase.sealing_form().unwrap(stanzas[0])  # the data key of .metadata: dropped at once
    except KeysetError:  # the wrong passphrase (KeyUnavailable, above its limit, propagates)
        return False
    return True


def _who(ranks: list[int], *, metadata: bool = False) -> str:
    """Ranks as a refusal names them ("ranks 1-3, 7"), after ".metadata" for the group of
    the keys the coordinator seals ``.metadata`` for: a list of groups, no culprit."""
    runs: list[str] = []
    for rank in ranks:
        if runs and rank == last + 1:
            runs[-1] = f"{runs[-1].split('-')[0]}-{rank}"
        else:
            runs.append(str(rank))
        last = rank
    shown = ", ".join(runs[:8]) + (f" and {len(runs) - 8} more" if len(runs) > 8 else "")
    named = f"rank{'s' if len(ranks) > 1 else ''} {shown}" if ranks else ""
    if not metadata:
        return named
    return "the coordinator's .metadata" + (f" and {named}" if named else "")


def _group_order(expected: tuple[str, ...]):
    """Groups of ranks in the order a refusal lists them: .metadata's first (the keys the
    other groups are told apart from, not a verdict), then by their first rank."""
    return lambda group: (group[0] != expected, group[1][:1])


# ============================================================================ reader
class EncryptedReader(FileSystemReader):
    """A DCP storage reader for checkpoints written by :class:`EncryptedWriter`.

    ``identities`` (one or a sequence of :class:`~gpucrypt.keys.Identity`, ``KeysetKey``,
    ``WrappingKey`` or key provider) and/or ``keyset``: what opens the data keys.
    ``device``: where the entries are decrypted: "auto" (each entry where the tensors it
    is loaded into are: on the GPU when they are CUDA tensors and a real GPU is usable,
    so the plaintext stays there; else on the CPU, so that CPU targets such as offloaded
    parameters or optimizer state are not staged in GPU memory), "cpu", "cuda" or
    "cuda:N" (every entry there).
    ``threads``: CPU threads per rank (default: the usable cores).

    ``non_tensors``: how the values that are not tensors (DCP pickles them with
    ``torch.save``) are unpickled. "weights_only" (default): each is unpickled first by
    ``torch.load(weights_only=True)`` (plain Python values, tensors, ``io.BytesIO``, and
    the types ``torch.serialization.add_safe_globals`` allows) and refused otherwise
    (naming the refused type), then handed to DCP, whose planner unpickles it with
    ``weights_only=False``, as that pickle of what was unpickled. "refuse": a load that
    would read one fails (load a state dict of tensors only). "pickle": DCP's own
    behaviour, any pickle, which can run any code: only for checkpoints from writers you
    trust with this machine (with public-key recipients, anyone holding their public
    keys can write one).

    Errors name the file they are about and keep gpucrypt's types: ``NoMatchingRecipient``
    (wrong keys), ``AuthenticationError``/``TruncatedError`` (altered, swapped, replaced,
    recombined or cut files), ``FormatError``. DCP raises them wrapped in its
    ``CheckpointException`` (``.failures`` maps each failing rank to its error).

    A checkpoint that an earlier gpucrypt sealed for public-key recipients loads as
    before, its files held to their names, headers and lengths, with a ``UserWarning``
    to save it again: its files carry no save id, so a ``.metadata`` written with those
    public keys could recombine them. The files of this version's saves are refused
    under such a ``.metadata``.
    """

    def __init__(self, path: str | os.PathLike, *, identities: Any = None, keyset: Any = None,
                 device: str = "auto", threads: int | None = None,
                 non_tensors: str = "weights_only"):
        self._identities = _identities_for(identities, keyset)
        if device != "auto":
            models._check_device(device)  # a wrong name fails here, not inside a load
        if threads is not None:
            pipeline.cpu_threads(threads)
        if non_tensors not in _NON_TENSORS:
            raise ValueError(f"non_tensors must be one of {', '.join(map(repr, _NON_TENSORS))}, "
                             f"not {non_tensors!r}")
        super().__init__(path)
        self.device, self.threads, self.non_tensors = device, threads, non_tensors
        self._files: dict[str, _FileIdentity] = {}
        # from read_metadata: the save id .metadata records (None: it binds none), whether
        # a public-key stanza opened it, and file -> what it reads there: (entry, item,
        # the item's digest)
        self._save_id: str | None = None
        self._public = False
        self._reads: dict[str, list] = {}
        # (fqn, chunk offsets) -> the chunk's sizes, as .metadata records them: whether a
        # read item wants its entry whole (_part_of)
        self._chunks: dict[tuple, tuple] = {}
        # entries prepare_local_plan decrypted for read_data: one dict for the reader's
        # life, filled and emptied in place, so that the finaliser zeroes what it holds
        # when the reader is collected (a load that failed on another rank leaves it
        # filled: DCP raises there without calling this reader again)
        self._staged: dict[tuple[str, str], torch.Tensor] = {}
        weakref.finalize(self, _zero, self._staged)

    def __getstate__(self) -> dict:
        _refuse_pickling(self)

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        """DCP's call before each load: what an earlier, failed load left staged is zeroed."""
        self._discard_staged()
        super().reset(checkpoint_id)

    def read_metadata(self) -> Metadata:  # no **kwargs: DCP must not fall back to rank files
        """Decrypt, authenticate and unpickle ``.metadata``; remember its file manifest,
        its save id and what it says each file's entries hold (and zero what an earlier,
        failed load left staged)."""
        self._discard_staged()
        path = self._get_metadata_path()
        plaintext = io.BytesIO()
        try:
            # opened without waiting, regular files only: a FIFO put in its place would
            # otherwise hang every rank's load in open() until someone wrote to it
            with open_regular(path, _not_regular) as f:
                try:
                    opened = keyed.decrypt_file_at(f, plaintext, os.fspath(path),
                                                   identities=self._identities, device="cpu")
                except FormatError as exc:
                    raise _plain_dcp(f) or exc from None
            metadata, files, save_id = _load_metadata_document(plaintext.getvalue())
        except (StreamError, KeyManagementError, OSError) as exc:
            raise _in_file(path, exc) from None
        self._files, self._save_id = files, save_id
        self._public = _opened_by_public_key(opened["opened_by"])
        self._reads = {}
        for index, info in (metadata.storage_data or {}).items():
            self._reads.setdefault(info.relative_path, []).append(
                (info.entry, index, _item_digest(index)))
        self._chunks = {(fqn, tuple(chunk.offsets)): tuple(chunk.sizes)
                        for fqn, md in metadata.state_dict_metadata.items()
                        for chunk in getattr(md, "chunks", ())}
        if self._public and save_id is None:
            # a save of an earlier version, whose files carry no save id: loaded as before
            # (its files are still held to their names, headers and lengths); a .metadata
            # naming files of this version is refused file by file (_check_table)
            warnings.warn(f"the checkpoint in {os.fspath(self.path)}, opened with a public "
                          f"key, binds its data files to no save: an earlier gpucrypt saved it "
                          f"(which did not bind them), or someone holding the recipients' "
                          f"public keys wrote its .metadata, and such a .metadata can recombine "
                          f"the data files of earlier versions' saves. Save it again with this "
                          f"version to bind them", UserWarning, stacklevel=2)
        metadata.storage_meta = metadata.storage_meta or _storage_meta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def prepare_local_plan(self, plan):
        """Decrypt and verify every entry this rank will read (see the module docstring)."""
        self._discard_staged()
        self._staged.update(self._open_entries(plan.items, _calling_planner()))
        return plan

    def read_data(self, plan, planner) -> Future:
        """Copy the verified entries into the state dict (anything the plan asks for that
        ``prepare_local_plan`` did not see is decrypted and verified first)."""
        staged = dict(self._staged)
        self._staged.clear()
        try:
            staged.update(self._open_entries(plan.items, planner, skip=staged))
            for req in plan.items:
                info = self.storage_data[req.storage_index]
                whole = (info.relative_path, info.entry)
                if req.type == LoadItemType.BYTE_IO:
                    planner.load_bytes(req, io.BytesIO(staged[whole].cpu().numpy().tobytes()))
                    continue
                tensor = staged.get(whole + _slice_of(req))  # the part staged alone
                if tensor is None:
                    tensor = narrow_tensor_by_index(staged[whole], req.storage_offsets,
                                                    req.lengths)
                target = planner.resolve_tensor(req).detach()
                if target.size() != tensor.size():
                    raise AssertionError(f"req {req.storage_index} mismatch sizes "
                                         f"{target.size()} vs {tensor.size()}")
                _copy_into(target, tensor)
                planner.commit_tensor(req, target)
        except BaseException:
            _zero(staged)  # the traceback keeps this frame, and so staged, alive
            raise
        future: Future = Future()
        future.set_result(None)
        return future

    # ------------------------------------------------------------------ internals
    def _discard_staged(self) -> None:
        _zero(self._staged)
        self._staged.clear()

    def _open_entries(self, items, planner, skip=()) -> dict:
        """What ``items`` need (but what ``skip`` holds), decrypted and verified, file by
        file, each entry where ``device`` and its targets (resolved by ``planner``, which
        may be None) say: ``(file, entry)`` -> the entry, or ``(file, entry, offsets,
        lengths)`` -> a copy of that part of it, for an entry of which only parts are
        needed (a saved chunk spread over more ranks than saved it). On any failure the
        ones already decrypted are zeroed and the error raised."""
        # file -> entry -> (the devices of the tensors it goes to (None: not known), the
        # parts of it wanted: (offsets, lengths), or None for all of it)
        wanted: dict[str, dict[str, tuple[list | None, set]]] = {}
        pickles: set[tuple[str, str]] = set()
        for item in items:
            info = self.storage_data[item.storage_index]
            whole = (info.relative_path, info.entry)
            part = self._part_of(item)
            if whole in skip or (part is not None and whole + part in skip):
                continue
            targets, parts = wanted.setdefault(info.relative_path, {}).setdefault(
                info.entry, ([], set()))
            parts.add(part)
            if item.type == LoadItemType.BYTE_IO:
                pickles.add(whole)
            elif targets is not None:
                target = _target_device(planner, item)
                wanted[info.relative_path][info.entry] = (
                    None if target is None else targets + [target], parts)
        if pickles and self.non_tensors == "refuse":
            name, entry = min(pickles)
            raise _in_file(self.fs.concat_path(self.path, name), FormatError(
                f"the state dict asks for {len(pickles)} non-tensor value(s) (e.g. {entry!r}), "
                f"and this reader was made with non_tensors='refuse': load a state dict of "
                f"tensors only, or read with non_tensors='weights_only'"))
        gpu_usable = None  # probed (a numba import) only for an entry that could use it
        # file -> device -> entry -> parts
        placed: dict[str, dict[str, dict[str, set]]] = {}
        for name, entries in wanted.items():
            for entry, (targets, parts) in entries.items():
                device = self.device
                if device == "auto":
                    if gpu_usable is None and (targets is None or any(
                            t.type == "cuda" for t in targets)):
                        gpu_usable = models._check_device("auto") != "cpu"
                    device = _auto_device(targets, bool(gpu_usable))
                placed.setdefault(name, {}).setdefault(device, {})[entry] = parts
        opened: dict[tuple, torch.Tensor] = {}
        try:
            for name, by_device in placed.items():
                for key, tensor in self._open_file(name, by_device).items():
                    opened[(name,) + key] = tensor
            for name, entry in pickles:
                if self.non_tensors == "weights_only":
                    opened[(name, entry)] = self._checked_pickle(name, entry,
                                                                 opened[(name, entry)])
                else:  # "pickle": unpickled here too, so that a value that fails fails now
                    self._unpickles(name, entry, opened[(name, entry)])
        except BaseException:
            _zero(opened)
            raise
        return opened

    def _part_of(self, item: Any) -> tuple | None:
        """The part of its entry a read item wants, (offsets, lengths); None for all of it
        (a non-tensor value, or a part that covers the chunk as .metadata records it; one
        it does not record is read whole, and loading names what is missing)."""
        if item.type == LoadItemType.BYTE_IO:
            return None
        offsets, lengths = _slice_of(item)
        index = item.storage_index
        sizes = self._chunks.get((index.fqn, tuple(index.offset or ())))
        return None if sizes is None or (not any(offsets) and lengths == sizes) \
            else (offsets, lengths)

    def _unpickles(self, name: str, entry: str, value: torch.Tensor) -> None:
        """Unpickle the non-tensor value ``entry`` as DCP's planner will in ``read_data``
        (``torch.load(weights_only=False)``), and drop the result: a value that cannot be
        rebuilt here (its class changed, its ``__setstate__`` raises) fails the load
        before any rank writes into its state dict, not after some tensors were copied
        into place. The planner still unpickles the file's own bytes, as plain DCP does;
        the pickle's code runs twice."""
        try:
            torch.load(io.BytesIO(value.cpu().numpy().tobytes()), weights_only=False)
        except Exception as exc:  # noqa: BLE001 - whatever the pickle's own code raised
            raise _in_file(self.fs.concat_path(self.path, name), FormatError(
                f"the non-tensor value {entry!r} cannot be unpickled here "
                f"({type(exc).__name__}: {str(exc)[:200]}); nothing was loaded")) from None

    def _checked_pickle(self, name: str, entry: str, value: torch.Tensor) -> torch.Tensor:
        """A non-tensor value's pickle, unpickled by ``torch.load(weights_only=True)`` and
        pickled again: DCP's planner unpickles whatever it is given with
        ``weights_only=False``, and a storage reader only gives it bytes, so it is given
        the pickle of objects the restricted unpickler made, never the file's own."""
        try:
            obj = _load_weights_only(value.cpu().numpy().tobytes())
        except Exception as exc:  # noqa: BLE001 - torch's refusal, or a malformed pickle
            reason, refused = _refusal_reason(exc)
            if refused and "blocked" in reason:  # torch allows nothing of that module
                allow = "If you trust"
            elif refused:
                allow = (f"If {refused} is a type of your own, allow it with "
                         f"torch.serialization.add_safe_globals([{refused}]) (or load inside "
                         f"torch.serialization.safe_globals([{refused}])); if you trust")
            else:
                allow = ("If it holds your own types, allow them with "
                         "torch.serialization.add_safe_globals; if you trust")
            raise _in_file(self.fs.concat_path(self.path, name), FormatError(
                f"the non-tensor value {entry!r} is a pickle that torch.load(weights_only=True) "
                f"refuses ({reason}). {allow} whoever wrote this checkpoint to run code on "
                f"this machine, read it with EncryptedReader(..., non_tensors='pickle')")) \
                from None
        finally:
            value.zero_()
        again = io.BytesIO()
        torch.save(obj, again)
        return torch.frombuffer(bytearray(again.getbuffer()), dtype=torch.uint8)

    def _open_file(self, name: str, by_device: dict[str, dict[str, set]]) -> dict:
        """The entries of the data file ``name`` (device -> entry -> the parts wanted, as
        in _open_entries), decrypted and verified on that device: ``(entry,)`` -> an entry
        wanted whole, ``(entry, offsets, lengths)`` -> a copy of a part of one wanted in
        parts only. The entries wanted whole are decrypted in one pass; each of the others
        alone, only the segments holding its parts, into memory of the entry's size
        (models.safe_open's get_slice) that holds it only until its parts are copied out,
        so that a rank holds its share and one entry, not every entry it touches whole."""
        path = self.fs.concat_path(self.path, name)
        tensors: dict[tuple, torch.Tensor] = {}
        try:
            with audit.timed("checkpoint.read", path=os.fspath(path)) as ev:
                dek = self._data_key(name, path)
                for device, entries in by_device.items():
                    whole = [e for e, parts in entries.items() if None in parts]
                    # each open holds the file's table to .metadata (_check_table) once its
                    # header verified, before anything is decrypted
                    loaded = models.load_encrypted(
                        path, dek, device, names=whole, threads=self.threads,
                        _check_header=lambda h: self._check_table(name, h.metadata)) \
                        if whole else {}
                    tensors.update(((e,), t) for e, t in loaded.items())
                    in_parts = {e: parts for e, parts in entries.items() if e not in loaded}
                    if in_parts:
                        tensors.update(self._open_parts(name, path, dek, device, in_parts))
                del dek
                ev.update(count=len(tensors), bytes=sum(t.nbytes for t in tensors.values()))
        except BaseException as exc:
            _zero(tensors)  # what an earlier device's call decrypted
            if isinstance(exc, (StreamError, KeyManagementError, OSError, KeyError)):
                raise _in_file(path, exc) from None
            raise
        return tensors

    def _open_parts(self, name: str, path: Any, dek: bytes, device: str,
                    in_parts: dict[str, set]) -> dict:
        """The parts of the entries ``in_parts`` (entry -> {(offsets, lengths)}) of the data
        file at ``path``, each a copy of its own, decrypted on ``device``; the segments
        decrypted around a part are zeroed before the next entry is opened."""
        parts: dict[tuple, torch.Tensor] = {}
        try:
            with models.safe_open(path, "pt", device, key=dek, threads=self.threads) as f:
                self._check_table(name, f.metadata() or {})  # the very file opened here
                for entry, wanted in in_parts.items():
                    handle = f.get_slice(entry)
                    for offsets, lengths in wanted:
                        parts[(entry, offsets, lengths)] = handle[tuple(
                            slice(o, o + n) for o, n in zip(offsets, lengths))]
        except BaseException:
            _zero(parts)
            raise
        return parts

    def _data_key(self, name: str, path: Any) -> bytes:
        """The data key of the file ``name``, once the file is shown to be the one the
        metadata records (same header MAC, same length)."""
        recorded = self._files[name]
        # one open for the checks, regular files only (a FIFO's open would wait forever);
        # load_encrypted opens it again, as gpucrypt.models refuses a FIFO swapped in after
        with open_regular(path, _not_regular) as f:
            header = models._parse(f)  # parsed, not yet verified: compared to the record
            f.seek(0)
            header_sha256 = hashlib.sha256(f.read(header.header_length)).digest()
            size = os.fstat(f.fileno()).st_size
        if not hmac.compare_digest(header.header_mac, recorded.header_mac):
            other = next((n for n, f in self._files.items()
                          if hmac.compare_digest(header.header_mac, f.header_mac)), None)
            raise AuthenticationError(
                "this is not the data file the checkpoint's metadata records under this name: "
                + (f"it is the one recorded as {other} (files swapped or renamed)" if other
                   else "it was replaced, or comes from another save into this folder"))
        if not hmac.compare_digest(header_sha256, recorded.header_sha256):
            raise AuthenticationError("header authentication failed: the header (envelope, key "
                                      "id or entry table) differs from the one the checkpoint's "
                                      "metadata records")
        length = recorded.length
        if size < length:
            raise TruncatedError(f"truncated file: {size} bytes, the checkpoint's metadata "
                                 f"records {length}")
        if size > length:
            raise FormatError(f"the file has {size - length} bytes more than the checkpoint's "
                              f"metadata records (data appended)")
        if not header.envelope:
            raise NoMatchingRecipient("this data file carries no envelope")
        return open_data_key(header.envelope, self._identities)

    def _check_table(self, name: str, table: dict) -> None:
        """Hold the authenticated table metadata of the data file listed as ``name`` to
        what ``.metadata`` says of it: its own name, its save id, and the items its
        entries hold. The manifest pins each file's header, but with public-key
        recipients anyone holding those public keys can write a ``.metadata`` that pins
        other genuine files (of this save under other names, of other saves) or points
        items at other entries of the same shape; none of them changes a file's table."""
        own = table.get(_FILE_NAME_KEY)
        if own != name:
            raise AuthenticationError(
                f"this data file was saved as {str(own)[:200]!r}, not under the name the "
                f"checkpoint's metadata lists it by (renamed, or listed in another's place)")
        saved = table.get(_SAVE_KEY)
        if saved != self._save_id:
            if self._save_id is None:
                why = ("its save binds its files to it, and the metadata binds none (the "
                       "metadata was not written by that save, but by someone holding the "
                       "recipients' public keys)")
            elif saved is None:
                why = ("the metadata binds its save's files, and this one is bound to no save "
                       "(a file of another save, or of an earlier version)")
            else:
                why = "their save ids differ (a file of another save)"
            raise AuthenticationError(f"this data file belongs to another save than the "
                                      f"checkpoint's metadata: {why}")
        record = table.get(_ITEMS_KEY)
        if record is None:
            if self._save_id is not None:  # every file of a bound save records its items
                raise AuthenticationError("this data file records no items, as every file of "
                                          "a save that binds its files does")
            return  # a file of an earlier version: its entries bound to nothing
        if self._public and self._save_id is None:
            # a file of this version named by a .metadata that a public key opened and
            # that binds nothing: no save of this version writes that (_binds_files)
            raise AuthenticationError(
                "this data file was saved by a version that binds files to their save, and "
                "the checkpoint's metadata, opened with a public key, binds none: it was "
                "written by someone holding the recipients' public keys")
        try:
            items = json.loads(record)
        except ValueError:
            items = None
        if not isinstance(items, dict):
            raise FormatError("malformed data file: the record of its items is not a JSON "
                              "object")
        for entry, index, digest in self._reads.get(name, ()):
            if items.get(entry) != digest:
                offsets = "" if index.offset is None else f" at {tuple(index.offset)}"
                raise AuthenticationError(
                    f"the checkpoint's metadata reads {index.fqn[:200]!r}{offsets} from the "
                    f"entry {entry[:200]!r}, which was saved for another item (or is not in "
                    f"this file): the metadata was not written by the save that wrote this "
                    f"file")


def _slice_of(item: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The part of a saved chunk a tensor read item copies: (offsets, lengths)."""
    return (tuple(int(o) for o in item.storage_offsets), tuple(int(n) for n in item.lengths))


#: io.BytesIO, which DCP takes as a state-dict value, is a plain container of bytes (its
#: pickle is the class, its bytes, a position and an attribute dict, the last unpickled
#: under the same restrictions), yet torch.load(weights_only=True) refuses it by default
_ALWAYS_SAFE = [io.BytesIO]
#: torch keeps the allowed globals in one process-wide set, and has no per-call list:
#: _ALWAYS_SAFE is added to it for one load at a time, under this lock, and removed
#: after, unless the caller had allowed it already (so two readers in two threads do not
#: remove it under each other, nor remove the caller's own allowance)
_SAFE_GLOBALS_LOCK = threading.Lock()


def _load_weights_only(data: bytes) -> Any:
    """``torch.load(weights_only=True)`` of ``data``, io.BytesIO allowed too."""
    with _SAFE_GLOBALS_LOCK:
        missing = [g for g in _ALWAYS_SAFE if g not in torch.serialization.get_safe_globals()]
        if not missing:
            return torch.load(io.BytesIO(data), weights_only=True)
        with torch.serialization.safe_globals(missing):
            return torch.load(io.BytesIO(data), weights_only=True)


#: the global torch's weights-only unpickler refused, as its message names it
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
#: the lines of torch's refusal that are about weights_only in general, not this pickle
_GENERAL = ("Weights only load failed", "(1)", "(2)", "Check the documentation")


def _refusal_reason(exc: BaseException) -> tuple[str, str | None]:
    """The specific part of ``torch.load(weights_only=True)``'s refusal (torch's message
    opens with a general paragraph that suggests weights_only=False, and ends with a
    documentation link; the reason is the line between, "Unsupported global: GLOBAL
    __main__.Sched was not an allowed global by default"), and the global it names."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    specific = [line for line in lines if not line.startswith(_GENERAL)]
    named = [line for line in specific if _REFUSED_GLOBAL.search(line)]
    reason = (named or specific or lines or [type(exc).__name__])[0]
    reason = reason.removeprefix("WeightsUnpickler error:").strip()
    reason = reason.split(" Please use ")[0].rstrip(".")  # torch's advice: ours is our own
    refused = _REFUSED_GLOBAL.search(reason)
    return reason[:200], refused.group(1) if refused else None


def _not_regular(kind: str) -> FormatError:
    """The error for a checkpoint file that is not a regular file (``_in_file`` names it)."""
    return FormatError(f"this is a {kind}, not a regular file: a checkpoint's files are "
                       f"regular files (it was replaced: restore the checkpoint from a copy)")


def _plain_dcp(f: Any) -> FormatError | None:
    """What to tell a reader whose ``.metadata`` (``f``, open) is not a gpucrypt file but a
    pickle, as DCP's own FileSystemWriter writes it (a plain checkpoint, or one sealed
    item by item by EncryptionExtension, whose descriptor the pickle names); None for
    anything else."""
    try:
        f.seek(0)
        head = f.read(2)
        if not (len(head) == 2 and head[0] == pickle.PROTO[0] and 2 <= head[1] <= 5):
            return None
        extension = b"gpucrypt.stream/" in f.read()
    except OSError:
        return None
    if extension:
        return FormatError("this is the metadata of a checkpoint saved by DCP's own "
                           "FileSystemWriter with gpucrypt's EncryptionExtension, not by "
                           "EncryptedWriter: read it with FileSystemReader(path, "
                           "_extension_registry=EncryptionExtension(keyset=... or "
                           "identities=...).registry())")
    return FormatError("this looks like a plain (unencrypted) DCP checkpoint: its metadata is "
                       "DCP's pickle, not a gpucrypt file. Read it with DCP's "
                       "FileSystemReader(path), and only if you trust whoever wrote it "
                       "(DCP unpickles its metadata); EncryptedReader reads checkpoints "
                       "saved with EncryptedWriter")


def _auto_device(targets: list | None, gpu_usable: bool) -> str:
    """Where ``device="auto"`` decrypts an entry whose plaintext goes to tensors on the
    devices ``targets`` (``torch.device``; empty for a non-tensor value, None when the
    targets could not be seen): on the GPU only when one is usable and every target is
    a CUDA tensor (on the first target's GPU), so that the plaintext of a GPU tensor
    never reaches host memory, and that of a CPU tensor (offloaded parameters, optimizer
    state) is not staged in GPU memory on its way; else on the CPU. Unseen targets: the
    GPU when one is usable, as for GPU tensors."""
    if not gpu_usable:
        return "cpu"
    if targets is None:
        return "cuda"
    if not targets or any(t.type != "cuda" for t in targets):
        return "cpu"
    return str(targets[0])  # "cuda" (the current device) or "cuda:N"


def _target_device(planner: Any, item: Any) -> torch.device | None:
    """The device of the tensor ``item`` is loaded into, by the planner's own
    ``resolve_tensor`` (a view of the caller's tensor for DCP's planners); None without a
    planner, or where it cannot resolve the item yet (read_data asks it again, and
    fails there if it must)."""
    if planner is None:
        return None
    try:
        return planner.resolve_tensor(item).device
    except Exception:  # noqa: BLE001 - any planner's failure: the target is not known
        return None


def _calling_planner() -> LoadPlanner | None:
    """The planner of the DCP load calling the reader's ``prepare_local_plan``, or None.

    DCP gives a storage reader its planner only in ``read_data``, after the plans were
    gathered; ``prepare_local_plan``, which decrypts all a rank reads before that
    collective (see the module docstring), needs the targets' devices to decrypt each
    entry where it goes. DCP has set the planner up with the caller's state dict by
    then, and its load step, which calls ``prepare_local_plan``, holds it as
    ``planner``: it is taken from there (the nearest callers only). Not found (a DCP
    whose load step differs, a caller other than DCP): None, and "auto" decides as for
    targets it cannot see (:func:`_auto_device`)."""
    frame = sys._getframe(2)  # the caller of prepare_local_plan (or of an override's super)
    for _ in range(4):
        if frame is None:
            return None
        planner = frame.f_locals.get("planner")
        if isinstance(planner, LoadPlanner):
            return planner
        frame = frame.f_back
    return None


def _save_id_for(plan: SavePlan) -> str | None:
    """The id of the save under way, as the coordinator sent it (None: the save binds no
    files). DCP's plan caching (``DefaultSavePlanner(enable_plan_caching=True)``) hands
    ``write_data`` the plan it cached from an earlier save when this rank's plan did not
    change, with that save's id; the plan the coordinator scattered for this save, which
    carries this save's, is taken from DCP's save step, which holds it as
    ``central_plan`` (the nearest callers only, as :func:`_calling_planner` does).
    Not found (a DCP whose save step differs): the plan's own, which the coordinator
    refuses when it is an earlier save's (``_check_bound_alike``)."""
    frame = sys._getframe(2)  # the caller of write_data (or of an override's super)
    for _ in range(6):
        if frame is None:
            break
        scattered = frame.f_locals.get("central_plan")
        if isinstance(scattered, SavePlan):
            plan = scattered
            break
        frame = frame.f_back
    return getattr(plan.storage_data, "save_id", None)


def _header_sha256(path: Any, length: int) -> bytes:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(length)).digest()


def _storage_meta():
    from torch.distributed.checkpoint.metadata import StorageMeta

    return StorageMeta()


def _copy_into(target: torch.Tensor, source: torch.Tensor) -> None:
    """``target.copy_(source)``; for two contiguous CPU tensors of one dtype, one memcpy in
    this thread instead: torch's copy runs on its OpenMP pool, whose threads then spin
    waiting for more work (on a 2-rank load with 2 cores, more CPU time than the copy)."""
    if (target.device.type == source.device.type == "cpu" and target.dtype == source.dtype
            and target.is_contiguous() and source.is_contiguous() and target.numel()
            and not target.is_conj() and not source.is_conj()
            and not target.is_neg() and not source.is_neg()):
        np.copyto(target.reshape(-1).view(torch.uint8).numpy(),
                  source.reshape(-1).view(torch.uint8).numpy())
        # the memcpy is invisible to autograd: bump the version counter as copy_() does, so
        # that a backward through a graph that saved the old values fails, as with DCP's
        # own reader, instead of using the loaded ones (inference tensors: a no-op)
        torch.autograd.graph.increment_version(target)
    else:
        target.copy_(source)


def _zero(tensors: dict) -> None:
    """Overwrite decrypted entries that will not be returned (best effort: Python may
    have copied nothing else, but the allocator keeps no promise)."""
    for tensor in tensors.values():
        tensor.zero_()
