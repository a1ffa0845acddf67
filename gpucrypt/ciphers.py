"""Raw stream ciphers, drop-ins for ``cryptography``'s ``Cipher(...).encryptor()`` use.

    # Cipher(algorithms.ChaCha20(key, nonce16), None).encryptor()
    enc = gpucrypt.ciphers.ChaCha20(key, nonce16, device="auto").encryptor()
    # Cipher(algorithms.AES(key), modes.CTR(nonce16)).encryptor()
    enc = gpucrypt.ciphers.AESCTR(key, nonce16).encryptor()
    out = enc.update(data); n = enc.update_into(data, buf); enc.finalize()
    enc.reset_nonce(other_nonce16)  # as cryptography's: the keystream of another nonce, from its start

The contexts behave as if all ``update`` calls had been one call over the
concatenated data, byte-identical to ``cryptography`` however the data is cut.
There is no authentication here: use the AEAD classes unless you add your own MAC.

Arguments follow ``cryptography``, in its order (types, then sizes), with one rule
of gpucrypt's for data, the same on every device and path: ``update``/``update_into``
take any C-contiguous buffer and read it as its raw bytes (a float32 array of 4
elements is 16 bytes), as the AEAD classes do, where ``cryptography`` takes byte
buffers only (``TypeError``). Keys and nonces must be bytes, as in ``cryptography``.
A non-contiguous buffer raises :class:`gpucrypt._buffers.NonContiguousBuffer` (a
``BufferError``, as in ``cryptography``, and a ``ValueError``).

``update_into(data, buf)`` may work in place (``data`` and ``buf`` the same memory
from the same start) or between separate buffers; any other overlap (the same memory
from different starts, e.g. ``update_into(view[0:n], view[1:n + 1])``) is ``ValueError``
on every device, before a byte is written or the keystream moves: OpenSSL reads and
writes front to back, the GPU copies all of ``data`` first, so the bytes would depend
on the device (refused as in Go's ``crypto/cipher`` and gpucrypt's AEAD classes;
``cryptography`` takes it, with OpenSSL's result).

ChaCha20's 16-byte ``nonce`` is ``cryptography``'s: a little-endian 32-bit block
counter, then the 96-bit nonce (RFC 8439). As in ``cryptography``, encrypting past
block 2**32 - 1 raises ``ValueError`` before any byte is produced, since the
keystream would repeat. AES-CTR's ``nonce`` is the initial 128-bit counter block,
incremented as one big-endian 128-bit integer (SP 800-38A).

Errors come in one order on every device: the arguments' types (``TypeError``,
``BufferError``), then a finalized context (``AlreadyFinalized``), then
``update_into``'s buffer size, then an inexact overlap, then ChaCha20's counter
overflow (all three ``ValueError``). A refused call writes nothing and uses up
nothing: neither keystream nor any of ChaCha20's allowance before the counter
overflows. ``cryptography`` 50 differs near the end of ChaCha20's counter only, in
two ways that gpucrypt does not copy: it checks the overflow first (``ValueError``
for a call past the end on a finalized context, or with a too-short buffer, where
gpucrypt says ``AlreadyFinalized`` or gives the buffer size), and an ``update_into``
refused for its buffer's size still counts its bytes against the allowance, so that
a later call within the remaining keystream is refused as an overflow.

A key or nonce other than ``bytes`` (a bytearray, a NumPy array) is read again at each
``encryptor()``/``decryptor()``, as ``cryptography`` reads the objects its ``Cipher``
keeps: a nonce updated in place before each message gives each message its own
keystream, and a context already made keeps the key and nonce it was made with.
``bytes`` cannot change and is read once.

Other deliberate differences from ``cryptography`` 50:

- ``ChaCha20``/``AESCTR`` objects refuse pickle and copy (``TypeError``), as their
  contexts and ``cryptography``'s contexts do. ``cryptography``'s ``Cipher`` and
  algorithm objects pickle and copy, key included; here a pickle would carry the key in
  the clear into wherever pickles go (worker processes, caches, logs).
- A key or nonce changed in place to a size it may not have raises, at
  ``encryptor()``, the ``ValueError`` that construction gives for that size.
  ``cryptography`` raises ``InternalError``, ``UnsupportedAlgorithm`` or pyo3's
  ``PanicException`` (a ``BaseException``, which ``except Exception`` does not catch)
  there, and takes the first 16 bytes of a longer CTR nonce.
- With both the key and the nonce wrong, the error reported can be the other one.
  gpucrypt checks everything at construction: the key's type and size, the nonce's,
  then the key's buffer, then the nonce's. ``cryptography`` checks the types and sizes
  at construction too, but reads the buffers at ``encryptor()``, the nonce's first: a
  wide-item key (``TypeError`` here) with a non-contiguous nonce is ``BufferError``
  there, and the other way round.
"""
from __future__ import annotations

