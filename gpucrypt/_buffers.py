"""Turning what users pass (bytes, bytearray, memoryview, NumPy arrays) into flat byte views.

Every public entry point goes through these two functions, so the rules are the
same everywhere: any C-contiguous buffer is accepted and read as its raw bytes
(a float32 array of 4 elements is 16 bytes of data); anything non-contiguous is
refused rather than silently copied in some other order.
"""
from __future__ import annotations

import sys
from typing import Any


def readable(data: Any, name: str = "data") -> memoryview:
    """A flat, read-only ``uint8`` view of ``data`` without copying.

    Raises ``TypeError`` for objects without the buffer protocol (as ``cryptography``
    does) and ``ValueError`` for non-contiguous buffers.
    """
    if isinstance(data, (bytes, bytearray)):
        return memoryview(data)
    try:
        view = memoryview(data)
    except TypeError:
        raise TypeError(f"{name} must be bytes-like (bytes, bytearray, memoryview or a "
                        f"C-contiguous NumPy array), not {type(data).__name__}") from None
    if not view.c_contiguous:
        raise ValueError(f"{name} must be a C-contiguous buffer; make a contiguous copy first "
                         f"(for NumPy: numpy.ascontiguousarray(x))")
    if view.format != "B" or view.ndim != 1:
        if not view.nbytes:  # cast() refuses a shape with a zero in it, e.g. (0, 4)
            return memoryview(b"" if view.readonly else bytearray())
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


def bytes_arg(value: Any, name: str) -> bytes:
    """A bytes-like argument (key, nonce, ...) as ``bytes``; ``TypeError`` naming it otherwise.

    ``bytes`` itself comes back as the very object (immutable: nothing to copy), so that a
    key passed again is the same object, which per-key caches recognise (see
    :class:`gpucrypt.backends.cpu.ContextCache`); anything else is copied."""
    if type(value) is bytes:
        return value
    try:
        view = memoryview(value)
    except TypeError:
        raise TypeError(f"{name} must be bytes-like, not {type(value).__name__}") from None
    if not view.c_contiguous:  # bytes() would copy it in order; readable() refuses it too
        raise ValueError(f"{name} must be a C-contiguous buffer; make a contiguous copy first "
                         f"(for NumPy: numpy.ascontiguousarray(x))")
    return bytes(view)


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


def _imported_numpy() -> Any:
    """NumPy if it is imported (remembered from then on), else None."""
    global _numpy
    _numpy = sys.modules.get("numpy")
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
