"""Turning what users pass (bytes, bytearray, memoryview, NumPy arrays) into flat byte views.

Every public entry point goes through these functions, so the rules are the same
everywhere: any C-contiguous buffer is accepted as *data* and read as its raw bytes
(a float32 array of 4 elements is 16 bytes of data), and any empty one as empty;
anything else non-contiguous is refused (:class:`NonContiguousBuffer`) rather than
silently copied in some other order. Keys and nonces of the drop-in classes follow
``cryptography``'s stricter rule (bytes only: ``bytes_arg(..., uint8_only=True)``).
"""
from __future__ import annotations

import re
import sys
from typing import Any


class NonContiguousBuffer(ValueError, BufferError):
    """A buffer whose bytes are not one C-contiguous block.

    ``cryptography`` raises ``BufferError`` for these; gpucrypt raised ``ValueError``
    before this class existed. It is both, so that code written against either keeps
    catching it."""


def _non_contiguous(name: str) -> NonContiguousBuffer:
    return NonContiguousBuffer(f"{name} must be a C-contiguous buffer; make a contiguous copy "
                               f"first (for NumPy: numpy.ascontiguousarray(x))")


#: a struct format's field names (``T{<i:Offset:}``): text, not item codes
_FIELD_NAMES = re.compile(r":[^:]*:")


def _holds_objects(fmt: str) -> bool:
    """Whether a buffer format has Python object items ("O"): their bytes are pointers,
    which would leak addresses into a ciphertext, and writing into them crashes Python."""
    return "O" in fmt and "O" in _FIELD_NAMES.sub("", fmt)


def _view(data: Any, name: str) -> memoryview:
    """``memoryview(data)``, with ``cryptography``'s TypeError for what is not a buffer of
    bytes: no buffer protocol, a released view or closed mmap (ValueError from Python),
    or Python objects (a NumPy array of dtype object)."""
    try:
        view = memoryview(data)
    except TypeError:
        raise TypeError(f"{name} must be bytes-like (bytes, bytearray, memoryview or a "
                        f"C-contiguous NumPy array), not {type(data).__name__}") from None
    except ValueError as exc:  # a released memoryview, a closed mmap
        raise TypeError(f"{name} cannot be read: {exc}") from None
    if _holds_objects(view.format):
        raise TypeError(f"{name} holds Python objects (buffer format {view.format!r}), not "
                        f"bytes: encrypt their serialised form (pickle, np.save) instead")
    return view


def readable(data: Any, name: str = "data") -> memoryview:
    """A flat, read-only ``uint8`` view of ``data`` without copying.

    Raises ``TypeError`` for objects without the buffer protocol (as ``cryptography``
    does), for released views and for buffers of Python objects, and
    :class:`NonContiguousBuffer` (a ``ValueError`` and a ``BufferError``) for
    non-contiguous buffers that hold any bytes (an empty one is empty data).
    """
    if isinstance(data, (bytes, bytearray)):
        return memoryview(data)
    view = _view(data, name)
    if not view.c_contiguous or view.format != "B" or view.ndim != 1:
        if not view.nbytes:
            # empty: no bytes whose order could be wrong, so taken as b"" even where
            # CPython calls it non-contiguous (memoryview(bytearray(4))[4::2]), as
            # cryptography takes it; and cast() refuses a shape with a zero, e.g. (0, 4)
            return memoryview(b"" if view.readonly else bytearray())
        if not view.c_contiguous:
            raise _non_contiguous(name)
        view = view.cast("B")
    return view


def writable(buf: Any, name: str = "buf") -> memoryview:
    """A flat, writable ``uint8`` view of ``buf`` without copying."""
    view = readable(buf, name)
    if view.readonly:
        raise TypeError(f"{name} must be a writable buffer (bytearray, writable memoryview, "
                        f"NumPy array), not read-only {type(buf).__name__}")
    return view


def optional_readable(data: Any, name: str) -> memoryview:
    """Like :func:`readable`, with ``None`` meaning empty (how ``cryptography`` treats AAD)."""
    return memoryview(b"") if data is None else readable(data, name)


#: buffer formats ``cryptography`` reads as bytes (NumPy's uint8 is "B")
_BYTE_FORMATS = ("B", "c")