import struct
from typing import Any

from cryptography.exceptions import AlreadyFinalized

from . import _limits
from ._buffers import bytes_arg, inexact_overlap, plain_bytes, readable, writable
from .backends import (AUTO_GPU_THRESHOLD, check_device, every_payload_on_cpu, get_backend,
                       select_backend, small_payloads_on_cpu)

__all__ = ["ChaCha20", "AESCTR"]

_CHACHA20_OVERFLOW = _limits.CHACHA20_OVERFLOW


def _cpu_backend():
    return get_backend("cpu")


def _in_place_stream(context: Any, windows: bool) -> Any:
    """The CPU backend's ``in_place_stream`` (cryptography 51 on refuses an ``update_into``
    in place, which this module's contexts take; ``windows`` False: only cryptography
    knows where their keystream is, so an in-place call is one call), looked up once, as
    below."""
    global _in_place_stream
    from .backends.cpu import in_place_stream as _in_place_stream

    return _in_place_stream(context, windows)


def _keystream_cipher(algorithm: str, key: bytes, nonce: bytes) -> Any:
    """The CPU backend's ``keystream_cipher`` (cryptography's Cipher), looked up once: a
    message with a cipher of its own (a nonce per message, as cryptography's Cipher is
    used) paid the backend's lookup each time."""
    global _keystream_cipher
    _keystream_cipher = _cpu_backend().keystream_cipher
    return _keystream_cipher(algorithm, key, nonce)


class _Unpicklable:
    """Refuses pickle and copy: a pickle would carry the key in the clear, and a copied
    context would continue the same keystream from the same position (two ciphertexts
    under one keystream). cryptography refuses both for its contexts only; its Cipher
    and algorithm objects pickle and copy (a deliberate difference, in the module's
    docstring)."""

    __slots__ = ()

    def __reduce__(self):
        raise TypeError(f"cannot pickle or copy {type(self).__name__!r} object: it holds a key "
                        f"(and a keystream position); make a new one where it is needed")


class _StreamCipher(_Unpicklable):
    _algorithm = ""

    def __init__(self, key: Any, nonce: Any, *, device: str = "auto"):
        self._key, self._nonce = self._read(key, nonce)
        # cryptography keeps the caller's key and nonce objects and reads them at each
        # encryptor(): code that updates a bytearray nonce between messages gets a new
        # keystream per message there, and must here too (not the first nonce's again: a
        # two-time pad). bytes cannot change, so bytes arguments are never read again.
        self._given = None if type(key) is bytes and type(nonce) is bytes else (key, nonce)
        if self._given is not None:  # read again at each encryptor(): no copy kept of a key
            self._key = self._nonce = None  # its owner may have overwritten since
        # every size on the CPU (asked for, or "auto" on a machine without a CUDA driver):
        # then contexts are cryptography's own, wrapped as thinly as Python allows
        if device == "cpu":  # the common explicit case, decided without the three calls
            self._device = device
            self._small_on_cpu = self._all_on_cpu = True
        else:
            self._device = device = check_device(device)
            self._small_on_cpu = small_payloads_on_cpu(device)  # as in the AEAD classes
            self._all_on_cpu = self._small_on_cpu and every_payload_on_cpu(device)
        self._openssl = None  # cryptography's Cipher for bytes arguments, made on first use

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={self._device!r})"

    def _read(self, key: Any, nonce: Any) -> tuple[bytes, bytes]:
        """The bytes of ``key`` and ``nonce`` as they are now, checked in cryptography's
        order: each argument is bytes-like, then its size as len() counts it (a 2-D array
        by its rows), and only then is its memory read, as bytes only."""
        tk, tn = type(key), type(nonce)
        if tk is bytes and tn is bytes:  # the usual arguments: their len() is their size
            self._check_key(len(key))
            self._check_nonce(len(nonce))
            return key, nonce
        if tk is bytearray and tn is bytearray:  # what a caller updates in place, read
            self._check_key(len(key))  # again at each encryptor(): its len() is its size,
            self._check_nonce(len(nonce))  # its memory one block of bytes
            return bytes(key), bytes(nonce)
        key_view, nonce_view = _view_of(key, "key"), _view_of(nonce, "nonce")
        self._check_key(len(key_view))
        self._check_nonce(len(nonce_view))
        # the views, made once (a NumPy array's view is the costly part of reading it again)
        key_bytes = bytes_arg(key if tk is bytes else key_view, "key", uint8_only=True)
        nonce_bytes = bytes_arg(nonce if tn is bytes else nonce_view, "nonce", uint8_only=True)
        self._check_key(len(key_bytes))  # a (32, 2) array has 32 rows and 64 bytes
        self._check_nonce(len(nonce_bytes))
        return key_bytes, nonce_bytes

    def _check_key(self, size: int) -> None:
        raise NotImplementedError

    def _check_nonce(self, size: int) -> None:
        raise NotImplementedError

    def _max_position(self, nonce: bytes) -> int | None:
        """Keystream bytes available from ``nonce``, or None when unbounded in practice."""
        return None

    def encryptor(self) -> "StreamContext | _OpenSslStreamContext":
        if self._given is not None:  # a bytearray, an array: what it holds now
            return self._context_of(*self._read(*self._given))
        if self._all_on_cpu:
            openssl = self._openssl
            if openssl is None:
                openssl = self._openssl = _keystream_cipher(self._algorithm, self._key,
                                                            self._nonce)
            return _OpenSslStreamContext(_in_place_stream(openssl.encryptor(), False))
        return StreamContext(self, self._key, self._nonce)

    # XOR is its own inverse: decryption is the same keystream.
    decryptor = encryptor

    def _context_of(self, key: bytes, nonce: bytes) -> "StreamContext | _OpenSslStreamContext":
        """``encryptor()`` for arguments read again: cryptography's Cipher made for them
        each time, as cryptography's own encryptor() does, and kept by the context only
        (a Cipher kept here would keep a key its owner has since overwritten)."""
        if not self._all_on_cpu:
            return StreamContext(self, key, nonce)
        return _OpenSslStreamContext(_in_place_stream(
            _keystream_cipher(self._algorithm, key, nonce).encryptor(), False))


