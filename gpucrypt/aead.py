"""Drop-in replacements for ``cryptography.hazmat.primitives.ciphers.aead``.

``gpucrypt.ChaCha20Poly1305``, ``gpucrypt.XChaCha20Poly1305`` and
``gpucrypt.AESGCM`` take the same arguments, return the same bytes and raise the
same exceptions as ``cryptography``'s classes (XChaCha20-Poly1305, which
``cryptography`` lacks, matches libsodium's ``crypto_aead_xchacha20poly1305_ietf``):
keys and nonces must be bytes (``TypeError`` for a float32 array, say), AES-GCM
nonces 8 to 128 bytes (``ValueError``), and a non-contiguous buffer raises
:class:`gpucrypt._buffers.NonContiguousBuffer`, a ``BufferError`` as in
``cryptography`` and a ``ValueError`` as gpucrypt raised before. What they add or
change:

- ``device="auto" | "cpu" | "gpu"`` chooses where the work runs
  (:mod:`gpucrypt.backends` holds the rules);
- any C-contiguous buffer is accepted as data, associated data and output, and read
  as raw bytes (NumPy arrays of any dtype included), where ``cryptography`` takes
  byte buffers only;
- messages beyond ``cryptography``'s 2**31 - 1 bytes, up to each algorithm's own limit;
- ``decrypt_into`` zeroes its buffer when the tag is wrong;
- ``encrypt_into``/``decrypt_into`` refuse (``ValueError``) an output that overlaps
  the input anywhere but exactly at its start (in place, ``buf[:len(data)]`` into
  ``buf``, is fine): other overlaps gave bytes that depend on the path (libsodium,
  OpenSSL or a GPU) and on the direction of the shift, ``cryptography``'s own
  ChaCha20Poly1305 included, under a valid tag.

This layer checks types, sizes and limits; the backends do the work.
"""
from __future__ import annotations

import operator
import os
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import aead as _openssl

from . import _limits
from ._buffers import (bytes_arg, inexact_overlap, new_bytes, optional_readable, plain_bytes, readable,
                       writable, zero)
from ._host_primitives import xchacha20_key_nonce
from ._interrupts import zero_surely
from .backends import AUTO_GPU_THRESHOLD, AeadContext, Backend, select_backend, small_payloads_on_cpu
from .backends import check_device, every_payload_on_cpu, get_backend

#: largest data or associated data cryptography's AEAD classes take in one call: the fast
#: path hands anything up to this straight to OpenSSL (cryptography itself refuses more,
#: with OverflowError, and the general path takes over)
_FAST_PATH_MAX = 2**31 - 1
#: what cryptography raises for arguments it will not take (types, buffer kinds, lengths,
#: nonce sizes): the general path then handles them, or raises gpucrypt's own error
_NOT_FOR_OPENSSL = (TypeError, ValueError, OverflowError, BufferError)
#: and, for the allocating decrypt, the MemoryError of its zeroed output for a ciphertext past
#: the algorithm's limit, allocated before the length is refused (OverflowError in _slow)
_NOT_FOR_OPENSSL_DECRYPT = _NOT_FOR_OPENSSL + (MemoryError,)
#: the longest ciphertext OpenSSL's one call takes (len() of a buffer of wider items
#: counts fewer: such a one over it still reaches the MemoryError above)
_ONE_CALL_CIPHERTEXT = (2**31 - 1) + _limits.TAG_SIZE
_MALFORMED_MESSAGE = "each message must be a (nonce, data, associated_data) tuple"


def _reraise_unless_too_long(exc: BaseException) -> None:
    """Re-raise ``exc`` unless it is the panic cryptography's decrypt forms end in for a
    ciphertext whose message exceeds OpenSSL's one call (2**31 - 1 bytes: they check only
    when encrypting, and rust-openssl's length conversion panics). The panic comes before
    any byte is read, in a per-call copy of the object's context, so the general path can
    take the call over (it composes such messages). Caught where raised, at no cost to
    the calls that return: checking each ciphertext's length first cost 8% of a 1 KiB
    decrypt. (Rust prints the panic on stderr all the same.)"""
    if type(exc).__name__ != "PanicException":
        raise exc


