"""safetensors files read and written a segment at a time, so that models of any size
convert in bounded memory.

``open_safetensors(path)`` has the ``safetensors`` package check the file (its parser
is the reference: header length, JSON, dtypes, offsets that tile the data region) and
returns, per tensor and in the package's own order, a :class:`StoredTensor`: the
tensor's portable dtype name and shape and where its bytes lie in the file. Nothing
of the data is read until :meth:`StoredTensor.read_into` is called, which reads the
wanted bytes with ``os.pread`` (no shared file position, so threads may read
concurrently). :func:`gpucrypt.models.save_encrypted` takes these handles in place of
tensors.

``safetensors_layout(tensors, metadata)`` is the other way: the header bytes and each
tensor's file offset that ``safetensors.save_file`` would write for those tensors, so
that :func:`gpucrypt.models.export_safetensors` can write the header and then each
decrypted segment where it belongs. The package's rules, checked against it by a
differential test: data ordered by dtype (widest first, in the package's dtype order)
then name; compact JSON with ``__metadata__`` first and each entry's keys in the order
dtype, shape, data_offsets; the header padded with spaces to a multiple of 8 bytes.
The package writes metadata in its hash map's order, which varies from run to run;
here it keeps the given order.

``load_json(data, what)`` parses JSON that anyone may have written (a model file's
table before its MAC is checked, a checkpoint's index and manifest, a safetensors
header): whatever is wrong with it is a ``FormatError`` naming ``what``, never the
``RecursionError`` that deep nesting gives ``json``.

Limits: the sub-byte safetensors dtypes (F4, F6_*) have no byte-sized portable name and
are refused with ``ValueError``; the file must not change while it is being read (a
short read raises ``TruncatedError``).
"""
from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._format import FormatError, read_at

__all__ = ["StoredTensor", "open_safetensors", "safetensors_layout", "load_json",
           "SAFETENSORS_DTYPES"]

#: safetensors dtype codes -> the tensor API's portable dtype names
SAFETENSORS_DTYPES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16",
    "U32": "uint32", "I32": "int32", "U64": "uint64", "I64": "int64",
    "F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64",
    "C64": "complex64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu", "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
}
_HEADER_LENGTH = struct.Struct("<Q")
#: portable dtype name -> safetensors code
_CODES = {name: code for code, name in SAFETENSORS_DTYPES.items()}
#: the package's dtype order (its ``Dtype`` enum), which sorts the data widest first;
#: 0.8 put the two FNUZ float8s after F8_E8M0 (read off files it wrote: the data of
#: equal-sized dtypes lies in the reverse of this order)
_ORDER = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ",
          "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64")


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def load_json(data: bytes | str, what: str) -> Any:
    """``data`` (UTF-8 bytes, or str) parsed as JSON, for input that is not authenticated
    yet. ``FormatError`` starting with ``what`` for anything that is not JSON: bad UTF-8,
    bad syntax, an integer past Python's digit limit, a string holding half of a UTF-16
    surrogate pair (``ValueError``s), and nesting too
    deep for the parser: ``json`` raises ``RecursionError`` there (from about a thousand
    levels), which no caller expects and which would escape as a traceback. Files that
    gpucrypt and safetensors write nest three levels at most."""
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
        doc = json.loads(text)
        if _SURROGATE_ESCAPE.search(text):
            # "\ud800" alone parses to a str no UTF-8 can hold: it broke later, at an
            # .encode() (UnicodeEncodeError, no FormatError); a pair is one character
            json.dumps(doc, ensure_ascii=False).encode("utf-8")
        return doc
    except RecursionError:
        raise FormatError(f"{what}: JSON nested too deeply to read (arrays or objects "
                          f"inside each other past Python's recursion limit); the file "
                          f"is damaged or was not written by gpucrypt") from None
    except (ValueError, TypeError) as exc:  # JSONDecodeError, UnicodeDecodeError, digits
        raise FormatError(f"{what}: not UTF-8 JSON ({type(exc).__name__}: "
                          f"{str(exc)[:100]})") from None