class ChaCha20(_StreamCipher):
    """ChaCha20 (RFC 8439) with ``cryptography``'s 16-byte counter || nonce."""

    _algorithm = "chacha20"

    def _check_key(self, size):
        if size != 32:
            raise ValueError(f"Invalid key size ({size * 8}) for ChaCha20.")

    def _check_nonce(self, size):
        if size != 16:
            raise ValueError("nonce must be 128-bits (16 bytes)")

    def _max_position(self, nonce):
        first_block = struct.unpack("<I", nonce[:4])[0]
        return _limits.CHACHA20_KEYSTREAM_BYTES - first_block * 64


class AESCTR(_StreamCipher):
    """AES in counter mode (SP 800-38A): 16/24/32-byte key, 16-byte initial counter block."""

    _algorithm = "aes-ctr"

    def _check_key(self, size):
        if size == 64:  # AES takes it (for XTS), then CTR refuses it: cryptography's words
            raise ValueError("Only 128, 192, and 256 bit keys are allowed for this AES mode")
        if size not in (16, 24, 32):
            raise ValueError(f"Invalid key size ({size * 8}) for AES.")

    def _check_nonce(self, size):
        if size != 16:
            raise ValueError(f"Invalid nonce size ({size}) for CTR.")


def _view_of(value: Any, name: str) -> memoryview:
    """``memoryview(value)`` of a bytes-like argument, whose ``len()`` is its size as
    ``cryptography`` measures keys and nonces (a NumPy array's first dimension);
    ``TypeError`` for anything else, a released view or a closed mmap included (as
    cryptography says of them; a key or nonce re-read at ``encryptor()`` can be one)."""
    try:
        return memoryview(value)
    except TypeError:
        raise TypeError(f"{name} must be bytes-like, not {type(value).__name__}") from None
    except ValueError as exc:
        raise TypeError(f"{name} cannot be read: {exc}") from None


def _both_readable(data: Any, buf: Any) -> bool:
    """Whether neither buffer is released or closed (a ValueError was ChaCha20's, then)."""
    try:
        memoryview(data), memoryview(buf)
    except ValueError:
        return False
    except TypeError:
        return True
    return True


_RESET_NONCE_SIZE = "Nonce must be 16 bytes long"  # cryptography's words, for both ciphers
_ALREADY_FINALIZED = "Context was already finalized."  # and these