def _refused_in_place(exc: BaseException) -> bool:
    """Whether ``exc`` is cryptography's refusal (51 on) of an output that overlaps its
    input, for an exact in-place call (the only overlap the fast path hands it): raised
    after every other check of the arguments, so the call is otherwise one OpenSSL takes."""
    return type(exc) is ValueError and "overlap" in str(exc)


#: ``_slow``'s "no output buffer" (the allocating forms); None is a buffer argument to refuse
_ALLOCATE = object()

__all__ = ["ChaCha20Poly1305", "XChaCha20Poly1305", "AESGCM", "InvalidTag", "BatchInvalidTag"]


class BatchInvalidTag(InvalidTag):
    """Some messages of a ``decrypt_many`` batch failed authentication.

    ``failed`` lists their indices. No plaintext of the batch was returned.
    """

    def __init__(self, failed: list[int]):
        super().__init__(f"{len(failed)} message(s) failed authentication: indices {failed[:20]}"
                         + (" ..." if len(failed) > 20 else ""))
        self.failed = failed


# keys and nonces by cryptography's rule: byte buffers only (a float32 array is TypeError)
def _key_bytes(key: Any) -> bytes:
    return bytes_arg(key, "key", uint8_only=True)


def _nonce_bytes(nonce: Any) -> bytes:
    return nonce if isinstance(nonce, bytes) else bytes_arg(nonce, "nonce", uint8_only=True)


def _refuse_inexact_overlap(data: Any, buf: Any) -> None:
    if inexact_overlap(data, buf):
        raise ValueError("buf overlaps data without starting at the same address: the result "
                         "would depend on the order in which bytes are read and written. Pass "
                         "a separate buffer, or encrypt in place (data is buf[:len(data)], "
                         "decrypt: buf is data[:len(data) - 16])")


