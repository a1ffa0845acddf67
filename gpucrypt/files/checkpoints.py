"""Hugging Face checkpoint folders, encrypted file by file.

A checkpoint folder as ``save_pretrained`` writes it (``config.json``, one
``model.safetensors`` or shards listed in ``model.safetensors.index.json``, a PEFT
adapter's ``adapter_config.json`` + ``adapter_model.safetensors``, tokenizer files) is
encrypted into a folder of the same shape: every ``*.safetensors`` file becomes a
gpucrypt model file *of the same name* (docs/MODEL_FORMAT.md), so the index's
``weight_map`` still names the right files; every other file is copied as it is.
Public API::

    encrypt_checkpoint(src, dst, key, *, key_id=None, envelope=None, **save_options) -> list
    decrypt_checkpoint(src, dst, *, key=None, keyset=None, identity=None) -> list
    load_checkpoint(folder, *, key=None, keyset=None, identity=None, device="cpu",
                    framework="torch", threads=None) -> dict     # the merged state dict
    checkpoint_layout(folder, *, encrypted=False) -> CheckpointLayout

Rules:

- one data key for the whole folder (each file still derives its own keys from its
  own random salt). With recipients, a keyset or key references the key is wrapped in
  an envelope in every file: the same one, or with ``envelope=`` a function of the
  file's salt, one sealed for each file (AWS KMS and PKCS#11 AES-GCM bind a wrapped
  key to one file's salt, :func:`gpucrypt.keys.file_context`). Loading unwraps the key
  once, from the envelope of the first model file (in name order), and opens every
  file with that key and no other: a file written under another data key fails its
  header MAC even when its own envelope opens for the same recipient (anyone holding a
  recipient's public key can seal a file to it);
- ``dst`` is written as a temporary folder ``.DST.XXXXXXXX.gpucrypt-tmp`` beside it and
  renamed into place at the end, once every file in it and the folder itself are
  fsynced: it appears complete or not at all, a power cut included. It must not exist
  (an empty folder is replaced); nothing is ever deleted to make room. The temporary
  folder is removed on any error and by SIGTERM and SIGHUP (when they have their default
  action and the work runs in the main thread); SIGKILL or a crash can leave it, with
  the files written so far (verified plaintext, when decrypting): delete it;
- a model file is any ``*.safetensors`` file, the suffix in any case;
- refused: a folder holding weights in another format (``PLAIN_WEIGHT_SUFFIXES``:
  ``.bin``, ``.pt``, ``.ot``, ``.npy``, ``.gguf``, ``.pth.tar``, ... and TensorFlow's
  ``model.ckpt.data-00000-of-00001``/``.index``, in any case, also under a backup
  suffix such as ``.bak``, ``~`` or ``.1``: copying them would ship plaintext weights),
  or any other file over ``LARGE_PLAIN_FILE_BYTES`` (16 MiB) that is not UTF-8 text
  (weights in a format no list names), unless the caller names it in
  ``copy_unencrypted``; and subfolders (encrypt each one on its own);
- refused in either direction, before anything is read: an entry that is not a regular
  file once links are followed (a FIFO, a device, a socket, a link leading nowhere);
  the files read here are opened without waiting (``O_NONBLOCK``) and read only once
  seen to be regular files, so one put in a file's place later is refused too (a model
  file swapped after the check is still opened by :mod:`gpucrypt.files.models`);
- loading checks the tensors against the index: every name the index lists, from the
  file it names, and no other.

- a manifest, ``gpucrypt-checkpoint.json``, lists every file of the encrypted folder:
  the SHA-256 of each copied file (the index, ``config.json``, tokenizer files...) and
  the salt of each model file (random per file and authenticated by the file's own
  header MAC, it names that one encryption; ``gpucrypt rekey`` keeps it), under an
  HMAC-SHA256 keyed from the folder's data key (HKDF, its own salt and label). Loading
  and decrypting check it first, and each model file's header MAC (salt, envelope, key
  id, tensor table), all under the one key, before any tensor is decrypted: a changed,
  added, removed, renamed or swapped file, a model file taken from another folder
  encrypted under the same key or written under another key, or a changed manifest
  fails with ``AuthenticationError`` naming the file;
- what is used is what was checked, so a file changed after the check changes nothing
  (or fails): a model file is decrypted with the header read from the same open file
  whose salt is then compared with the manifest's again (segments of another encryption
  then fail their tags); the index's ``weight_map`` is the one in the bytes whose
  digest was checked; decrypting copies each other file hashing the bytes it copies;
  and the bytes of a listed file that a caller reads (``gpucrypt.hf``: ``config.json``,
  ``generation_config.json``, ``adapter_config.json``) are read once, checked and
  returned; a file the manifest does not list is never read.

Not protected: the copied files are authenticated, not encrypted (``config.json`` and
the index stay readable, as the tensor names and shapes in the headers do unless
``encrypt_names``; the index lists every tensor name and its shard even then: leave it
out of ``src`` to hide them, and the loaders merge the shards without it); the folder's
name; which version of a folder is the newest (an
older folder encrypted under the same key verifies as itself: rotate keys to retire one);
who wrote a folder sealed only to public-key recipients (anyone with the public key can
write a whole folder of their own); a file the caller reads itself after loading (the
tokenizer files: read them from a decrypted copy, or check them yourself).
"""
from __future__ import annotations

import contextlib
import hashlib
import hmac
import codecs
import json
import os
import re
import stat
import warnings
from dataclasses import dataclass
from typing import Any, Iterable

from . import _format
from ._atomic import TemporaryFolder, _naming, _written, file_kind, fsync_folder, open_regular
from ._format import AuthenticationError, FormatError, StreamError