def _check_into(data: Any, buf: Any, src: memoryview, out: memoryview) -> None:
    """``update_into``'s checks after the types and a finalized context, in the order of
    the module's rule: the buffer's size, then an inexact overlap."""
    if len(out) < len(src):
        raise ValueError(f"buffer must be at least {len(src)} bytes for this payload")
    if inexact_overlap(data, buf):
        raise ValueError("buf overlaps data without starting at the same address: the result "
                         "would depend on the order in which bytes are read and written (and "
                         "so on the device). Pass a separate buffer, or encrypt in place "
                         "(data is buf[:len(data)])")


class _OpenSslStreamContext(_Unpicklable):
    """The context of a cipher whose every call runs on the CPU: ``cryptography``'s own
    (so the bytes, the counter-overflow refusal and the error messages are OpenSSL's and
    ``cryptography``'s by construction), with as little wrapper work on the way in or
    out as the module's rules allow: an allocating ``update`` costs what
    ``cryptography``'s does (one result buffer, no zeroing, no copy). A call that
    ``cryptography`` refuses comes back through gpucrypt's argument checks: a buffer
    that gpucrypt reads as bytes and ``cryptography`` does not (wider items) is passed
    again as its byte view, as :class:`StreamContext` reads it; anything else gets a
    message saying what to pass. ``cryptography`` converts every argument before it
    does any work, so a call refused for a type consumed nothing.

    Two of ``cryptography``'s checks come in another order than the module's rule
    (ChaCha20's counter overflow before a finalized context and before the buffer's
    size, and the size only after the bytes were counted against the overflow), so
    ``update_into`` checks the size and an overlap before OpenSSL sees the call, and
    an overflow on a finalized context is reported as ``AlreadyFinalized``."""

    __slots__ = ("_openssl", "_finalized")

    def __init__(self, openssl: Any):
        self._openssl = openssl
        self._finalized = False

    def update(self, data: Any) -> bytes:
        try:
            return self._openssl.update(data)
        except (TypeError, BufferError):
            pass
        except ValueError:  # ChaCha20's counter overflow, which cryptography checks first
            self._ensure_open()
            raise
        src = readable(data, "data")
        self._ensure_open()
        return self._openssl.update(src)

    def update_into(self, data: Any, buf: Any) -> int:
        t = type(data)
        try:
            # OpenSSL takes the call as it is only where it cannot be refused after its
            # bytes were counted against ChaCha20's allowance: data flat (its len() its
            # size: 1-byte items, as cryptography takes them), buf long enough, no overlap
            # (bytes: immutable; two bytearrays: separate memory, or in place)
            # and buf flat too (a (64, 0) array's len() is 64, its size 0)
            if (t is bytes or (t is bytearray and type(buf) is bytearray)
                    or ((t is bytearray or getattr(data, "ndim", 0) == 1)
                        and not inexact_overlap(data, buf))) and len(data) <= len(buf) \
                    and getattr(buf, "ndim", 1) == 1:
                return self._openssl.update_into(data, buf)
        except (TypeError, BufferError):  # no len(), or items OpenSSL does not take: below
            pass
        except ValueError:
            # the counter overflow (the size and overlap are checked), unless a buffer
            # cannot be read at all (a released view, a closed mmap: ValueError from
            # len()), which the checks below give as the TypeError cryptography gives
            if _both_readable(data, buf):
                self._ensure_open()
                raise
        src, out = readable(data, "data"), writable(buf, "buf")
        self._ensure_open()
        _check_into(data, buf, src, out)
        return self._openssl.update_into(src, out)

    def reset_nonce(self, nonce: Any) -> None:
        """As ``cryptography``'s: go on with the keystream of ``nonce`` from its start."""
        try:
            self._openssl.reset_nonce(nonce)
        except (TypeError, BufferError):
            bytes_arg(nonce, "nonce", uint8_only=True)  # gpucrypt's message, same kind
            raise

    def finalize(self) -> bytes:
        result = self._openssl.finalize()
        self._finalized = True
        return result

    def _ensure_open(self) -> None:
        if self._finalized:
            raise AlreadyFinalized(_ALREADY_FINALIZED)