class _Aead:
    """What the three public classes share: argument rules, limits and dispatch."""

    _algorithm = ""          # backend algorithm name
    _display = ""            # the name in error messages
    _max_data = 0
    _max_aad = 0

    def __init__(self, key: Any, *, device: str = "auto"):
        self._key = _key_bytes(key)
        self._check_key(self._key)
        self._device = device = check_device(device)
        self._contexts: dict[int, AeadContext] = {}
        # Fails now, with the reason, if the device can't work. GPUCRYPT_DEVICE is read
        # here, once, for small messages (os.environ costs a microsecond per lookup).
        self._small_on_cpu = small_payloads_on_cpu(device)
        # every size on the CPU: asked for, or (auto) known now on a machine without a CUDA
        # driver, else learnt at the first large message
        self._all_on_cpu = self._small_on_cpu and every_payload_on_cpu(device)
        self._openssl = self._make_openssl(self._key)
        # XChaCha20's object depends on the nonce: it never goes direct
        self._direct = self._openssl if self._all_on_cpu and self._direct_ok else None
        # the same for a small bytes message of an object that runs large ones on a GPU
        # (device="auto" where a CUDA driver loads): _slow's choosing cost 0.3 us of a
        # 0.5 us call at 1 KiB (AES-GCM)
        self._small_direct = self._openssl if self._small_on_cpu and self._direct_ok else None

    # --- the CPU fast path -------------------------------------------------------------
    # On the CPU every call OpenSSL can take (up to 2**31 - 1 bytes, cryptography's nonce
    # sizes, any C-contiguous byte buffer) goes to cryptography's own method with the
    # caller's objects: no view, no zeroing, no copy, so gpucrypt costs what cryptography
    # does. What it refuses (longer messages, data of wider items, wrong types or lengths)
    # takes the general path below, which produces the same bytes or gpucrypt's own
    # error. So does everything that may run on a GPU, and an overlapping output.

    _direct_ok = True

    def _make_openssl(self, key: bytes):
        return None

    # ``_direct`` is cryptography's object when every call may go to it as it is (the
    # methods test it first: one attribute, the whole cost of the fast path); otherwise
    # ``_openssl_for`` decides per call.
    def _openssl_for(self, nonce: Any, data: Any, tag_len: int = 0) -> tuple:
        """(cryptography's AEAD object, its nonce) when this call may go straight to
        OpenSSL (it runs on the CPU), else (None, None). ``tag_len``: how much of ``data``
        is a tag (decryption), for choices made on the message's length."""
        openssl = self._openssl
        if openssl is None or not self._small_on_cpu or not self._on_cpu_for(data):
            return None, None
        return openssl, nonce

    def _on_cpu_for(self, data: Any) -> bool:
        """device="auto": small payloads run on the CPU; a large one asks where (once: if it
        is the CPU, this object has no GPU to go to and all its sizes run on the CPU)."""
        t = type(data)
        try:
            nbytes = len(data) if t is bytes or t is bytearray else readable(data).nbytes
        except (TypeError, ValueError):
            return True  # not a buffer we take: OpenSSL refuses it, the general path says why
        if nbytes < AUTO_GPU_THRESHOLD:
            return True
        if select_backend(self._device, nbytes).name != "cpu":
            return False
        self._all_on_cpu = True
        if self._direct_ok:
            self._direct = self._openssl
        return True

    def __repr__(self) -> str:  # never shows the key
        return f"{type(self).__name__}(device={self._device!r})"

    def __reduce__(self):
        # as cryptography's objects: a pickle (or copy) would carry the key in the clear
        raise TypeError(f"cannot pickle {type(self).__name__!r} object: it holds a key; "
                        f"pickle a reference to the key, and make the object where it is used")

    # --- hooks for the subclasses ---
    def _check_key(self, key: bytes) -> None:
        raise NotImplementedError

    def _check_nonce(self, nonce: bytes) -> None:
        raise NotImplementedError

    def _context_for(self, backend: Backend, nonce: bytes) -> tuple[AeadContext, bytes]:
        """(context, nonce) for one message on ``backend``."""
        return self._context(backend), nonce

    # --- dispatch ---
    def _context(self, backend: Backend) -> AeadContext:
        ctx = self._contexts.get(id(backend))
        if ctx is None:
            ctx = self._contexts[id(backend)] = backend.aead(self._algorithm, self._key)
        return ctx

    def _prepare(self, nonce, data, associated_data, plaintext_len):
        nonce = _nonce_bytes(nonce)
        self._check_nonce(nonce)
        aad = optional_readable(associated_data, "associated_data")
        _limits.check_length("data", plaintext_len, self._max_data, self._display)
        _limits.check_length("associated_data", len(aad), self._max_aad, self._display)
        backend = select_backend(self._device, len(data))
        ctx, nonce = self._context_for(backend, nonce)
        return ctx, nonce, aad

    # --- public API, as in cryptography ---
    # Each method is the fast path and nothing else: one attribute, cryptography's call;
    # every other case goes to ``_slow``, which decides where it runs. At 1 KiB
    # cryptography's AES-GCM call takes about 480 ns on an AVX-512 Xeon, and any Python
    # method in front of it costs 25-30 ns (a bare wrapper, measured), so each
    # instruction here shows in the ratio: this form costs about 38 ns, the earlier one,
    # with the per-call choice inline, 46 ns.
    def encrypt(self, nonce: Any, data: Any, associated_data: Any) -> bytes:
        """``ciphertext || tag`` of ``data`` under ``nonce``, authenticating ``associated_data``."""
        direct = self._direct
        if direct is None and type(data) is bytes and len(data) < AUTO_GPU_THRESHOLD:
            direct = self._small_direct
        if direct is not None:
            try:
                return direct.encrypt(nonce, data, associated_data)
            except _NOT_FOR_OPENSSL:
                pass
        return self._slow("encrypt", nonce, data, associated_data)

    def encrypt_into(self, nonce: Any, data: Any, associated_data: Any, buf: Any) -> int:
        """Write ``ciphertext || tag`` into ``buf`` (exactly ``len(data) + 16`` bytes).
        ``buf`` and ``data`` may be the same memory from the same start (in place), or
        apart; any other overlap is ``ValueError``."""
        direct = self._direct
        if direct is None and type(data) is bytes and len(data) < AUTO_GPU_THRESHOLD:
            direct = self._small_direct
        # an overlapping call goes to _slow, which checks the arguments in order first
        if direct is not None and (type(data) is bytes or not inexact_overlap(data, buf)):
            try:
                return direct.encrypt_into(nonce, data, associated_data, buf)
            except _NOT_FOR_OPENSSL as exc:
                if _refused_in_place(exc):
                    return self._in_place(False, nonce, data, associated_data, buf)
        return self._slow("encrypt_into", nonce, data, associated_data, buf)

    def decrypt(self, nonce: Any, data: Any, associated_data: Any) -> bytes:
        """The plaintext, or ``InvalidTag`` if anything was altered (nothing is returned then)."""
        direct = self._direct
        if direct is None and type(data) is bytes and len(data) < AUTO_GPU_THRESHOLD:
            direct = self._small_direct
        if direct is not None:
            try:
                # cryptography's allocating decrypt zero-fills its output before it refuses
                # a ciphertext OpenSSL's one call cannot take (past GCM's limit, 64 GiB)
                if len(data) <= _ONE_CALL_CIPHERTEXT:
                    return direct.decrypt(nonce, data, associated_data)
            except _NOT_FOR_OPENSSL_DECRYPT:
                pass
            except BaseException as exc:  # noqa: B036 (see _reraise_unless_too_long)
                _reraise_unless_too_long(exc)
        return self._slow("decrypt", nonce, data, associated_data)

    def decrypt_into(self, nonce: Any, data: Any, associated_data: Any, buf: Any) -> int:
        """Write the plaintext into ``buf`` (``len(data) - 16`` bytes); zeroed on ``InvalidTag``.
        Overlap as in :meth:`encrypt_into`: in place from the same start, or none."""
        direct = self._direct
        if direct is None and type(data) is bytes and len(data) < AUTO_GPU_THRESHOLD:
            direct = self._small_direct
        if direct is not None and (type(data) is bytes or not inexact_overlap(data, buf)):
            try:
                return direct.decrypt_into(nonce, data, associated_data, buf)
            except InvalidTag:
                # cryptography 50 leaves unauthenticated plaintext there. A signal that came
                # while OpenSSL ran (Ctrl-C, a timeout) has its handler run at the first call
                # here: zeroed all the same, then its exception goes on
                zeroing = [0]  # how far it went, for a second call
                try:
                    zero_surely(buf, writable, progress=zeroing)
                except BaseException as exc:  # noqa: B036 (see zero_surely)
                    zero_surely(buf, writable, exc, zeroing)
                raise
            except _NOT_FOR_OPENSSL as exc:
                if _refused_in_place(exc):
                    return self._in_place(True, nonce, data, associated_data, buf)
            except BaseException as exc:  # noqa: B036 (see _reraise_unless_too_long)
                _reraise_unless_too_long(exc)
        return self._slow("decrypt_into", nonce, data, associated_data, buf)

    def _in_place(self, decrypting: bool, nonce: bytes, data: Any, associated_data: Any,
                  buf: Any) -> int:
        """An exact in-place call that cryptography refused for the overlap (it checks
        the nonce, the types and the buffer's size first): the CPU backend's
        in-place route, which goes around the refusal with the same bytes and the same
        rule on a wrong tag (``buf`` zeroed). Small messages take the one-shot forms
        straight (their arguments are what cryptography has just checked): through the
        general path a 64-byte call cost 6 us, where cryptography's takes 0.4."""
        # cryptography's nonce rule again, should its refusal be for another reason: the
        # backend takes nonces it refuses (AES-GCM's composed path, any length)
        nonce = _nonce_bytes(nonce)
        self._check_nonce(nonce)
        ctx = self._context(get_backend("cpu"))
        from .backends.cpu import ONE_SHOT_DETACHED_MAX, OPENSSL_AEAD_MAX  # loaded by now
        src, out = readable(data), writable(buf)
        aad = optional_readable(associated_data, "associated_data")
        # 51 refuses a decryption's overlap before its length: the algorithm's limits here,
        # as the general path says them, not after 64 GiB of work
        _limits.check_length("data", len(src) if not decrypting else len(out), self._max_data,
                             self._display)
        _limits.check_length("associated_data", len(aad), self._max_aad, self._display)
        # cryptography refuses the overlap before associated data past its one call: such a
        # message is the backend's to compose
        if len(out) > ONE_SHOT_DETACHED_MAX or len(aad) > OPENSSL_AEAD_MAX:
            (ctx.open if decrypting else ctx.seal)(nonce, src, aad, out)
        elif decrypting:
            n = len(out)
            try:
                ctx.open_one_shot(nonce, src[:n], src[n:], aad, out, into_out=True)
            except InvalidTag:  # out was given back its ciphertext: zeroed, as decrypt_into's
                zero_surely(out)
                raise
        else:
            n = len(src)
            out[n:] = ctx.seal_one_shot(nonce, src, aad, out[:n])
        return len(out)

    def _slow(self, method: str, nonce: Any, data: Any, associated_data: Any, buf: Any = _ALLOCATE):
        """``method`` for a call the direct path did not take: OpenSSL still, when this
        call may run on the CPU and cryptography takes its arguments (an object that
        decides per call, XChaCha20's libsodium or subkey); else the general path, which
        produces the same bytes or gpucrypt's own error."""
        decrypting = method.startswith("decrypt")
        # OpenSSL or libsodium write overlapping output in their own order: not theirs
        if self._direct is None and (buf is _ALLOCATE or not inexact_overlap(data, buf)):
            openssl, fast_nonce = self._openssl_for(nonce, data, _limits.TAG_SIZE if decrypting else 0)
            if openssl is not None:
                call = getattr(openssl, method)
                try:
                    if buf is _ALLOCATE:
                        return call(fast_nonce, data, associated_data)
                    return call(fast_nonce, data, associated_data, buf)
                except InvalidTag:
                    if buf is not _ALLOCATE:  # as in decrypt_into: zeroed whatever came
                        zeroing = [0]  # how far it went, for a second call
                        try:
                            zero_surely(buf, writable, progress=zeroing)
                        except BaseException as exc:  # noqa: B036 (a handler due as it began)
                            zero_surely(buf, writable, exc, zeroing)
                    raise
                except _NOT_FOR_OPENSSL:
                    pass
                except BaseException as exc:  # noqa: B036 (see _reraise_unless_too_long)
                    _reraise_unless_too_long(exc)
        # argument types before lengths and sizes, in cryptography's order
        _nonce_bytes(nonce)
        src = readable(data)
        optional_readable(associated_data, "associated_data")
        out = None if buf is _ALLOCATE else writable(buf)  # a type, as cryptography checks it
        if decrypting and len(src) < _limits.TAG_SIZE:
            self._prepare(nonce, src, associated_data, 0)  # a bad nonce still says so first
            if out is not None:
                _refuse_inexact_overlap(data, buf)  # before a byte of buf (data's too) is zeroed
                zero(out)  # as the fast path leaves it
            raise InvalidTag()
        size = len(src) - _limits.TAG_SIZE if decrypting else len(src) + _limits.TAG_SIZE
        # the nonce and the limits before the output: a message over the limit is
        # OverflowError, not the MemoryError (or a reserved 64 GiB) of allocating for it
        ctx, ctx_nonce, aad = self._prepare(nonce, src, associated_data,
                                            size if decrypting else len(src))
        if out is None:
            result, out = new_bytes(size)
        else:
            result = size
            if len(out) != size:
                raise ValueError(f"buffer must be {size} bytes")
            _refuse_inexact_overlap(data, buf)
        (ctx.open if decrypting else ctx.seal)(ctx_nonce, src, aad, out)
        return result

    # --- batches: one launch per step on the GPU ---
    def encrypt_many(self, messages: Any) -> list[bytes]:
        """``encrypt`` over an iterable of ``(nonce, data, associated_data)``, as one batch.

        On the GPU the whole list is one host-to-device copy and one launch per step; on
        the CPU each message is what ``encrypt`` makes of it (one call of OpenSSL, for
        what it takes), so the batch costs what a loop would. Reusing a nonce under one
        key within (or across) batches is the caller's error to avoid, as with ``encrypt``.
        """
        if not self._all_on_cpu:
            messages = messages if type(messages) is list else list(messages)  # read twice
        if self._all_on_cpu or self._runs_on_cpu(messages):
            return self._each("encrypt", messages)
        nonces, datas, aads = self._prepare_many(messages, tag_len=0)
        backend = select_backend(self._device, sum(len(d) for d in datas))
        return [bytes(x) for x in backend.seal_many(self._batch_algorithm, self._key, nonces, datas, aads)]

    def decrypt_many(self, messages: Any, *, allow_failures: bool = False) -> list:
        """``decrypt`` over an iterable of ``(nonce, data, associated_data)``, as one batch.

        If any message fails authentication: raises :class:`BatchInvalidTag` naming them
        and returns nothing, or with ``allow_failures=True`` returns ``None`` in their
        places (their plaintext is never released).
        """
        if not self._all_on_cpu:
            messages = messages if type(messages) is list else list(messages)  # read twice
        if self._all_on_cpu or self._runs_on_cpu(messages):
            plain = self._each("decrypt", messages)
        else:
            nonces, datas, aads = self._prepare_many(messages, tag_len=_limits.TAG_SIZE)
            backend = select_backend(self._device, sum(len(d) for d in datas))
            plain = [None if p is None else bytes(p) for p in
                     backend.open_many(self._batch_algorithm, self._key, nonces, datas, aads)]
        failed = [i for i, p in enumerate(plain) if p is None]
        if failed and not allow_failures:
            raise BatchInvalidTag(failed)
        return plain

    def _runs_on_cpu(self, messages: list) -> bool:
        """Whether ``select_backend`` puts this batch on the CPU, for an object that may
        still go to a GPU (``device="auto"`` where a driver exists): its small payloads
        run there and the whole batch is below ``AUTO_GPU_THRESHOLD``. False for a
        malformed message, whatever it is: the general path then says what is wrong."""
        if not self._small_on_cpu:
            return False
        total = 0
        try:
            for item in messages:
                data = item[1]
                total += len(data) if type(data) in (bytes, bytearray) else readable(data).nbytes
                if total >= AUTO_GPU_THRESHOLD:
                    return False
        except Exception:  # only a classification: the general path checks every message
            return False
        return True

    def _each(self, method: str, messages: Any) -> list:
        """A batch on the CPU, each message the way ``encrypt``/``decrypt`` (``method``)
        takes it on the CPU: cryptography's own method where one object serves, so the
        batch costs what a loop of cryptography's calls does (through ``_prepare_many``
        and the backend's batch, 1 KiB messages cost three to four times that); a message
        it refuses (a float32 array, a message over 2**31 - 1 bytes) is composed by
        ``_slow``, which also says what is wrong with a bad argument. Decrypting, a failed
        tag gives None in the message's place."""
        # the batch runs on the CPU (the callers know): cryptography's object takes what
        # it can, as for an object that has no GPU (XChaCha20's depends on the nonce)
        call = getattr(self._openssl if self._direct_ok else self, method)
        out = []
        for item in messages:
            try:
                nonce, data, aad = item
            except (TypeError, ValueError):
                raise TypeError(_MALFORMED_MESSAGE) from None
            try:
                out.append(call(nonce, data, aad))
                continue
            except InvalidTag:
                out.append(None)
                continue
            except _NOT_FOR_OPENSSL:
                pass
            except BaseException as exc:  # noqa: B036 (see _reraise_unless_too_long)
                _reraise_unless_too_long(exc)
            try:
                out.append(self._slow(method, nonce, data, aad))
            except InvalidTag:
                out.append(None)
        return out

    @property
    def _batch_algorithm(self) -> str:
        return self._algorithm

    def _prepare_many(self, messages, tag_len: int):
        nonces, datas, aads = [], [], []
        for item in messages:
            try:
                nonce, data, associated_data = item
            except (TypeError, ValueError):
                raise TypeError(_MALFORMED_MESSAGE) from None
            nonce = _nonce_bytes(nonce)
            self._check_nonce(nonce)
            src = readable(data)
            aad = optional_readable(associated_data, "associated_data")
            _limits.check_length("data", max(len(src) - tag_len, 0), self._max_data, self._display)
            _limits.check_length("associated_data", len(aad), self._max_aad, self._display)
            nonces.append(nonce)
            datas.append(src)
            aads.append(bytes(aad))
        return nonces, datas, aads


