"""``safe_open`` for gpucrypt model files, with the behaviour of ``safetensors.safe_open``.

Code written for safetensors works by changing the import and giving a key::

    from gpucrypt.models import safe_open        # was: from safetensors import safe_open

    with safe_open("model.gcsafetensors", framework="pt", device="cpu", key=key) as f:
        names = f.keys()                          # sorted, as safetensors
        meta = f.metadata()                       # dict[str, str], or None
        w = f.get_tensor("lm_head.weight")
        rows = f.get_slice("embed.weight")[1000:2000]   # decrypts only those rows' segments

The key: ``key=`` (32 bytes), or ``keyset=`` and/or ``identity=`` (one or several
:class:`~gpucrypt.keys.Identity`, :class:`~gpucrypt.keys.KeysetKey`, providers ...)
to unwrap the data key from the file's envelope.

What happens when:

- opening reads the header, checks its MAC (a wrong key or a tampered table, name,
  shape or metadata fails here, before any data is read) and reads the tag table
  (16 bytes per segment); the file stays open until ``__exit__``/:meth:`close`;
- a file in a checkpoint folder (one with a ``gpucrypt-checkpoint.json``, as
  :func:`gpucrypt.files.checkpoints.encrypt_checkpoint` writes) is also checked against
  that manifest when it is opened, as ``load_encrypted`` and ``export_safetensors``
  check it: when the manifest verifies under the file's key, it must list the file under
  its name with its own salt, so a shard of an older save of the folder (or of another
  folder) under the same key put in its place raises ``AuthenticationError`` (a
  manifest that does not verify under the key says nothing of the file, which then
  opens on its own);
- ``get_tensor(name)`` reads and verifies that tensor's segments only, with
  :func:`gpucrypt.models.load_encrypted`'s engine (straight into the tensor's memory
  on the CPU, through pinned staging into device memory on a GPU); a failed segment
  raises ``AuthenticationError`` and nothing is returned;
- ``get_slice(name)[index]`` works out which segments hold the bytes the index selects
  (basic indexing: ints, slices with positive steps, ``...``, as safetensors and
  torch take them) and decrypts only those, into a buffer the size of the tensor whose
  untouched pages are never written (so never made resident, on the CPU). The result
  is a fresh contiguous tensor (the whole tensor itself when the index selects all of
  it); the decrypted segments around it are zeroed before the buffer is dropped.
  Damage to segments the slice does not touch is, by design, not noticed.

**safe_open authenticates one file, not a folder.** Each file's header MAC and segment
tags prove that its bytes are one encryption under the key, nothing about which
version of a folder it belongs to: the manifest check above catches a shard mixed in
from another save only while the manifest is there (someone who swaps a shard can
remove the manifest with it, and the shard then opens on its own), and it does not see
that the folder's other files, such as the index, agree. For a checkpoint folder use
:func:`gpucrypt.files.checkpoints.load_checkpoint` or :mod:`gpucrypt.hf`, which refuse a
folder without its manifest and check every file before any tensor is decrypted.

Errors: an unknown name, an unknown framework and a closed file raise
``safetensors.SafetensorError`` as safetensors does (when safetensors is installed;
``SafeOpenError`` itself otherwise), which here is also a ``KeyError`` (unknown name)
or a ``ValueError`` (the others), so code written for either kind catches it. A path
that is no regular file (a FIFO, a folder) is ``FormatError``, as for ``load_encrypted``;
"pt" where torch cannot be imported is ``ImportError`` when the file is opened, and a
tensor whose dtype torch lacks a ``ValueError`` naming it ("np" reads those).
Differences from safetensors: frameworks
are "pt"/"torch" and "np"/"numpy" (bfloat16 and float8 in NumPy need ``ml_dtypes``);
``get_dtype()`` gives safetensors' codes ("F32", "BF16", "F8_E4M3", ...), or the
portable name for a dtype safetensors lacks. On a GPU a slice decrypts into device
memory the size of its whole tensor, for as long as the call lasts.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from . import _format
from . import models as _models
from .. import pipeline
from ._safetensors import SAFETENSORS_DTYPES
from ..tensors import _frameworks as fw

__all__ = ["safe_open", "SafeSlice"]

#: safetensors' framework names -> gpucrypt.models' frameworks
_FRAMEWORKS = {"pt": "torch", "torch": "torch", "np": "numpy", "numpy": "numpy"}
_CODES = {name: code for code, name in SAFETENSORS_DTYPES.items()}
#: most runs of a slice enumerated one by one; past it the innermost strided dimension
#: is taken as one span (a few more segments decrypted, memory bounded)
_MAX_RUNS = 1 << 20


def _device(device: Any) -> str:
    """safetensors' device spellings (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``1``, a
    ``torch.device``) as gpucrypt.models' ("cpu", "cuda", "cuda:N"). Checked here, not
    by ``load_encrypted``'s check, whose message offers "auto", which safe_open does not
    take (safetensors has no such device)."""
    given = device
    if isinstance(device, int) and not isinstance(device, bool) and device >= 0:
        device = f"cuda:{device}"
    elif type(device).__name__ == "device":  # torch.device
        device = str(device)
    if isinstance(device, str) and (device in ("cpu", "cuda") or (
            device.startswith("cuda:") and device[5:].isdigit())):
        return _models._check_device(device)
    if given in ("auto", "gpu"):  # load_encrypted's spellings, which safetensors lacks
        why = "safe_open, as safetensors', names the device itself: give 'cpu' or 'cuda'"
    else:
        why = ("gpucrypt decrypts on the CPU or a CUDA GPU only (lower case, as torch spells "
               "them); for another device, open on 'cpu' and move the tensors with .to()")
    raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or a CUDA device number N, "
                     f"not {given!r}: {why}")


try:  # code written for safetensors catches its own error class: ours derive from it
    from safetensors import SafetensorError as _SafetensorError
except ImportError:  # safetensors is not needed to read gpucrypt files
    _SafetensorError = Exception


class SafeOpenError(_SafetensorError):
    """What :class:`safe_open` raises where safetensors raises ``SafetensorError``."""


class UnknownTensorError(SafeOpenError, _models._UnknownTensor):
    """No tensor of that name in the file (a ``KeyError``, as ``load_encrypted``'s for an
    unknown name, printed without KeyError's extra quotes)."""


class SafeOpenValueError(SafeOpenError, ValueError):
    """A closed file, or a framework this reader does not produce."""


class safe_open:  # noqa: N801 - safetensors' own name
    """An open gpucrypt model file, read tensor by tensor (see the module docstring).
    It authenticates this one file (and, when it lies in a checkpoint folder, that the
    folder's manifest lists it); load a folder with ``load_checkpoint`` or
    :mod:`gpucrypt.hf`, which check every file of it.

    ``framework``: "pt"/"torch" (torch tensors) or "np"/"numpy" (NumPy arrays).
    ``device``: "cpu" (default), "cuda", "cuda:N" or N. ``threads``: CPU threads for
    large tensors (default: the usable cores). Usable as a context manager; tensors
    returned stay valid after the file is closed.
    """

    def __init__(self, filename: Any, framework: str, device: Any = "cpu", *, key: Any = None,
                 keyset: Any = None, identity: Any = None, threads: int | None = None):
        if framework not in _FRAMEWORKS:
            raise SafeOpenValueError(f"framework must be one of {sorted(_FRAMEWORKS)}, "
                                     f"not {framework!r}")
        self._framework = _FRAMEWORKS[framework]
        # safetensors raises for a framework it cannot import; the tensor API's fallback
        # to NumPy arrays handed "pt" callers arrays without a word
        _models._import_framework(self._framework)
        self._device = _device(device)
        if self._device != "cpu":  # said now (BackendUnavailable, why), not at get_tensor
            from ..backends import get_backend

            get_backend("gpu")
        self._threads = pipeline.cpu_threads(threads)
        # load_encrypted's opener: a FIFO's plain open waited for a writer forever, and a
        # folder raised IsADirectoryError, where load_encrypted says FormatError at once
        self._file = _models._open_model(filename, buffering=0)
        opened_by = None  # the envelope stanza that opened a keyed file: audited below
        try:
            from .keyed import audit_keyed_open, file_key  # key management: at first use

            key, opened_by = file_key(lambda: _models._parse(self._file), key, keyset, identity)
            self._file.seek(0)
            (self._header, segments, self._tags, self._seg_key,
             self._aad) = _models._prepare_open(self._file, key)
            # a shard of a checkpoint folder is checked against the folder's manifest:
            # one from an older save under the same key opened with its old weights
            _models._check_against_its_folder(filename, key, self._header.salt)
            if opened_by is not None:  # as load_encrypted's model.decrypt, once verified
                audit_keyed_open("model.open", filename, opened_by)
                opened_by = None  # recorded: an audit log that fails says so itself
        except BaseException as exc:
            self._file.close()
            if opened_by is not None:  # set only once keyed has been imported
                audit_keyed_open("model.open", filename, opened_by, exc)
            raise
        infos = self._header.tensors
        self._position = {info.name: t for t, info in enumerate(infos)}
        self._segments: list[list] = [[] for _ in infos]
        for seg in segments:
            self._segments[seg.tensor].append(seg)

    # ---------------------------------------------------------------- safetensors' API
    def __enter__(self) -> "safe_open":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the file (tensors already returned stay valid)."""
        self._file.close()

    def keys(self) -> list[str]:
        """The tensor names, sorted (as safetensors)."""
        return sorted(self._position)

    def offset_keys(self) -> list[str]:
        """The tensor names in the order of their data in the file."""
        return [info.name for info in self._header.tensors]

    def metadata(self) -> dict | None:
        """The file's ``__metadata__`` (str -> str), ``{}`` when it is empty, or None when
        it has none (as safetensors: the two are told apart)."""
        metadata = self._header.stored_metadata
        return None if metadata is None else dict(metadata)

    def get_tensor(self, name: str) -> Any:
        """The whole tensor ``name``, decrypted and verified."""
        t = self._index(name)
        return self._load(t, self._segments[t])

    def get_tensors(self) -> dict:
        """Every tensor, name -> tensor, in the file's order, in one pipelined pass."""
        self._check_open()
        picked = list(range(len(self._header.tensors)))
        every = [s for segs in self._segments for s in segs]
        return self._run(every, picked, self._threads)

    def get_slice(self, name: str) -> "SafeSlice":
        """A handle on tensor ``name`` that decrypts what ``handle[index]`` selects."""
        return SafeSlice(self, self._index(name))

    # ---------------------------------------------------------------- inside
    def _check_open(self) -> None:
        if self._file.closed:
            raise SafeOpenValueError("the model file is closed: read tensors inside the 'with' "
                                     "block")

    def _index(self, name: str) -> int:
        self._check_open()
        try:
            return self._position[name]
        except (KeyError, TypeError):
            raise UnknownTensorError(f"no tensor {name!r} in this model file") from None

    def _run(self, segments: list, picked: list[int], threads: int) -> dict:
        h = self._header
        if self._device == "cpu":
            return _models._load_on_cpu(self._file, h, segments, self._tags, self._seg_key,
                                        self._aad, self._framework, threads, picked)
        return _models._load_on_gpu(self._file, h, segments, self._tags, self._seg_key,
                                    self._aad, self._framework, self._device, picked)

    def _load(self, t: int, segments: list) -> Any:
        """Tensor ``t`` with only ``segments`` of it decrypted (the rest of its memory
        left as allocated); small reads stay in this thread."""
        nbytes = sum(s.length for s in segments)
        threads = self._threads if nbytes > self._header.segment_size else 0
        return self._run(segments, [t], threads)[self._header.tensors[t].name]


class SafeSlice:
    """``safe_open(...).get_slice(name)``: shape and dtype without decrypting anything;
    ``[index]`` decrypts the segments the index touches and returns that part."""

    def __init__(self, owner: safe_open, position: int):
        self._owner, self._t = owner, position
        self._info = owner._header.tensors[position]

    def get_shape(self) -> list[int]:
        return list(self._info.shape)

    def get_dtype(self) -> str:
        return _CODES.get(self._info.dtype, self._info.dtype)

    def __len__(self) -> int:
        if not self._info.shape:
            raise TypeError("len() of a 0-d tensor")
        return self._info.shape[0]

    def __getitem__(self, index: Any) -> Any:
        owner, info = self._owner, self._info
        owner._check_open()
        ranges, normal = _normalise(index, info.shape)
        whole = all(isinstance(i, slice) for i in normal) and all(
            r == range(n) for r, n in zip(ranges, info.shape))
        if whole:
            return owner._load(self._t, owner._segments[self._t])
        wanted = touched_segments(ranges, info.shape, fw.dtype_itemsize(info.dtype),
                                  owner._header.segment_size)
        segments = [owner._segments[self._t][j] for j in wanted]
        full = owner._load(self._t, segments)
        try:
            part = full[normal]
            part = part.clone() if owner._framework == "torch" else np.array(part, copy=True)
        finally:
            _zero_segments(owner._framework, full, segments)
        return part


def _normalise(index: Any, shape: tuple) -> tuple[list[range], tuple]:
    """Per dimension the indices ``index`` selects (a range), and ``index`` as a tuple of
    one int or slice per dimension. Errors as torch's and safetensors' for basic indexing."""
    items = index if isinstance(index, tuple) else (index,)
    at = [k for k, i in enumerate(items) if i is Ellipsis]
    if len(at) > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    if at:
        at = at[0]
        fill = len(shape) - (len(items) - 1)
        items = items[:at] + (slice(None),) * max(fill, 0) + items[at + 1:]
    if len(items) > len(shape):
        raise IndexError(f"too many indices for a tensor of {len(shape)} dimensions: {len(items)}")
    items = items + (slice(None),) * (len(shape) - len(items))
    ranges, normal = [], []
    for d, (item, n) in enumerate(zip(items, shape)):
        if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            i = int(item)
            if not -n <= i < n:
                raise IndexError(f"index {i} is out of bounds for dimension {d} with size {n}")
            i %= n
            ranges.append(range(i, i + 1))
            normal.append(i)
        elif isinstance(item, slice):
            start, stop, step = item.indices(n)
            if step <= 0:
                raise ValueError("slice steps must be positive (as in torch)")
            ranges.append(range(start, stop, step))
            normal.append(slice(start, stop, step))
        else:
            raise TypeError(f"index with ints, slices and '...' only, not {type(item).__name__}: "
                            f"load the slice with those, then index it further (safetensors' "
                            f"torch slices also take None, bools and lists; this one does not)")
    return ranges, tuple(normal)


def touched_segments(ranges: list[range], shape: tuple, itemsize: int,
                     segment_size: int) -> list[int]:
    """The numbers (within the tensor, from 0) of the segments holding any byte of the
    elements that ``ranges`` (one per dimension, row-major tensor) select, in order."""
    if any(len(r) == 0 for r in ranges):
        return []
    ndim = len(shape)
    strides = [int(np.prod(shape[d + 1:], dtype=np.int64)) * itemsize for d in range(ndim)]
    k = ndim  # dimensions k.. are taken whole: each selected index of k-1 is one run
    while k > 0 and ranges[k - 1] == range(shape[k - 1]):
        k -= 1
    run = strides[k - 1] if k > 0 else int(np.prod(shape, dtype=np.int64)) * itemsize
    grid = list(range(k))  # dimensions whose selected indices each start a run
    if k > 0 and ranges[k - 1].step == 1:  # consecutive indices of k-1: one longer run
        grid.pop()
        run *= len(ranges[k - 1])
    base = ranges[k - 1].start * strides[k - 1] if k > 0 and ranges[k - 1].step == 1 else 0
    while grid and int(np.prod([len(ranges[d]) for d in grid], dtype=np.int64)) > _MAX_RUNS:
        d = grid.pop()  # too many runs: its selection becomes one span (a superset)
        r = ranges[d]
        run += (r[-1] - r[0]) * strides[d]
        base += r[0] * strides[d]
    starts = np.full(1, base, dtype=np.int64)
    for d in grid:
        starts = (starts[:, None] + np.asarray(ranges[d], dtype=np.int64) * strides[d]).reshape(-1)
    total = int(np.prod(shape, dtype=np.int64)) * itemsize
    count = -(-total // segment_size)
    marks = np.zeros(count + 1, dtype=np.int64)
    np.add.at(marks, starts // segment_size, 1)
    np.add.at(marks, (starts + run - 1) // segment_size + 1, -1)
    return np.flatnonzero(np.cumsum(marks[:-1]) > 0).tolist()


def _zero_segments(framework: str, full: Any, segments: list) -> None:
    """Zero the decrypted segments of ``full`` (its other memory was never written)."""
    raw = fw.BY_NAME[framework].byte_view(full)
    for s in segments:
        raw[s.start:s.start + s.length] = 0