def bytes_arg(value: Any, name: str, *, uint8_only: bool = False) -> bytes:
    """A bytes-like argument (key, nonce, ...) as ``bytes``; ``TypeError`` naming it otherwise.

    ``uint8_only``: refuse buffers of wider items (a float32 array, an ``'I'``
    memoryview) with ``TypeError``, as ``cryptography`` does for keys and nonces; the
    drop-in classes ask for it, so that a key that ``cryptography`` refuses is not taken
    as its raw bytes here.

    ``bytes`` itself comes back as the very object (immutable: nothing to copy), so that a
    key passed again is the same object, which per-key caches recognise (see
    :class:`gpucrypt.backends.cpu.ContextCache`); anything else is copied."""
    if type(value) is bytes:
        return value
    view = _view(value, name)
    if uint8_only and view.format not in _BYTE_FORMATS:
        raise TypeError(f"{name} must be bytes (bytes, bytearray or a uint8 array), not a buffer "
                        f"of {view.format!r} items; pass its bytes (for NumPy: x.view(numpy.uint8))")
    if not view.c_contiguous and view.nbytes:  # bytes() would copy it in order; readable()
        raise _non_contiguous(name)  # refuses it too, and takes an empty one as b"" as here
    return bytes(view)


_from_buffer: Any = None  # ctypes.c_char.from_buffer and ctypes.addressof, once loaded
_addressof: Any = None


def _writable_address(view: Any) -> int:
    """The address of a writable, C-contiguous, non-empty buffer through ctypes (0.16 us);
    ``TypeError``/``ValueError`` for any other buffer."""
    global _from_buffer, _addressof
    if _addressof is None:  # set last: another thread sees both or loads them again
        import ctypes

        _from_buffer, _addressof = ctypes.c_char.from_buffer, ctypes.addressof
    return _addressof(_from_buffer(view))


def address(view: Any) -> int:
    """The address of the first byte of a non-empty C-contiguous buffer or of any NumPy
    array: through ctypes for a writable contiguous one (0.2 us), else through NumPy's
    array interface (1 us: it builds a dict)."""
    try:
        return _writable_address(view)
    except (TypeError, ValueError):  # read-only, or an array that is not contiguous
        import numpy as np  # a core dependency; loaded here only for views whose memory may be shared

        array = view if isinstance(view, np.ndarray) else np.frombuffer(view, dtype=np.uint8)
        return array.__array_interface__["data"][0]


def inexact_overlap(data: Any, buf: Any) -> bool:
    """Whether an input and an output buffer share memory without starting at the same
    address. Exactly in place (the same start: ``buf[:-16]`` into ``buf``) is not
    inexact. One-shot primitives read and write front to back at their own pace
    (libsodium, OpenSSL's ChaCha20-Poly1305, the GPU's blocks in any order), so any
    other overlap gives bytes that depend on the path, with a valid tag over them; the
    public classes refuse it, as Go's ``crypto/cipher`` does.

    False for anything that is not a usable buffer (the argument checks say why). The
    common cases are cheap, since this runs before every ``_into`` call: ``bytes`` is
    immutable (no writable view aliases it), two bytearrays (or views of two) or two
    owning NumPy arrays have memory of their own (about 70 ns for two arrays, measured
    on the Intel Xeon here); arrays that may share memory, and views of one object, are
    compared by address (an in-place call of slices: 0.6-0.8 us, :func:`_writable_spans`)."""
    t = type(data)
    if t is _ndarray and type(buf) is t:  # first: what benchmarks and array code pass
        base = data.base
        if base is None:
            if buf.base is None:
                return False  # owners of distinct memory (or the very same array: in place)
        elif type(base) is bytes:
            return False  # data in a bytes object (immutable: no writable view aliases it)
        spans = _writable_spans(data, buf)  # an in-place call: its views of one array
        if spans is not None:
            return spans
        if not _numpy.may_share_memory(data, buf):  # exact for the contiguous arrays we take
            return False
        return address(data) != address(buf)
    if t is bytes:
        return False
    tb = type(buf)
    if t is memoryview or tb is memoryview:  # views (slices) of what they were made from
        try:
            owner = data.obj if t is memoryview else data
            buf_owner = buf.obj if tb is memoryview else buf
        except ValueError:  # a released view: the argument checks say so (TypeError)
            return False
        if type(owner) is bytes or (owner is not buf_owner and type(owner) is bytearray
                                    and type(buf_owner) is bytearray):
            return False  # immutable, or two bytearrays: distinct memory
        spans = _writable_spans(data, buf)  # slices of one buffer: an in-place call, say
        if spans is not None:
            return spans
    elif t is tb:
        if t is bytearray:
            return False  # distinct memory, or the very same object (in place)
        if _ndarray is None and _imported_numpy() is not None and t is _ndarray:
            return inexact_overlap(data, buf)  # the first array seen: the test at the top
    try:
        a, b = readable(data), readable(buf)
    except (TypeError, ValueError):
        return False
    if not len(a) or not len(b):
        return False
    start_a, start_b = address(a), address(b)
    return start_a != start_b and start_a < start_b + len(b) and start_b < start_a + len(a)