class ChaCha20Poly1305(_Aead):
    """ChaCha20-Poly1305 (RFC 8439): 32-byte key, 12-byte nonce, 16-byte tag."""

    _algorithm = "chacha20-poly1305"
    _display = "ChaCha20Poly1305"
    _max_data = _limits.CHACHA20POLY1305_MAX_PLAINTEXT
    _max_aad = _limits.CHACHA20POLY1305_MAX_AAD

    @classmethod
    def generate_key(cls) -> bytes:
        return os.urandom(32)

    def _check_key(self, key):
        if len(key) != 32:
            raise ValueError(f"{self._display} key must be 32 bytes.")

    def _make_openssl(self, key):
        return _openssl.ChaCha20Poly1305(key)

    def _check_nonce(self, nonce):
        if len(nonce) != 12:
            raise ValueError("Nonce must be 12 bytes")


class XChaCha20Poly1305(ChaCha20Poly1305):
    """XChaCha20-Poly1305 (draft-irtf-cfrg-xchacha, libsodium's ``_ietf`` variant).

    A 24-byte nonce, safe to pick at random for any number of messages: the first
    16 bytes derive a subkey with HChaCha20, the last 8 make the ChaCha20-Poly1305
    nonce ``0x00000000 || nonce[16:24]``.
    """

    _display = "XChaCha20Poly1305"

    def _check_nonce(self, nonce):
        if len(nonce) != 24:
            raise ValueError("Nonce must be 24 bytes")

    # Up to this, libsodium (one C call, the reference itself) is the fast path; above
    # it, OpenSSL's ChaCha20-Poly1305 under the HChaCha20 subkey is faster than
    # libsodium's portable code (measured: equal at 16 KiB, 5x at 1 MiB). The bound is on
    # the message, so a ciphertext's tag is taken off before comparing.
    _libsodium_max = 16 << 10
    _direct_ok = False

    def _make_openssl(self, key):
        # A subkey per nonce leaves no single OpenSSL object to keep: this is libsodium
        # (None without PyNaCl), and larger messages get an OpenSSL object per call.
        return _Libsodium.create(key)

    def _openssl_for(self, nonce, data, tag_len=0):
        if type(nonce) is not bytes or len(nonce) != 24 or not self._small_on_cpu:
            return None, None
        if not self._all_on_cpu and not self._on_cpu_for(data):
            return None, None
        libsodium = self._openssl
        if libsodium is not None and plain_bytes(data) and len(data) - tag_len <= self._libsodium_max:
            return libsodium, nonce  # PyNaCl takes bytes only: bytes-like arrays are copied
        try:
            nbytes = len(data) if type(data) is bytes else readable(data).nbytes
        except (TypeError, ValueError):
            nbytes = 0  # not a buffer: cryptography refuses it, the general path says why
        if nbytes - tag_len > 2**31 - 1:  # past OpenSSL's one call: its decrypt zero-filled
            return None, None  # an output first (the general path composes the message)
        subkey, nonce12 = xchacha20_key_nonce(self._key, nonce)
        return _openssl.ChaCha20Poly1305(subkey), nonce12

    def _context_for(self, backend, nonce):
        # a subkey per nonce: a context for this message alone, built uncached (the
        # backend's per-key cache kept each one, evicting other keys' contexts and
        # keeping the subkeys alive after this object was gone)
        return backend.aead_for_nonce("xchacha20-poly1305", self._key, nonce)

    @property
    def _batch_algorithm(self) -> str:
        return "xchacha20-poly1305"