@dataclass(frozen=True)
class StoredTensor:
    """A tensor whose bytes lie in a file: ``nbytes`` bytes from ``offset`` of ``fd``."""

    dtype: str
    shape: tuple
    fd: int
    offset: int
    nbytes: int

    def read_into(self, start: int, view: np.ndarray) -> None:
        """Fill ``view`` (uint8, at most ``nbytes - start`` long) with the tensor's bytes
        from ``start``."""
        if start < 0 or start + view.nbytes > self.nbytes:
            raise ValueError(f"bytes {start}..{start + view.nbytes} are outside the tensor "
                             f"({self.nbytes} bytes)")
        read_at(self.fd, self.offset + start, view, "the safetensors file")


def open_safetensors(path: str, fd: int) -> tuple[dict[str, StoredTensor], dict | None]:
    """The tensors of the safetensors file ``path`` (opened read-only as ``fd`` by the
    caller, who closes it) and its ``__metadata__``. ``ValueError`` when the package
    refuses the file or a dtype has no portable name.

    The package checks the very file behind ``fd`` (through ``/proc/self/fd`` where
    that exists, else by ``path`` after making sure it is still the same file), so
    the offsets read here are the ones it validated."""
    import safetensors

    checked = f"/proc/self/fd/{fd}"
    if not os.path.exists(checked):
        checked = path
        here, there = os.stat(path), os.fstat(fd)
        if (here.st_dev, here.st_ino) != (there.st_dev, there.st_ino):
            raise ValueError("the file was replaced while it was being opened")
    try:
        with safetensors.safe_open(checked, framework="np") as f:
            metadata = f.metadata()
            names = list(f.keys())
    except (safetensors.SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"not a readable safetensors file ({exc})") from None
    # The package validated the header; its offsets are not exposed, so read them here.
    try:
        (length,) = _HEADER_LENGTH.unpack(os.pread(fd, _HEADER_LENGTH.size, 0))
        if length > os.fstat(fd).st_size:
            raise ValueError("header longer than the file")
        header = load_json(os.pread(fd, length, _HEADER_LENGTH.size), "the header")
        data_start = _HEADER_LENGTH.size + length
        entries = {name: (header[name]["dtype"], tuple(header[name]["shape"]),
                          *header[name]["data_offsets"]) for name in names}
    except (struct.error, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"the file changed after it was checked ({type(exc).__name__})") from None
    tensors = {}
    for name, (code, shape, begin, end) in entries.items():
        dtype = SAFETENSORS_DTYPES.get(code)
        if dtype is None:
            raise ValueError(f"tensor {name!r} has safetensors dtype {code}, which gpucrypt "
                             f"cannot store (supported: {', '.join(SAFETENSORS_DTYPES)})")
        tensors[name] = StoredTensor(dtype, shape, fd, data_start + begin, end - begin)
    return tensors, metadata


def safetensors_layout(tensors: list[tuple[str, str, tuple, int]], metadata: dict | None
                       ) -> tuple[bytes, dict[str, int]]:
    """For ``(name, dtype, shape, nbytes)`` entries: the bytes before the data (length and
    JSON header) and each tensor's offset in the file. ``ValueError`` for a dtype that
    safetensors cannot hold."""
    for name, dtype, _, _ in tensors:
        if dtype not in _CODES:
            raise ValueError(f"tensor {name!r} has dtype {dtype}, which safetensors cannot hold")
    ordered = sorted(tensors, key=lambda t: (-_ORDER.index(_CODES[t[1]]), t[0]))
    header: dict = {} if metadata is None else {"__metadata__": dict(metadata)}
    cursor = 0
    for name, dtype, shape, nbytes in ordered:
        header[name] = {"dtype": _CODES[dtype], "shape": list(shape),
                        "data_offsets": [cursor, cursor + nbytes]}
        cursor += nbytes
    text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    start = _HEADER_LENGTH.size + len(text)
    return (_HEADER_LENGTH.pack(len(text)) + text,
            {name: start + entry["data_offsets"][0] for name, entry in header.items()
             if name != "__metadata__"})
