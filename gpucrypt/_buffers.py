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
    """A copy of a bytes-like argument (key, nonce, ...); ``TypeError`` naming it otherwise."""
    try:
        return bytes(memoryview(value))
    except TypeError:
        raise TypeError(f"{name} must be bytes-like, not {type(value).__name__}") from None


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