class _Libsodium:
    """XChaCha20-Poly1305 through libsodium, with cryptography's interface: its C
    functions called through PyNaCl's own cffi module (``nacl._sodium``), as PyNaCl's
    wrappers call them, minus their checks (this class's callers made them) and their
    ``ffi.new`` buffer and copy: the output is written where it goes (``encrypt_into``,
    ``decrypt_into``: the caller's buffer). cffi releases the GIL during the call."""

    def __init__(self, key: bytes, ffi, lib):
        self._key, self._ffi, self._lib = key, ffi, lib

    @classmethod
    def create(cls, key: bytes):
        try:
            from nacl._sodium import ffi, lib
        except ImportError:
            return None
        return cls(key, ffi, lib)

    @staticmethod
    def _aad(associated_data) -> bytes:
        if type(associated_data) is bytes:
            return associated_data
        if associated_data is None:
            return b""
        # gpucrypt's own rules (bytes(5) would be five zero bytes, and a non-contiguous
        # array would be copied in order where the other paths refuse it)
        return bytes(optional_readable(associated_data, "associated_data"))

    # ``data`` is bytes or bytearray (the fast path's choice), at most 16 KiB
    def _seal(self, nonce, data, associated_data, out) -> None:
        ffi, ad = self._ffi, self._aad(associated_data)
        m = data if type(data) is bytes else ffi.from_buffer(data)
        self._lib.crypto_aead_xchacha20poly1305_ietf_encrypt(
            ffi.from_buffer(out, require_writable=True), ffi.NULL, m, len(data), ad, len(ad),
            ffi.NULL, nonce, self._key)

    def _open(self, nonce, data, associated_data, out) -> None:
        """libsodium checks the tag first and writes nothing but zeros into ``out`` when
        it fails (the callers drop or zero ``out`` as well)."""
        ffi, ad = self._ffi, self._aad(associated_data)
        c = data if type(data) is bytes else ffi.from_buffer(data)
        if self._lib.crypto_aead_xchacha20poly1305_ietf_decrypt(
                ffi.from_buffer(out, require_writable=True), ffi.NULL, ffi.NULL, c, len(data),
                ad, len(ad), nonce, self._key) != 0:
            raise InvalidTag()

    def encrypt(self, nonce, data, associated_data):
        out = bytearray(len(data) + 16)
        self._seal(nonce, data, associated_data, out)
        return bytes(out)

    def decrypt(self, nonce, data, associated_data):
        if len(data) < 16:
            self._aad(associated_data)  # a wrong type is said first, as elsewhere
            raise InvalidTag()
        out = bytearray(len(data) - 16)
        self._open(nonce, data, associated_data, out)
        return bytes(out)

    def encrypt_into(self, nonce, data, associated_data, buf):
        # writable(): cffi's from_buffer takes a buffer of Python objects, and libsodium
        # would write over their pointers (Python crashes reading them back)
        if writable(buf).nbytes != len(data) + 16:
            raise ValueError(f"buffer must be {len(data) + 16} bytes")
        self._seal(nonce, data, associated_data, buf)
        return len(data) + 16

    def decrypt_into(self, nonce, data, associated_data, buf):
        if len(data) < 16:
            self._aad(associated_data)
            raise InvalidTag()
        if writable(buf).nbytes != len(data) - 16:
            raise ValueError(f"buffer must be {len(data) - 16} bytes")
        self._open(nonce, data, associated_data, buf)
        return len(data) - 16