__all__ = ["encrypt_checkpoint", "decrypt_checkpoint", "load_checkpoint", "checkpoint_layout",
           "CheckpointLayout", "INDEX_SUFFIX", "PLAIN_WEIGHT_SUFFIXES", "LARGE_PLAIN_FILE_BYTES",
           "MANIFEST_NAME"]

#: the encrypted folder's list of its files, MAC'd under the data key
MANIFEST_NAME = "gpucrypt-checkpoint.json"
_MANIFEST_FORMAT = "gpucrypt-checkpoint-manifest"
_MANIFEST_VERSION = 1
_MANIFEST_MAC_INFO = b"gpucrypt checkpoint manifest v1 mac"

INDEX_SUFFIX = ".safetensors.index.json"
#: weight formats that must not be copied into an encrypted folder (compared in lower
#: case, after any backup suffix is taken off: :func:`_weight_format`)
PLAIN_WEIGHT_SUFFIXES = (
    # PyTorch: pickles and zip archives (.bin, .pt, .pth), archives of them (.pth.tar,
    # .zip, .tgz), torch.export and TorchScript programs, ExecuTorch and PyTorch Mobile
    # programs, TorchServe model archives, llamafiles
    ".bin", ".pt", ".pth", ".tar", ".tgz", ".zip", ".pt2", ".torchscript", ".jit", ".pte",
    ".ptl", ".mar", ".llamafile",
    # TensorFlow, Keras, Flax
    ".ckpt", ".h5", ".hdf5", ".keras", ".msgpack", ".pb", ".tflite",
    # rust-bert's tch weights (rust_model.ot: gpt2, bert-base-uncased, t5-small ship one)
    ".ot",
    # llama.cpp, ONNX, TensorRT engines, Core ML, PaddlePaddle, MXNet, Caffe, NeMo
    ".gguf", ".ggml", ".onnx", ".engine", ".plan", ".trt", ".mlmodel", ".mlpackage",
    ".pdparams", ".pdiparams", ".pdmodel", ".params", ".caffemodel", ".nemo",
    # NumPy arrays and pickles of any kind
    ".npy", ".npz", ".pkl", ".pickle", ".joblib",
)
#: TensorFlow checkpoints, which carry no one suffix: the variables in
#: ``model.ckpt.data-00000-of-00001`` (or ``ckpt-5.data-...``), their table in
#: ``model.ckpt.index`` (``ckpt-5.index``), a TF1 graph in ``model.ckpt-1000.meta``
_TF_CHECKPOINT = re.compile(r"(\.data-\d+-of-\d+|(^|\.)ckpt(-\d+)?(\.index|\.meta)?)$")
#: what backups, editors, partial downloads, copies and compressors add to a name:
#: ``model.bin.bak``, ``model.bin~``, ``model.bin.1`` (wget's second download),
#: ``x.bin.incomplete`` (the Hugging Face hub's), ``model.pt.zst`` still hold the weights
#: of a ``.bin`` or ``.pt``
_BACKUP_SUFFIX = re.compile(r"(\.(bak|backup|old|orig|tmp|temp|part|partial|incomplete|"
                            r"download|swp|\d+|gz|bz2|xz|zst|lz4|br)|~)$")  # compressed too
#: a file this large that is not a known weight format is refused unless the caller names
#: it (``copy_unencrypted``), when it is not text: weights in a format not listed above
#: would otherwise be copied in the clear. What a folder legitimately copies is small or
#: text: config and generation files are kilobytes, tokenizer.model (sentencepiece) and
#: vocab/merges files a few MiB (Gemma's tokenizer.model, among the largest, is 4 MiB);
#: the large tokenizer.json files (Gemma 3's is 33 MB) are JSON, which is text. 16 MiB
#: of float16 is 8 million parameters, smaller than any model a folder is made for.
LARGE_PLAIN_FILE_BYTES = 16 << 20
_SAFETENSORS = ".safetensors"


@dataclass(frozen=True)
class CheckpointLayout:
    """The files of a checkpoint folder: ``index`` (the ``*.safetensors.index.json`` file
    name, or None), its ``weight_map`` (tensor name -> file name, empty without index),
    the ``tensor_files`` (every ``*.safetensors``, sorted) and the ``other_files``."""

    folder: str
    index: str | None
    weight_map: dict
    tensor_files: tuple
    other_files: tuple