class StreamContext(_Unpicklable):
    """An encryption (or decryption) in progress; ``update`` calls continue the keystream."""

    def __init__(self, cipher: _StreamCipher, key: bytes, nonce: bytes):
        self._cipher = cipher
        # the key as encryptor() read it: a later encryptor() of the cipher may read another
        # (a bytearray changed meanwhile), which this context must not switch to, as an
        # OpenSSL context keeps the key it was made with
        self._key = key
        self._finalized = False
        self._start(nonce)

    def _start(self, nonce: bytes) -> None:
        """Keystream byte 0 of ``nonce`` is next (the context's own: ``reset_nonce``
        changes it, not the cipher's)."""
        cipher = self._cipher
        self._nonce = nonce
        self._position = 0
        self._limit = cipher._max_position(nonce)  # keystream bytes this nonce allows, or None
        self._cpu = None          # a positioned cryptography encryptor, reused across calls
        self._cpu_position = -1
        if cipher._small_on_cpu:  # small updates will run on the CPU: be ready for the first
            self._cpu = _cpu_backend().keystream_encryptor(cipher._algorithm, self._key, nonce, 0)
            self._cpu_position = 0

    def reset_nonce(self, nonce: Any) -> None:
        """As ``cryptography``'s ``reset_nonce`` (ChaCha20 and CTR): the next ``update``
        continues with the keystream of ``nonce`` from its start (ChaCha20: from the
        block counter in its first 4 bytes), whatever was used of the old one. Errors in
        ``cryptography``'s order: the argument's type, then a finalized context, then
        its length."""
        nonce = bytes_arg(nonce, "nonce", uint8_only=True)
        self._ensure_open()
        if len(nonce) != 16:
            raise ValueError(_RESET_NONCE_SIZE)
        self._start(nonce)

    def update(self, data: Any) -> bytes:
        src = readable(data, "data")
        backend = self._backend_for(len(src))
        if backend is None:
            return b""
        if backend.name == "cpu":  # cryptography allocates the result: no zeroing, no copy
            out = self._cpu_encryptor(backend).update(src)
            self._position += len(src)
            self._cpu_position = self._position
            return out
        out = bytearray(len(src))
        backend.xor_keystream(self._cipher._algorithm, self._key, self._nonce,
                              self._position, src, memoryview(out))
        self._position += len(src)
        return bytes(out)

    def update_into(self, data: Any, buf: Any) -> int:
        """Write the next ``len(data)`` bytes into the start of ``buf``, in place (the same
        start) or between separate buffers (any other overlap: ``ValueError``)."""
        cpu = self._cpu
        if cpu is not None and self._cpu_position == self._position and plain_bytes(data) \
                and plain_bytes(buf, writable=True) and len(data) <= len(buf) \
                and len(data) < AUTO_GPU_THRESHOLD \
                and (self._limit is None or self._position + len(data) <= self._limit) \
                and not self._finalized and not inexact_overlap(data, buf):
            # the common case of a CPU stream in progress: OpenSSL reads these buffers as
            # they are, and cannot refuse them (it would count a refused call's bytes
            # against ChaCha20's allowance all the same)
            n = cpu.update_into(data, buf)
            self._position += n
            self._cpu_position = self._position
            return n
        src = readable(data, "data")
        out = writable(buf, "buf")
        self._ensure_open()  # the module's order: after the argument types, before the sizes
        _check_into(data, buf, src, out)
        self._xor(src, out[: len(src)])
        return len(src)

    def finalize(self) -> bytes:
        self._ensure_open()
        self._finalized = True
        self._cpu = None
        return b""

    def _ensure_open(self) -> None:
        if self._finalized:
            raise AlreadyFinalized(_ALREADY_FINALIZED)

    def _backend_for(self, nbytes: int):
        """Where the next ``nbytes`` of keystream are made (None for none), after the
        checks every update makes: not finalized, no counter overflow."""
        self._ensure_open()
        cipher = self._cipher
        limit = self._limit
        if limit is not None and self._position + nbytes > limit:
            raise ValueError(_CHACHA20_OVERFLOW)
        if not nbytes:
            return None
        if cipher._small_on_cpu and nbytes < AUTO_GPU_THRESHOLD:
            return _cpu_backend()
        return select_backend(cipher._device, nbytes)

    def _cpu_encryptor(self, backend):
        """cryptography's encryptor, positioned where this context is in the keystream."""
        if self._cpu is None or self._cpu_position != self._position:
            self._cpu = backend.keystream_encryptor(self._cipher._algorithm, self._key,
                                                    self._nonce, self._position)
        return self._cpu

    def _xor(self, src: memoryview, out: memoryview) -> None:
        backend = self._backend_for(len(src))
        if backend is None:
            return
        if backend.name == "cpu":
            self._cpu_encryptor(backend).update_into(src, out)
            self._cpu_position = self._position + len(src)
        else:
            cipher = self._cipher
            backend.xor_keystream(cipher._algorithm, self._key, self._nonce, self._position,
                                  src, out)
        self._position += len(src)