class AESGCM(_Aead):
    """AES-GCM (NIST SP 800-38D): 16/24/32-byte key, a nonce of 8 to 128 bytes as in
    ``cryptography`` (12 bytes recommended), 16-byte tag. (The backends take any length
    from 1 byte, for gpucrypt's own formats; this drop-in keeps ``cryptography``'s
    ``ValueError`` for the others, when encrypting and decrypting alike.)"""

    _algorithm = "aes-gcm"
    _display = "AESGCM"
    _max_data = _limits.GCM_MAX_PLAINTEXT
    _max_aad = _limits.GCM_MAX_AAD

    @classmethod
    def generate_key(cls, bit_length: int) -> bytes:
        try:
            bit_length = operator.index(bit_length)  # NumPy integers too, as cryptography
        except TypeError:
            raise TypeError("bit_length must be an integer") from None
        if not 0 <= bit_length < 2**64:  # cryptography's unsigned conversion
            raise OverflowError("bit_length must be a non-negative 64-bit integer")
        if bit_length not in (128, 192, 256):
            raise ValueError("bit_length must be 128, 192, or 256")
        return os.urandom(bit_length // 8)

    def _check_key(self, key):
        if len(key) not in (16, 24, 32):
            raise ValueError("AESGCM key must be 128, 192, or 256 bits.")

    def _make_openssl(self, key):
        return _openssl.AESGCM(key)

    def _check_nonce(self, nonce):
        if not _limits.OPENSSL_GCM_MIN_NONCE <= len(nonce) <= _limits.OPENSSL_GCM_MAX_NONCE:
            raise ValueError(f"Nonce must be between {_limits.OPENSSL_GCM_MIN_NONCE} and "
                             f"{_limits.OPENSSL_GCM_MAX_NONCE} bytes")