def checkpoint_layout(folder: Any, *, encrypted: bool = False,
                      copy_unencrypted: Iterable[str] = ()) -> CheckpointLayout:
    """The layout of ``folder``; ``FormatError`` for a folder that is not one checkpoint
    (no tensor file, several indexes, an index naming a file that is not there, a
    subfolder) or that holds a file which would carry weights in the clear: one in a
    weight format (``PLAIN_WEIGHT_SUFFIXES``, TensorFlow checkpoints, also under a backup
    suffix such as ``.bak``), or one over ``LARGE_PLAIN_FILE_BYTES`` that is not text.
    ``copy_unencrypted``: names of files the caller vouches hold no weights (a pickled
    ``training_args.bin``, a large image), copied as they are despite these rules.

    ``encrypted``: the layout of a folder :func:`encrypt_checkpoint` wrote, whose model
    files are the ones its manifest lists with a salt (authenticated later by
    ``_check_manifest``), and whose other files are refused nothing: the rules for which
    files may be copied are the encrypting version's, not this one's."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"not a folder: {folder}")
    names = sorted(os.listdir(folder))
    _refuse_other_than_files(folder, names)
    listed = _manifest_model_files(folder) if encrypted else None
    if listed is None:
        tensor_files = tuple(n for n in names if n.lower().endswith(_SAFETENSORS))
        _refuse_plain_weights(folder, [n for n in names if n not in tensor_files],
                              _vouched(copy_unencrypted, names, tensor_files))
    else:
        tensor_files = tuple(n for n in names if n in listed)
        _check_listed_model_files(folder, tensor_files)
    # what the manifest says shapes an encrypted folder's layout before its MAC is checked:
    # a layout that does not hold together then means the manifest (or a file) was changed
    wrong = FormatError if listed is None else _manifest_changed
    indexes = [n for n in names if n.endswith(INDEX_SUFFIX)] or \
        [n for n in names if n.lower().endswith(INDEX_SUFFIX)]  # the exact spelling first
    if len(indexes) > 1:
        raise FormatError(f"several indexes in one folder ({', '.join(indexes)}): keep one")
    if not tensor_files:
        raise wrong(f"no .safetensors file in {folder}")
    weight_map: dict = {}
    if indexes:
        weight_map = _read_weight_map(os.path.join(folder, indexes[0]))
        missing = sorted(set(weight_map.values()) - set(tensor_files))
        if missing:
            raise wrong(f"{indexes[0]} names {missing[0]}, which is not in the folder"
                        + ("" if listed is None else " as a model file"))
    others = tuple(n for n in names if n not in tensor_files and n != MANIFEST_NAME)
    return CheckpointLayout(folder, indexes[0] if indexes else None, weight_map, tensor_files,
                            others)


def _refuse_other_than_files(folder: str, names: list) -> None:
    """``FormatError`` naming every entry of ``folder`` that is not a regular file (links
    followed, as everywhere here), before anything is read: a FIFO waited for a writer
    forever in the read (or open) of whatever found it, and a character device passed
    the size rule (``getsize`` is 0) and was copied without end (``tokenizer.model ->
    /dev/zero`` filled the disk); ``_open_regular`` refuses one put there afterwards."""
    subfolders, others = [], []  # others: every entry not a file, in name order
    for name in names:
        path = os.path.join(folder, name)
        try:
            mode = os.stat(path).st_mode
        except OSError as exc:
            if not os.path.islink(path):
                raise
            others.append(f"{name} (a symbolic link that leads nowhere: {exc.strerror})")
            continue
        if stat.S_ISDIR(mode):
            subfolders.append(name)
        if not stat.S_ISREG(mode):
            others.append(f"{name} (a {file_kind(mode)})")
    if subfolders and len(subfolders) == len(others):
        raise FormatError(f"the checkpoint folder has subfolders ({', '.join(subfolders[:3])}): "
                          f"encrypt each checkpoint folder on its own")
    if others:
        raise FormatError(f"not every entry of {folder} is a file: {'; '.join(others)}; a "
                          f"checkpoint folder holds regular files (or links to them) only: "
                          f"remove these, or put the files themselves in their place")


def _open_regular(path: str):
    """``path`` opened for reading (unbuffered), ``FormatError`` unless it is a regular
    file: what is read is what was opened, so a FIFO or device put in a checked file's
    place later is refused too. ``O_NONBLOCK``: a FIFO's open would otherwise wait for a
    writer forever, before any check could see it."""
    def not_regular(kind: str) -> FormatError:
        return FormatError(f"{os.path.basename(path)} is a {kind}, not a regular file (it was "
                           f"put in the file's place after the folder was checked?): a "
                           f"checkpoint folder holds regular files only; put the file itself "
                           f"there and try again")

    return open_regular(path, not_regular, buffering=0)


def _vouched(copy_unencrypted: Iterable[str], names: list, tensor_files: tuple) -> set:
    """``copy_unencrypted`` as a set of names of the folder's files to be copied."""
    if isinstance(copy_unencrypted, (str, bytes, os.PathLike)):
        raise TypeError("copy_unencrypted must be an iterable of file names, not one name")
    vouched = set(copy_unencrypted)
    for name in sorted(vouched):
        if name not in names:  # a slip in the name would leave the file refused, unsaid
            raise FileNotFoundError(f"copy_unencrypted names {name!r}, which is not a file "
                                    f"of the folder (give file names, not paths)")
        if name in tensor_files:
            raise ValueError(f"copy_unencrypted names {name}, a .safetensors file: those are "
                             f"always encrypted, never copied; move it out of the folder to "
                             f"leave it out")
    return vouched


def _weight_format(name: str) -> str | None:
    """The weight format ``name`` says it holds (its suffix, in lower case), or None;
    backup suffixes are looked through (``adapter_model.bin.bak`` is a ``.bin``)."""
    base = name.lower()
    while True:
        stripped = _BACKUP_SUFFIX.sub("", base)
        if stripped == base or not stripped:
            break
        base = stripped
    tensorflow = _TF_CHECKPOINT.search(base)
    if tensorflow:
        return tensorflow.group(0)
    if base.endswith(_SAFETENSORS):  # model.safetensors.bak: not a model file, so copied
        return _SAFETENSORS
    return next((suffix for suffix in PLAIN_WEIGHT_SUFFIXES if base.endswith(suffix)), None)