def _writable_spans(data: Any, buf: Any) -> bool | None:
    """:func:`inexact_overlap` of two writable, contiguous, non-empty buffers, from their
    addresses through ctypes (0.16 us each: an in-place call of slices of one buffer cost
    1.1-1.4 us of checks before), or None when either is not such a buffer (a read-only
    or non-contiguous view, an empty one: the general test decides)."""
    try:
        start_a, start_b = _writable_address(data), _writable_address(buf)
    except (TypeError, ValueError):
        return None
    end_a, end_b = start_a + _nbytes(data), start_b + _nbytes(buf)
    return start_a != start_b and start_a < end_b and start_b < end_a


def _nbytes(x: Any) -> int:
    """Bytes of a buffer: an attribute of arrays and views, a view's for the others."""
    t = type(x)
    if t is memoryview or t is _ndarray:
        return x.nbytes
    return len(x) if t is bytearray else memoryview(x).nbytes


def plain_bytes(x: Any, writable: bool = False) -> bool:
    """Whether OpenSSL's own argument handling reads ``x`` as exactly the bytes we mean:
    bytes/bytearray, or a flat C-contiguous uint8 NumPy array (what benchmarks and
    array users pass). Anything else takes the general path.

    NumPy is looked up, never imported: if nothing imported it, ``x`` is no array."""
    t = type(x)
    if t is bytearray or (t is bytes and not writable):
        return True
    np = _numpy
    if np is None:
        np = _imported_numpy()
        if np is None:
            return False
    return t is np.ndarray and x.dtype == np.uint8 and x.ndim == 1 and x.flags.c_contiguous \
        and (not writable or x.flags.writeable)


_numpy: Any = None  # the numpy module, once something has imported it
_ndarray: Any = None  # and its ndarray type (one global lookup where it is tested per call)


def _imported_numpy() -> Any:
    """NumPy if it is imported (remembered from then on), else None."""
    global _numpy, _ndarray
    _numpy = sys.modules.get("numpy")
    _ndarray = None if _numpy is None else _numpy.ndarray
    return _numpy


_ZERO_PIECE = 1 << 30


def zero(view: memoryview) -> None:
    """Overwrite a flat byte view with zeros (in 1 GiB pieces: no 4 GiB temporary), so
    that no unauthenticated plaintext stays in it."""
    for start in range(0, len(view), _ZERO_PIECE):
        end = min(start + _ZERO_PIECE, len(view))
        view[start:end] = bytes(end - start)


def new_bytes(size: int) -> tuple[bytes, memoryview]:
    """A new ``bytes`` of ``size`` bytes and a writable view of its memory, to be filled
    before the object is used in any other way: an output written once, with neither
    the zeroing of a ``bytearray`` nor the copy of ``bytes(bytearray)``.

    CPython's C API allows exactly this (``PyBytes_FromStringAndSize(NULL, size)`` leaves
    the contents uninitialised, to be written before the object is shared). Elsewhere,
    or if ctypes is missing, a ``bytearray`` stands in (one zeroing pass more); callers
    return the first element either way."""
    if size == 0:  # nothing to write: the empty bytes, and an empty view to write it through
        return b"", memoryview(bytearray())
    api = _bytes_api()
    if api is None:
        out = bytearray(size)
        return out, memoryview(out)  # type: ignore[return-value]
    ctypes, make, address = api
    obj = make(None, size)
    return obj, memoryview((ctypes.c_char * size).from_address(address(obj))).cast("B")


_BYTES_API: list = []  # [(ctypes, PyBytes_FromStringAndSize, PyBytes_AsString) or None], once known


def _bytes_api():
    """ctypes' handles on the two C functions, made on first use (ctypes costs
    milliseconds to import, which a command line should not pay for nothing)."""
    if not _BYTES_API:
        try:
            import ctypes
        except ImportError:
            ctypes = None
        if ctypes is None or sys.implementation.name != "cpython":
            _BYTES_API.append(None)
        else:
            make = ctypes.pythonapi.PyBytes_FromStringAndSize
            make.restype, make.argtypes = ctypes.py_object, (ctypes.c_char_p, ctypes.c_ssize_t)
            address = ctypes.pythonapi.PyBytes_AsString
            address.restype, address.argtypes = ctypes.c_void_p, (ctypes.py_object,)
            _BYTES_API.append((ctypes, make, address))
    return _BYTES_API[0]