def _is_text(path: str) -> bool:
    """Whether the file at ``path`` is UTF-8 text (and no NUL): read to its end, or to the
    first byte that is not; weights fail in their first block."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    with _open_regular(path) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            if b"\0" in block:
                return False
            try:
                decoder.decode(block)
            except UnicodeDecodeError:
                return False
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:  # it ends inside a character
        return False
    return True


def _refuse_plain_weights(folder: str, names: list, vouched: set) -> None:
    """``FormatError`` for the first of ``names`` (files to be copied as they are) that
    would carry weights in the clear, unless the caller vouched for it: a weight format
    by its name (:func:`_weight_format`), else a file over ``LARGE_PLAIN_FILE_BYTES`` that
    is not text. The size, and for large files the content, are the second line of
    defence: a list of suffixes is never complete (rust_model.ot was copied in the clear
    until .ot was added)."""
    vouch = ("; whichever holds no weights (a pickled training_args.bin, a large image), "
             "name to be copied as it is: copy_unencrypted=[...] (gpucrypt encrypt-model "
             "--copy-unencrypted NAME, repeated)")
    refused = []  # (name, why), all of them: a Trainer checkpoint has four such files
    for name in names:
        if name in vouched:
            continue
        fmt = _weight_format(name)
        if fmt == _SAFETENSORS:
            refused.append((name, "a safetensors file under a backup name, which is not "
                                  "encrypted as a model file"))
        elif fmt is not None:
            # TensorFlow's own names; a bare .ckpt is Lightning's as well
            tensorflow = not fmt.startswith(".") or fmt.startswith(".data-") or \
                fmt.endswith((".index", ".meta")) or re.fullmatch(r"\.ckpt-\d+", fmt)
            kind = "TensorFlow checkpoint" if tensorflow else fmt
            refused.append((name, f"a {kind} file, a format that holds weights or pickled "
                                  f"objects"))
    for name in names:
        path = os.path.join(folder, name)
        if name in vouched or _weight_format(name) is not None or \
                os.path.getsize(path) <= LARGE_PLAIN_FILE_BYTES:
            continue
        if not _is_text(path):
            refused.append((name, f"{os.path.getsize(path) / (1 << 20):.0f} MiB that are not "
                                  f"UTF-8 text, in no known format (files this large are "
                                  f"weights as a rule)"))
    if refused:
        listed = "; ".join(f"{name}: {why}" for name, why in refused)
        raise FormatError(f"{len(refused)} file(s) would be copied in the clear ({listed}): "
                          f"convert weights to safetensors (save_pretrained("
                          f"safe_serialization=True), safetensors.numpy.save_file) or move "
                          f"them out of the folder" + vouch)


def _read_json(path: str) -> Any:
    """The JSON file at ``path``, read before anything authenticates it (a manifest):
    :func:`~gpucrypt.files._safetensors.load_json`'s ``FormatError`` naming the file for
    whatever is not JSON, deep nesting included, and for a file past
    ``models.MAX_UNVERIFIED_TABLE_BYTES`` (16 MiB: a manifest lists a folder's files, some
    hundred bytes each; a 30 MB one beside a 1 KB model file took 763 MiB to parse)."""
    from . import models
    from ._safetensors import load_json

    data = _read_bounded(path, models.MAX_UNVERIFIED_TABLE_BYTES, "checkpoint manifest")
    return load_json(data, os.path.basename(path))


#: the largest index read (a folder's index is parsed before the manifest that lists it is
#: checked): the largest real ones, mixtures of experts of some 100k tensors, are ~10 MB
_MAX_INDEX_BYTES = 64 << 20


def _read_bounded(path: str, limit: int, what: str) -> bytearray:
    """The bytes of the regular file at ``path``; ``FormatError`` past ``limit`` (a file
    read before anything authenticates it is parsed whole: some 20x its size in memory)."""
    data = bytearray()
    with _open_regular(path) as f:  # unbuffered: a read may return less than asked
        while len(data) <= limit and (chunk := f.read(limit + 1 - len(data))):
            data += chunk
    if len(data) > limit:
        raise FormatError(f"{os.path.basename(path)} is larger than {limit >> 20} MiB, which "
                          f"no {what} is: it is damaged or not gpucrypt's")
    return data  # (load_json takes a bytearray: no copy)


def _read_weight_map(path: str) -> dict:
    name = os.path.basename(path)
    try:
        data = _read_bounded(path, _MAX_INDEX_BYTES, "checkpoint index")
    except OSError as exc:
        raise FormatError(f"{name} is not a checkpoint index with a weight_map "
                          f"({type(exc).__name__})") from None
    return _weight_map(data, name)


def _weight_map(data: bytes, name: str) -> dict:
    """The ``weight_map`` of the index ``name`` whose bytes are ``data``."""
    from ._safetensors import load_json

    try:
        weight_map = load_json(data, name)["weight_map"]
    except FormatError:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise FormatError(f"{name} is not a checkpoint index with a weight_map "
                          f"({type(exc).__name__})") from None
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and os.path.basename(v) == v
            and v.lower().endswith(_SAFETENSORS) for k, v in weight_map.items()):
        raise FormatError(f"{name}: weight_map must map tensor names to .safetensors file "
                          f"names in the same folder")
    return weight_map


# ---------------------------------------------------------------------------- manifest
def _file_sha256(path: str, copy_to: str | None = None) -> str:
    """The SHA-256 of the regular file at ``path``; with ``copy_to``, the file is copied
    there as it is hashed, so the copy holds exactly the bytes the digest is of, with the
    source's permission bits (a 0600 file came out 0644, readable by all), fsynced: the
    folder holding it is renamed into place next, and a power cut must not publish it
    with an empty or partial copy."""
    digest = hashlib.sha256()
    with _open_regular(path) as f, \
            (open(copy_to, "xb") if copy_to else contextlib.nullcontext()) as out:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
            if out is not None:
                out.write(block)
        if out is not None:
            out.flush()
            os.fchmod(out.fileno(), stat.S_IMODE(os.fstat(f.fileno()).st_mode) & 0o777)
            os.fsync(out.fileno())
    return digest.hexdigest()


def _is_listed_digest(entry: dict, digest: str) -> bool:
    """Whether the manifest ``entry`` of a copied file has the SHA-256 ``digest`` (hex)."""
    return "sha256" in entry and hmac.compare_digest(digest.encode(), str(entry["sha256"]).encode())


def _is_listed_salt(entry: dict, salt: bytes) -> bool:
    """Whether the manifest ``entry`` of a model file has the header salt ``salt``."""
    return "salt" in entry and hmac.compare_digest(salt.hex().encode(), str(entry["salt"]).encode())


def _not_the_file(name: str) -> AuthenticationError:
    return AuthenticationError(f"{name} is not the file this folder was encrypted with "
                               f"(changed, replaced, or swapped with another file)")


def _read_checked(folder: str, files: dict, name: str) -> bytes:
    """The bytes of the copied file ``name``, read once and checked against its entry in
    ``files`` (the authenticated manifest's): the bytes returned are the bytes checked,
    whatever happens to the file afterwards."""
    with _open_regular(os.path.join(folder, name)) as f:
        data = f.readall()
    if not _is_listed_digest(files[name], hashlib.sha256(data).hexdigest()):
        raise _not_the_file(name)
    return data


def _manifest_mac(key: bytes, salt: bytes, files: dict) -> str:
    """HMAC-SHA256 of the manifest's canonical JSON (sorted keys, no spaces) under a key
    derived from the data key for this purpose only."""
    body = json.dumps({"format": _MANIFEST_FORMAT, "version": _MANIFEST_VERSION,
                       "salt": salt.hex(), "files": files},
                      sort_keys=True, separators=(",", ":")).encode("utf-8")
    mac_key = _format.hkdf_sha256(key, salt, _MANIFEST_MAC_INFO)
    return hmac.new(mac_key, body, hashlib.sha256).hexdigest()


def _write_manifest(folder: str, key: bytes, salts: dict, digests: dict | None = None) -> None:
    """The manifest of ``folder``: ``salts`` (model file name -> its header's salt)
    and the SHA-256 of every other file now in it (``digests``: those taken as they were
    copied, by name; any other is hashed here)."""
    files = {name: {"salt": salt.hex()} for name, salt in salts.items()}
    for name in sorted(os.listdir(folder)):
        if name not in files and name != MANIFEST_NAME:
            digest = (digests or {}).get(name) or _file_sha256(os.path.join(folder, name))
            files[name] = {"sha256": digest}
    salt = os.urandom(32)
    doc = {"format": _MANIFEST_FORMAT, "version": _MANIFEST_VERSION, "salt": salt.hex(),
           "files": files, "mac": _manifest_mac(key, salt, files)}
    with open(os.path.join(folder, MANIFEST_NAME), "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _manifest_changed(why: str) -> AuthenticationError:
    return AuthenticationError(f"{MANIFEST_NAME} does not match the folder ({why}): the manifest "
                               f"or a file was changed")


def _check_listed_model_files(folder: str, names: tuple) -> None:
    """Each file the (not yet authenticated) manifest lists as a model file is one."""
    from . import models

    for name in names:
        with _open_regular(os.path.join(folder, name)) as f:
            if f.read(len(models.MAGIC)) != models.MAGIC:
                raise _manifest_changed(f"{name} is listed as a model file and is not one")


def _manifest_model_files(folder: str) -> set | None:
    """The names the folder's manifest lists as model files (with a salt), None when it
    has no readable manifest (_check_manifest then says why)."""
    try:
        files = _read_json(os.path.join(folder, MANIFEST_NAME))["files"]
        return {name for name, entry in files.items() if isinstance(entry, dict) and "salt" in entry}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # FormatError included
        return None


def _authenticated_manifest(folder: str, key: bytes) -> dict:
    """The entries of ``folder``'s manifest (file name -> ``{"salt"|"sha256": HEX}``),
    its MAC checked under the folder's data ``key``: ``FormatError`` for a missing or
    unreadable manifest, ``AuthenticationError`` for one that fails."""
    path = os.path.join(folder, MANIFEST_NAME)
    try:
        doc = _read_json(path)
        salt, files, mac = bytes.fromhex(doc["salt"]), doc["files"], doc["mac"]
        if doc.get("format") != _MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError("not a gpucrypt checkpoint manifest")
        version = doc.get("version")
    except FileNotFoundError:
        raise FormatError(f"{folder} has no {MANIFEST_NAME}: it is not a folder that "
                          f"encrypt_checkpoint (gpucrypt encrypt-model) wrote, or the manifest "
                          f"was removed; encrypt the plaintext folder again") from None
    except FormatError as exc:  # not JSON: it names the manifest and says why
        raise FormatError(f"{exc}; encrypt the plaintext folder again") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise FormatError(f"{MANIFEST_NAME} cannot be read ({type(exc).__name__}: {exc})") from None
    if version != _MANIFEST_VERSION:
        raise FormatError(f"{MANIFEST_NAME} has version {version!r}; this gpucrypt reads "
                          f"version {_MANIFEST_VERSION}: upgrade gpucrypt")
    # entries are what _write_manifest writes, {"salt"|"sha256": HEX}, before the MAC is
    # computed over them: JSON nested just under the parser's limit would otherwise reach
    # json.dumps deeper in the stack, and its RecursionError
    if not all(isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values())
               for entry in files.values()):
        raise _manifest_changed("an entry is not a salt or digest")
    if not isinstance(mac, str) or not hmac.compare_digest(
            _manifest_mac(key, salt, files).encode(), mac.encode()):
        raise AuthenticationError(f"{MANIFEST_NAME} failed authentication: wrong key, or the "
                                  f"manifest was changed")
    return files


def _check_manifest(layout: CheckpointLayout, key: bytes) -> dict:
    """Check the folder against its manifest (see the module docstring), and every model
    file's header, under the folder's one data ``key``, before anything is decrypted;
    ``AuthenticationError`` or ``FormatError`` naming what is wrong. Returns the
    manifest's entries (file name -> ``{"salt"|"sha256": HEX}``), authenticated: what
    the files' bytes must still be when they are used."""
    from . import models

    files = _authenticated_manifest(layout.folder, key)
    present = set(layout.tensor_files) | set(layout.other_files)
    removed, added = sorted(set(files) - present), sorted(present - set(files))
    if removed or added:
        raise AuthenticationError(
            "the folder's files are not the ones it was encrypted with: "
            + (f"missing {', '.join(removed[:3])}" if removed else "")
            + ("; " if removed and added else "")
            + (f"not in the manifest {', '.join(added[:3])}" if added else ""))
    for name in sorted(files):
        entry, full = files[name], os.path.join(layout.folder, name)
        if name in layout.tensor_files:
            # the header (salt and envelope included) checked under the folder's one key
            try:
                salt = models.read_header(full, key).salt
            except AuthenticationError:
                raise AuthenticationError(
                    f"{name} is not under this folder's data key (its header fails "
                    f"authentication with the key of {layout.tensor_files[0]}): it was "
                    f"replaced by a file encrypted on its own") from None
            good = _is_listed_salt(entry, salt)
        elif name == layout.index:
            # the layout's weight_map was read before this check: it must be the one in
            # the bytes checked now (an index changed and put back in between is not)
            if _weight_map(_read_checked(layout.folder, files, name), name) != layout.weight_map:
                raise _not_the_file(name)
            good = True
        else:
            good = _is_listed_digest(entry, _file_sha256(full))
        if not good:
            raise _not_the_file(name)
    return files


def _check_file_against_its_folder(path: Any, key: bytes, salt: bytes) -> None:
    """For a model file opened on its own (:func:`gpucrypt.models.safe_open`,
    ``load_encrypted``, ``export_safetensors``), whose header, with ``salt``, was verified
    under ``key``: when it sits in a folder whose manifest verifies under the same key,
    that manifest must list the file, under its name, with this salt. Else
    ``AuthenticationError``: a shard of an older save of the folder (same key) put in
    place of the current one opened with the old weights, and nothing said so. Cheap:
    the manifest only, no other file is read.

    A manifest that does not verify under the key (another key's folder, a file
    encrypted on its own and put there), cannot be read, or is of another version says
    nothing about this file, whose own header has verified: it opens as a file on its
    own, as it would with no manifest there. This check cannot see a manifest removed or
    renamed along with the swap either. Folders are for :func:`load_checkpoint` and
    :mod:`gpucrypt.hf`, which refuse a folder without its manifest and check every file."""
    if not isinstance(path, (str, bytes, os.PathLike)):
        return  # a descriptor: no folder to look in
    folder, name = os.path.split(os.path.abspath(os.fsdecode(path)))
    if not os.path.lexists(os.path.join(folder, MANIFEST_NAME)):
        return
    try:
        files = _authenticated_manifest(folder, key)
    except (StreamError, OSError):
        return
    if not _is_listed_salt(files.get(name, {}), salt):
        listed = "under another encryption" if name in files else "not at all"
        raise AuthenticationError(
            f"{name} is not the file its folder was encrypted with: the folder's "
            f"{MANIFEST_NAME} lists it {listed} (a file of an older save of the folder, "
            f"or of another folder, put in its place); load the folder with "
            f"load_checkpoint or gpucrypt.hf, which check every file")


# ---------------------------------------------------------------------------- writing
def refuse_nested_folders(src: Any, dst: Any, done: str,
                          names: tuple[str, str] = ("the checkpoint folder", "the output")) -> None:
    """``ValueError`` when the output folder ``dst`` is the checkpoint folder ``src``, or
    one holds the other (links resolved): an output inside ``src`` was written there, and
    ``src``, holding a subfolder from then on, could no longer be encrypted or decrypted
    ("has subfolders"). ``done``: what ``dst`` holds ("encrypted"), for the suggested name;
    ``names``: what the message calls ``src`` and ``dst`` (the command line's IN and OUT)."""
    src, dst = os.fspath(src), os.fspath(dst)
    inside, outside = os.path.realpath(src), os.path.realpath(dst)  # dst may be new
    common = os.path.commonpath((inside, outside))
    if common not in (inside, outside):
        return
    # beside src, by its real name (src given as "." would suggest ".-encrypted", inside it)
    other = os.path.join(os.path.dirname(inside), f"{os.path.basename(inside)}-{done}")
    src_name, dst_name = names
    if inside == outside:
        raise ValueError(f"{dst_name} {dst} is {src_name} {src} itself: give a new folder "
                         f"for {dst_name}, such as {other}")
    if common == inside:
        raise ValueError(f"{dst_name} {dst} is inside {src_name} {src}: {src_name} would then "
                         f"hold a subfolder, and gpucrypt refuses a checkpoint folder with "
                         f"subfolders from then on; give {dst_name} outside {src_name}, such "
                         f"as {other}")
    raise ValueError(f"{src_name} {src} is inside {dst_name} {dst}: {dst_name} must be a new "
                     f"or empty folder, outside {src_name}; give another, such as {other}")


def _write_folder(dst: Any, fill) -> None:
    """``fill(temp_folder)`` then rename the temporary folder to ``dst`` (which must not
    exist, or be an empty folder). The temporary folder is removed on any error and by
    SIGTERM/SIGHUP (:class:`~gpucrypt.files._atomic.TemporaryFolder`): decrypting puts
    verified plaintext in it under plain names. SIGKILL can leave it behind. Errors of
    the temporary folder and of the files made in it name ``dst`` (the file's own name
    said in the message), not the temporary folder, which is gone by then."""
    dst = os.path.abspath(os.fspath(dst))
    if os.path.islink(dst):  # rename() would refuse it (ENOTDIR) only after all the work
        raise FileExistsError(f"{dst} is a symbolic link: give the folder it points to, or a "
                              f"new output folder (a folder is renamed into place, which "
                              f"cannot go through a link)")
    if os.path.lexists(dst) and not (os.path.isdir(dst) and not os.listdir(dst)):
        raise FileExistsError(f"{dst} exists: choose a new output folder (nothing is deleted "
                              f"to make room)")
    with TemporaryFolder(dst) as temp:
        try:
            fill(temp)
        except OSError as exc:
            named = _as_of_folder(exc, temp, dst)
            if named is exc:
                raise
            raise named from None
        # the folder's own entries (every file fill wrote, the copies and the manifest
        # last) made durable before the rename publishes them: otherwise a power cut just
        # after could leave dst in place with files missing
        fsync_folder(temp)
        try:
            os.rename(temp, dst)  # onto an empty folder too (POSIX)
        except OSError as exc:  # named by dst: the temporary folder is gone with this error
            raise OSError(exc.errno, f"{exc.strerror}: the finished folder could not take "
                                     f"its place (did it change meanwhile, or is it a mount "
                                     f"point?) and was removed; choose a new output folder",
                          dst) from None
    fsync_folder(os.path.dirname(dst))


def _as_of_folder(exc: OSError, temp: str, dst: str) -> OSError:
    """``exc``, raised while the temporary folder ``temp`` was filled, as an error of the
    output folder ``dst``: one naming ``temp`` or a file in it names ``dst`` (the file's
    name in ``dst`` said after the reason), and a write's error that names no file
    (a full disk, from a worker's ``pwrite``) names ``dst``; any other (IN's) is ``exc``."""
    name = exc.filename
    if isinstance(name, str) and (name == temp or name.startswith(temp + os.sep)):
        inner = os.path.relpath(name, temp)
        reason = exc.strerror if inner == os.curdir else f"{exc.strerror} (writing {inner} in it)"
        return _naming(exc, dst, reason)
    if _written(exc):
        return _naming(exc, dst)
    return exc


def _copy_others(layout: CheckpointLayout, temp: str, files: dict | None = None) -> dict:
    """Copy the files that are not model files into ``temp``; with ``files`` (the
    authenticated manifest's entries), each hashed as it is copied and checked against
    its entry, so that a file changed after the manifest was checked is not copied
    unchecked (the error removes the temporary folder). Returns each copy's SHA-256 (the
    manifest's, when encrypting: read once, not again from the copy)."""
    digests = {}
    for name in layout.other_files:
        src, dst = os.path.join(layout.folder, name), os.path.join(temp, name)
        if files is None:
            _warn_if_from_outside(layout.folder, name)
        # hashed when encrypting too (it costs little beside the model files): one copy,
        # refusing what is not a regular file, keeping the mode, fsynced
        digest = digests[name] = _file_sha256(src, copy_to=dst)
        if files is not None and not _is_listed_digest(files[name], digest):
            raise _not_the_file(name)
    return digests


def _warn_if_from_outside(folder: str, name: str) -> None:
    """A warning for a file copied in the clear that is a symbolic link leading out of
    the folder (``special.json -> ../key.bin`` copied the key into the encrypted folder,
    in the clear). Links are followed, as a Hugging Face cache needs (its snapshot's files
    lead to ``../../blobs``, which is not warned of); a link elsewhere may be a mistake
    whose target the user did not mean to share."""
    path = os.path.join(folder, name)
    if not os.path.islink(path):
        return
    home, target = os.path.realpath(folder), os.path.realpath(path)
    inside = [home]
    # a Hugging Face cache's snapshot, or a subfolder of one (a pipeline's text_encoder):
    # models--org--name/snapshots/REV/... lead to models--org--name/blobs
    place = home
    while os.path.dirname(place) != place:
        if os.path.basename(os.path.dirname(place)) == "snapshots":
            inside.append(os.path.join(os.path.dirname(os.path.dirname(place)), "blobs"))
            break
        place = os.path.dirname(place)
    if not any(os.path.commonpath([target, place]) == place for place in inside):
        warnings.warn(f"{name} is a symbolic link to {target}, outside the folder: its target "
                      f"is copied in the clear into the encrypted folder; if that was not "
                      f"meant, remove the link and encrypt again", stacklevel=4)


def encrypt_checkpoint(src: Any, dst: Any, key: Any, *, key_id: str | None = None,
                       envelope: Any = None, copy_unencrypted: Iterable[str] = (),
                       **save_options: Any) -> list:
    """Encrypt the checkpoint folder ``src`` into the new folder ``dst`` (see the module
    docstring; ``dst`` inside ``src``, or around it, is ``ValueError``): each
    ``*.safetensors`` file with :func:`gpucrypt.models.save_encrypted` (read a segment at
    a time; its ``__metadata__`` kept), the rest copied.
    ``envelope``: the envelope bytes for every file, or a function called with each
    model file's salt (drawn fresh) returning that file's envelope, for wrapped keys
    bound to the file (``lambda salt: keys.seal_envelope(key, references,
    context=keys.file_context(salt))``). ``copy_unencrypted``: names of files to copy as
    they are although their name or size says weights (:func:`checkpoint_layout`: a
    folder holding such a file is refused otherwise). ``save_options``: ``algorithm``,
    ``segment_size``, ``encrypt_names``, ``device``, ``threads``. Returns the headers,
    in file-name order."""
    from . import models
    from ._safetensors import open_safetensors

    refuse_nested_folders(src, dst, "encrypted")
    layout = checkpoint_layout(src, copy_unencrypted=copy_unencrypted)
    key = _format.check_key(key)
    headers: list = []

    def fill(temp: str) -> None:
        for name in layout.tensor_files:
            path = os.path.join(layout.folder, name)
            # an envelope bound to the file is sealed for the salt the file will carry
            salt = os.urandom(_format.SALT_SIZE) if callable(envelope) else None
            file_envelope = envelope(salt) if callable(envelope) else envelope
            with _open_regular(path) as source:
                fd = source.fileno()
                models._refuse_model_file(fd, name)
                try:
                    tensors, metadata = open_safetensors(path, fd)
                except ValueError as exc:
                    raise FormatError(f"{name}: {exc}") from None
                headers.append(models.save_encrypted(
                    tensors, os.path.join(temp, name), key, metadata, key_id=key_id,
                    envelope=file_envelope, _salt=salt, **save_options))
        digests = _copy_others(layout, temp)
        _write_manifest(temp, key, {name: h.salt for name, h in zip(layout.tensor_files, headers)},
                        digests)

    _write_folder(dst, fill)
    return headers


def _folder_key(layout: CheckpointLayout, key: Any, keyset: Any, identity: Any) -> bytes:
    """The folder's one data key: ``key``, or the key unwrapped from the envelope of the
    first model file (read unauthenticated, only to find the envelope). The manifest and
    then every model file's header MAC are checked under this key, so a file whose own
    envelope holds another data key (sealed to the same public key by anyone) fails."""
    from . import models
    from .keyed import file_key

    # the envelope only: the table (unauthenticated JSON) is left undecoded
    return file_key(lambda: models._parse_path(os.path.join(layout.folder, layout.tensor_files[0])),
                     key, keyset, identity)[0]


def decrypt_checkpoint(src: Any, dst: Any, *, key: Any = None, keyset: Any = None,
                       identity: Any = None, threads: int | None = None) -> list:
    """The reverse of :func:`encrypt_checkpoint`: each model file of ``src`` exported with
    :func:`gpucrypt.models.export_safetensors` (verified before it appears), the rest
    copied, into the new folder ``dst`` (not inside ``src`` or around it). Returns the
    verified headers."""
    from . import models

    refuse_nested_folders(src, dst, "decrypted")
    layout = checkpoint_layout(src, encrypted=True)
    key = _folder_key(layout, key, keyset, identity)
    files = _check_manifest(layout, key)
    headers: list = []

    def fill(temp: str) -> None:
        for name in layout.tensor_files:
            path = os.path.join(layout.folder, name)
            # the header returned is the one the file was decrypted with (read from the
            # same open file): a file swapped since the check has another salt
            header = models.export_safetensors(path, os.path.join(temp, name), key,
                                               threads=threads, _folder_checked=True)
            if not _is_listed_salt(files[name], header.salt):
                raise _not_the_file(name)
            headers.append(header)
        _copy_others(layout, temp, files)

    _write_folder(dst, fill)
    return headers


def load_checkpoint(folder: Any, *, key: Any = None, keyset: Any = None, identity: Any = None,
                    device: str = "cpu", framework: str = "torch",
                    threads: int | None = None) -> dict:
    """The state dict of the encrypted checkpoint ``folder``: every model file loaded
    with :func:`gpucrypt.models.load_encrypted` (``device`` "cpu" or "cuda[:N]": on a
    GPU the plaintext exists only in device memory), merged in file-name order.

    With an index, the tensors must be exactly the ones its ``weight_map`` lists, each
    from the file it names (``FormatError`` otherwise); without one, a name found in two
    files is a ``FormatError``. Errors of ``load_encrypted`` otherwise; no partial
    state dict is returned."""
    return _load_checkpoint(folder, key=key, keyset=keyset, identity=identity, device=device,
                            framework=framework, threads=threads)[0]


def _load_checkpoint(folder: Any, *, key: Any, keyset: Any, identity: Any, device: str,
                     framework: str, threads: int | None) -> tuple[dict, Any]:
    """:func:`load_checkpoint`'s state dict, and ``read(name)``: the bytes of the copied
    file ``name``, read once and checked against the authenticated manifest (build from
    these, never from the file again; a changed file raises ``AuthenticationError``), or
    None for a name the manifest does not list as one, which is not read at all."""
    layout = checkpoint_layout(folder, encrypted=True)
    key = _folder_key(layout, key, keyset, identity)
    files = _check_manifest(layout, key)

    def read(name: str) -> bytes | None:
        if "sha256" not in files.get(name, {}):
            return None
        return _read_checked(layout.folder, files, name)

    state: dict = {}
    for name in layout.tensor_files:
        tensors = _load_model_file(layout.folder, name, files[name], key, device, framework,
                                   threads)
        for tensor_name in tensors:
            if tensor_name in state:
                raise FormatError(f"tensor {tensor_name!r} is in two files (the second: {name})")
            expected = layout.weight_map.get(tensor_name, name) if layout.index else name
            if expected != name:
                raise FormatError(f"{name} holds {tensor_name!r}, which {layout.index} puts in "
                                  f"{expected}: the files were renamed or swapped")
        state.update(tensors)
    if layout.index:
        missing = sorted(set(layout.weight_map) - set(state))
        extra = sorted(set(state) - set(layout.weight_map))
        if missing or extra:
            raise FormatError(f"the tensors do not match {layout.index}: "
                              + (f"{len(missing)} missing (e.g. {missing[0]!r})" if missing else "")
                              + ("; " if missing and extra else "")
                              + (f"{len(extra)} not listed (e.g. {extra[0]!r})" if extra else ""))
    return state, read


def _load_model_file(folder: str, name: str, entry: dict, key: bytes, device: str,
                     framework: str, threads: int | None) -> dict:
    """The tensors of the model file ``name``: :func:`gpucrypt.models.load_encrypted`, with
    the salt of the header it decrypts with (read from the same open file) compared with
    the manifest ``entry``'s. A file swapped since the manifest was checked (another
    encryption under the same key, an older version of the folder) fails here, naming the
    file; one changed while it is read fails its segment tags, which are checked under
    this header's keys."""
    from . import models

    def check(header: Any) -> None:
        if not _is_listed_salt(entry, header.salt):
            raise _not_the_file(name)
    try:
        return models.load_encrypted(os.path.join(folder, name), key, device,
                                     framework=framework, threads=threads, _check_header=check)
    except AuthenticationError as exc:
        if exc.segment is None and "is not the file" not in str(exc):
            raise _not_the_file(name) from None  # its header passed under this key before
        raise
