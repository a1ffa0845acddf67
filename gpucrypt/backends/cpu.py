"""The CPU backend: OpenSSL through ``cryptography``, as fast as calling it directly.

Fast path: ``cryptography``'s own ``encrypt_into``/``decrypt_into`` on the
caller's buffers, no copies. ``cryptography`` stops at 2**31 - 1 bytes of data
or associated data and at GCM nonces of 8..128 bytes; beyond those the same
bytes are produced from its lower-level primitives (ChaCha20 + Poly1305; AES-CTR
+ GHASH from :mod:`gpucrypt._host_primitives`), up to each algorithm's own limit.

Detached-tag ChaCha20-Poly1305 seals (segments of model files and checkpoints) up to
``CHACHA_ONE_SHOT_SEAL_MAX`` also take OpenSSL's one-shot AEAD, into a scratch buffer kept
per thread, and copy the ciphertext out: ``cryptography``'s Poly1305 holds the GIL (its
ChaCha20 and its AEAD release it), so only the one-shot form lets several threads seal
without ever waiting for one another. Callers whose threads do nothing but seal and open
(the tensor API) pass ``one_pass=True`` instead: one ChaCha20 context, the keystream and
the MAC taking turns over L2-sized pieces, no copy; the cheapest form on one thread, its
MAC pieces holding the GIL a piece at a time (about a third of the work).

Decryption verifies before it writes any plaintext, and zeroes ``out`` when the
tag is wrong (``cryptography``'s ``decrypt_into`` leaves the unauthenticated
plaintext in the buffer; we do not). The exceptions are the one-pass opens: AES-GCM
decrypting a detached-tag message (streaming GCM), and ChaCha20-Poly1305 with
``one_pass=True``; they decrypt once over the buffer and, if the tag is wrong or the
call stops part-way (KeyboardInterrupt, any exception), encrypt what they decrypted of
an in-place buffer back to its ciphertext (or zero a separate one) before they raise:
no unauthenticated plaintext is returned or left behind.

Likewise the piecewise seals (ChaCha20-Poly1305's one-pass and worker-thread forms,
AES-GCM's streaming form) that stop part-way give an in-place buffer its plaintext back
(the keystream once more over what they encrypted) before they raise: their tag never
reaches the caller, so a buffer left part encrypted could not be decrypted again.

In place on any ``cryptography``: 51 refuses an output that is its input ("data and buf
must not overlap"), which 50 took. Where the installed version refuses, an in-place call
is never handed to it (51 counts a refused call's bytes against ChaCha20's allowance): a
small one is one ``update`` copied over its input, a large one goes through a cache-sized
window (:class:`InPlaceStream`), and an in-place AEAD message through the thread's scratch
(up to ``_IN_PLACE_SCRATCH_MAX``) or the detached one-pass forms. The same bytes come out,
for one more copy of the data. Measured here (Intel Xeon, 2 cores, medians of steady
calls, unrecorded), AES-GCM in place on 51: 1 MiB seal 7.8 GB/s, open 5.1; 16 MiB 10.8 /
10.7; 256 MiB 6.6 / 6.6 (on 50: about 16.7 at 1 and 16 MiB, 7.6 at 256 MiB); two threads
sealing 1 MiB in place do not scale (the copies are bound by memory, where AES-NI was not).

Contexts (a key schedule and OpenSSL objects) are kept per key in a small
:class:`ContextCache`, so that repeated calls under one key (a tensor at a time,
say) do not redo the key schedule.
"""
from __future__ import annotations

import os
import struct
import time
import _thread
from collections import OrderedDict
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from .._buffers import address, bytes_arg
from .._interrupts import GIVE_UP_AFTER, held_interrupts, uninterrupted, zero_surely
from .._buffers import zero as _zero
from ._base import AeadContext, Backend

if TYPE_CHECKING:  # loaded on first use at run time (start-up)
    from .._host_primitives import Poly1305AeadMac

#: largest data or associated data ``cryptography``'s AEAD classes accept in one call
OPENSSL_AEAD_MAX = 2**31 - 1
#: piece size for the composed (long-message) paths
_PIECE = 1 << 30
#: a detached ChaCha20-Poly1305 message this large may use several threads (``threads=``):
#: the keystream in pieces of _PARALLEL_CHUNK on a pool, the MAC following in order
PARALLEL_MIN = 8 << 20
_PARALLEL_CHUNK = 4 << 20  # a multiple of 64 (ChaCha20 blocks) and of 16 (Poly1305 blocks)
#: detached-tag messages up to this size go through OpenSSL's one-shot AEAD and a copy
ONE_SHOT_DETACHED_MAX = 64 << 10
#: detached ChaCha20-Poly1305 seals up to this size also take OpenSSL's one-shot AEAD,
#: into a scratch buffer kept per thread (it only ever holds ciphertext and tags)
CHACHA_ONE_SHOT_SEAL_MAX = 8 << 20
#: ``one_pass=True`` ChaCha20-Poly1305: the keystream and the MAC take turns over pieces this
#: large, so that the MAC reads each piece while it is still in L2 cache (1 MiB per core here)
ONE_PASS_PIECE = 512 << 10
#: ``one_pass=True, shared_gil=True`` ChaCha20-Poly1305 messages up to this size go through
#: OpenSSL's one-shot AEAD and the thread's scratch buffer (so a worker holds at most this
#: much more memory), which release the GIL throughout; larger ones take the one-pass form.
#: So do in-place AES-GCM messages on a worker where cryptography refuses in place (51)
SHARED_GIL_ONE_SHOT_MAX = 64 << 20
#: copies at least this large go through NumPy, which releases the GIL while it copies (a
#: memoryview's slice assignment holds it); smaller ones are not worth NumPy's set-up
_GIL_FREE_COPY_MIN = 1 << 20
#: AEAD contexts the CPU backend keeps (least recently used dropped first)
CONTEXT_CACHE_SIZE = 32


def _same_memory(a: memoryview, b: memoryview) -> bool:
    """Whether two byte views are the very same memory (an in-place call)."""
    if len(a) != len(b) or not len(a):
        return len(a) == len(b)
    return address(a) == address(b)  # 0.2 us: the composed paths, failed tags, and (where
    # cryptography refuses in place) large messages choosing their route


def _transformed_end(out: memoryview, done: int, pending: tuple | None, stream=None) -> int:
    """Where the output of a piecewise open (plaintext) or in-place seal (ciphertext) ends
    in ``out`` after it stopped: ``done``, or within or at the end of the pending piece
    (``(end, its first input bytes, its output view)``, saved before its call; it starts
    at ``done``) if that piece was run. One C call runs a piece whole or not at all: an
    interrupt arrives as the call returns, before ``done`` moves on, and an error from
    within the call comes before any byte. A piece that ``stream`` (an
    :class:`InPlaceStream`) ran through its windows, one C call each, can stop between
    two of them (another signal's handler raising: only SIGINT is held there): the
    stream tells how far it went. The keystream changes a piece's first bytes unless 16
    bytes of it are all zero (2**-128; for a piece shorter than 16 bytes, unchanged
    bytes are the input anyway)."""
    if pending is None:
        return done
    if type(stream) is InPlaceStream:
        written = stream.written_before_stop(pending[2])
        if written is not None:
            return done + written
    if bytes(out[done:done + 16]) != pending[1]:
        return pending[0]
    return done


def _keystream_back(stream_at, out: memoryview, spans) -> None:
    """An in-place buffer's input back over the ``(start, end)`` spans of ``out`` that a piecewise
    call had run: the keystream XORed over them once more, ``stream_at(offset)`` giving ``(a
    stream from byte offset of out on, the offset where it must stop)`` for an offset that is a
    multiple of the stream's block (64 for ChaCha20, 16 for GCM). It runs to its end even if
    exceptions come meanwhile, then raises the first: only SIGINT is held over a clean-up, and
    another signal's handler (a timeout, a SIGTERM handler's ``sys.exit``) cut it short, which
    left a forged message's plaintext in the buffer, or a seal's plaintext encrypted under no
    tag. An exception costs no byte twice: the run goes on from where the last stopped, a piece
    or window whose call ran counted as done (:func:`_transformed_end`)."""
    # (span index, where in out it stopped, the pending piece and its stream): one store
    # each, so that a retry finds it whole
    state, stopped, stream, piece, stuck = (0, None, None, None), None, None, None, 0
    while True:
        before = state
        try:
            i, pos, pending, stream = state
            if pos is not None:
                state = (i, _transformed_end(out, pos, pending, stream), None, None)
            i, pos = state[:2]
            while i < len(spans):
                start, end = spans[i]
                pos = start if pos is None else pos
                while pos < end:
                    stream, until = stream_at(pos)
                    stop = min(pos + _PIECE, until, end)
                    piece = out[pos:stop]
                    state = (i, pos, (stop, bytes(piece[:16]), piece), stream)
                    _xor_into(stream, piece, piece)
                    pos = stop
                    state = (i, pos, None, None)
                i, pos = i + 1, None
                state = (i, None, None, None)
            break
        except BaseException as exc:  # noqa: B036 (the input back first, whatever came)
            if stopped is None:
                stopped = exc
            # the same error at every try with no progress (a MemoryError, cryptography
            # refusing): the clean-up's own, not a signal's; it ends here (zero_surely's)
            stuck = stuck + 1 if state[:2] == before[:2] else 0  # (span, offset): no further
            if stuck >= GIVE_UP_AFTER:
                break
    if stopped is not None:
        try:
            raise stopped
        finally:  # no cycle through this frame to the exception, nor views kept by it
            del stopped, state, stream, piece, before


def _zero_apart(data: memoryview, out: memoryview) -> None:
    """After an open failed: a separate ``out`` is zeroed (an in-place one holds its
    ciphertext, put back by the caller)."""
    if not _same_memory(data, out):
        _zero(out)


def _tags_equal(a: bytes, b: bytes) -> bool:
    """Constant-time comparison of two tags. ``constant_time`` is imported on the first
    comparison, not with this module: it loads the standard hmac and hashlib (OpenSSL's
    shared library, about 6 ms of a small file's run), and only the composed paths and
    failed tags compare here."""
    from cryptography.hazmat.primitives import constant_time

    return constant_time.bytes_eq(a, b)


def _copy(dst: memoryview, src: memoryview) -> None:
    """``dst[:] = src`` for two flat byte views of the same length that do not overlap,
    with the GIL released for large ones: threads copying scratch buffers side by side
    would otherwise take turns."""
    if len(src) < _GIL_FREE_COPY_MIN:
        dst[:] = src
        return
    import numpy as np  # a core dependency; loaded here only for large copies (start-up)

    np.copyto(np.frombuffer(dst, dtype=np.uint8), np.frombuffer(src, dtype=np.uint8))


def _xor_into(encryptor, data: memoryview, out: memoryview) -> None:
    """Run a ``cryptography`` stream encryptor over ``data`` into ``out`` in pieces (one
    piece: ``data`` and ``out`` as they are, which :class:`InPlaceStream` knows again)."""
    if len(data) <= _PIECE:
        encryptor.update_into(data, out)
        return
    for start in range(0, len(data), _PIECE):
        end = min(start + _PIECE, len(data))
        encryptor.update_into(data[start:end], out[start:end])


_SCRATCH = _thread._local()  # threading.local, without loading threading


def _submit_piece(pool, futures: list, workers: int, xor, start: int) -> None:
    """``futures.append(pool.submit(xor, start))``, as one step for Ctrl-C while ``submit``
    may start a thread (the first ``workers`` pieces): interrupted inside, it could leave
    the piece queued and its new thread running, neither known to the pool, whose
    shutdown then waited for neither, and the clean-up could look at the piece before
    that thread ran it. Later pieces only queue (a piece either queued or not, its
    threads known). Holding SIGINT costs a few microseconds, so only those."""
    if len(futures) < workers:
        with held_interrupts():
            futures.append(pool.submit(xor, start))
    else:
        futures.append(pool.submit(xor, start))


def _borrow(name: str, nbytes: int) -> bytearray:
    """This thread's reusable scratch buffer ``name`` (grown to ``nbytes`` as needed; it
    dies with the thread), taken from the thread until :func:`_give_back`: a call made
    meanwhile in this thread (a signal handler's, between two bytecodes) gets one of its
    own instead of overwriting, and zeroing, the one in use."""
    buf = getattr(_SCRATCH, name, None)
    if buf is None or len(buf) < nbytes:
        return bytearray(nbytes)
    setattr(_SCRATCH, name, None)
    return buf


def _give_back(name: str, buf: bytearray) -> None:
    setattr(_SCRATCH, name, buf)


# ---------------------------------------------------------------- in place, whatever the version
# cryptography 51 refuses an output that is its input, in place included ("data and buf
# must not overlap"), where 50 took it: in ``update_into`` and in the AEADs'
# ``encrypt_into``/``decrypt_into``. gpucrypt works in place throughout (stream batches,
# in-place tensors, the drop-in classes), so where the installed version refuses, an
# in-place call goes through a window of this thread's (a stream context) or through the
# one-shot forms' scratch (an AEAD), and the same bytes come out.

#: an in-place AEAD message up to this size goes through the thread's scratch buffers where
#: cryptography refuses in place (the GIL released throughout); larger ones through the
#: one-pass forms and their window
_IN_PLACE_SCRATCH_MAX = 1 << 20
#: the window an in-place ``update_into`` goes through where cryptography refuses it: small
#: enough to stay in L2 cache (1 MiB a core here), so that the copy back costs little beside
#: the cipher
_IN_PLACE_WINDOW = 256 << 10


def _takes_in_place() -> tuple[bool, bool]:
    """Whether this ``cryptography`` takes an output that is its input: (``update_into``,
    the AEADs' ``*_into``). Asked once, of a throwaway key."""
    buf = memoryview(bytearray(64))
    try:
        Cipher(algorithms.ChaCha20(bytes(32), bytes(16)), None).encryptor().update_into(buf, buf)
        stream_ok = True
    except ValueError:
        stream_ok = False
    try:
        ChaCha20Poly1305(bytes(32)).encrypt_into(bytes(12), buf[:48], None, buf)
        aead_ok = True
    except ValueError:
        aead_ok = False
    return stream_ok, aead_ok


UPDATE_INTO_IN_PLACE, AEAD_INTO_IN_PLACE = _takes_in_place()


def _one_base(data, out) -> bool:
    """Whether ``data`` and ``out`` are views of one object (an in-place call, as the
    callers here make them: ``buf[:n]`` into ``buf``), told without asking for an
    address: the AEADs' in-place calls (a small file's segments) are told this way, and
    load no ctypes; other buffers are asked their addresses (:func:`_overlaps`)."""
    return type(data) is memoryview and type(out) is memoryview and data.obj is out.obj \
        and len(data) > 0 and len(out) > 0


def _overlaps(data, out) -> bool:
    """Whether ``data`` and ``out`` (non-empty buffers) share memory: views of one memory
    through two objects (two NumPy views of an array) that :func:`_one_base` does not
    see. Asked of their addresses, unless ``data`` is immutable ``bytes``."""
    if type(data) is bytes or type(out) is bytes or not len(data) or not len(out):
        return False
    start, end = address(data), address(out)
    return start < end + memoryview(out).nbytes and end < start + memoryview(data).nbytes


class InPlaceStream:
    """A ``cryptography`` encryptor or decryptor whose ``update_into`` takes the same
    memory in and out on every version. Where this one refuses it, an in-place call is
    never handed to it (51 counts a refused call's bytes against ChaCha20's allowance):

    - up to ``_IN_PLACE_WINDOW`` bytes, or always where ``windows`` is False (a context
      whose keystream position only cryptography knows: gpucrypt.ciphers'), one
      ``update`` of the whole input, copied over it: one C call, so a refusal (ChaCha20's
      counter) writes nothing and a signal comes after it, as with ``update_into``;
    - larger, through a window ``_IN_PLACE_WINDOW`` bytes at a time, copied back with
      NumPy (which releases the GIL while it copies: threads sealing side by side would
      otherwise take turns at every window), SIGINT held over the whole call. For
      gpucrypt's own callers, which check a message's length against the algorithm's
      limit before any keystream, so that no window is refused. The window is taken
      from the thread while in use: a signal handler that encrypts in place meanwhile
      gets a window of its own. Another signal's handler that raises between two windows
      stops the call part-way: :meth:`written_before_stop` tells how far, for the
      caller's clean-up.

    Everything else is the context's."""

    __slots__ = ("_context", "_windows", "_progress")

    def __init__(self, context, windows: bool = True):
        self._context = context
        self._windows = windows
        #: a windowed call's progress: ``(its out, bytes copied to it before the last
        #: window, that window: (its end, its first input bytes) or None)``, None once it
        #: returned
        self._progress = None

    def update_into(self, data, out) -> int:
        if not (_one_base(data, out) or _overlaps(data, out)):
            return self._context.update_into(data, out)
        # in place (the callers' only overlap: an inexact one was refused before them),
        # or views of one object apart, which both forms serve as well
        src, dst = memoryview(data).cast("B"), memoryview(out).cast("B")
        if len(src) <= _IN_PLACE_WINDOW or not self._windows:
            dst[:len(src)] = self._context.update(src)
            return len(src)
        return self._through_windows(src, dst, out)

    def _through_windows(self, src: memoryview, out: memoryview, given) -> int:
        import numpy as np  # a core dependency; loaded here, where this version needs it

        dst = np.frombuffer(out, dtype=np.uint8)
        view, window = getattr(_SCRATCH, "window", None) or _new_window()
        _SCRATCH.window = None  # in use: a nested call (a signal handler's) makes its own
        update_into = self._context.update_into
        done = used = 0
        self._progress = (given, 0, None)
        try:
            with held_interrupts():
                while done < len(src):
                    end = min(done + _IN_PLACE_WINDOW, len(src))
                    n = update_into(src[done:end], view)
                    used = max(used, n)
                    # one store, before the copy: whether the copy ran is told by its bytes
                    self._progress = (given, done, (done + n, bytes(src[done:done + 16])))
                    np.copyto(dst[done:done + n], window[:n])
                    done += n
        finally:
            window[:used] = 0  # it held what went to out: plaintext, opening
            _SCRATCH.window = (view, window)
        self._progress = None
        return done

    def written_before_stop(self, out) -> int | None:
        """How many bytes at the start of ``out`` (the very object given to
        :meth:`update_into`) a windowed call into it wrote before it stopped part-way,
        or None if none did (a call that was not windowed writes all or nothing). The
        window being copied as it stopped counts if its first bytes changed (see
        :func:`_transformed_end`)."""
        progress = self._progress
        if progress is None or progress[0] is not out:
            return None
        _, copied, last = progress
        if last is not None and \
                bytes(memoryview(out).cast("B")[copied:copied + 16]) != last[1]:
            return last[0]
        return copied

    def __getattr__(self, name):
        return getattr(self._context, name)


def in_place_stream(context, windows: bool = True):
    """``context`` (a ``cryptography`` encryptor or decryptor), able to work in place
    whatever the version (:class:`InPlaceStream` where it needs one)."""
    return context if UPDATE_INTO_IN_PLACE else InPlaceStream(context, windows)


def _new_window():
    """A window for :class:`InPlaceStream`, as a byte view and the NumPy array over it
    (with block-size slack: an AES mode's ``update_into`` asks for ``len(data) + 15``
    bytes)."""
    import numpy as np

    array = np.zeros(_IN_PLACE_WINDOW + 16, dtype=np.uint8)
    return memoryview(array), array


class _OpenSslAead(AeadContext):
    """OpenSSL's one-shot AEAD wherever it accepts the arguments, and the same bytes
    composed from primitives (``_start``/``_xor``/``_tag``) where it does not."""

    _openssl_class: type = type(None)

    def __init__(self, key: bytes):
        self._key = key
        self._aead = self._openssl_class(key)

    @property
    def openssl(self):
        """``cryptography``'s AEAD object for this key, for callers that have already
        checked that a message takes OpenSSL's one-shot call (a 12-byte nonce, data and
        associated data each under ``OPENSSL_AEAD_MAX``): a small message then pays for
        one C call and nothing else."""
        return self._aead

    def _native(self, nonce: bytes, data_len: int, aad_len: int) -> bool:
        return data_len <= OPENSSL_AEAD_MAX and aad_len <= OPENSSL_AEAD_MAX

    def seal(self, nonce, data, aad, out):
        if self._native(nonce, len(data), len(aad)):
            if AEAD_INTO_IN_PLACE or not _one_base(data, out):
                try:
                    self._aead.encrypt_into(nonce, data, aad, out)
                    return
                except ValueError:  # refused before any byte, if for an overlap
                    if AEAD_INTO_IN_PLACE or not _overlaps(data, out):
                        raise
            n = len(data)  # in place, where this version refuses it
            out[n:] = self._seal_in_place(nonce, data, aad, out[:n])
            return
        out[len(data):] = self._seal_composed(nonce, data, aad, out[: len(data)])

    # In place where this cryptography refuses it (the module docstring): small messages
    # through the thread's scratch buffers (OpenSSL's one-shot AEAD, the GIL released),
    # larger ones through the detached one-pass forms, whose copies stay cache-sized (a
    # full-size scratch cost 3-5 times the cipher at 16 MiB and stayed with the thread).
    def _seal_in_place(self, nonce, data, aad, ct) -> bytes:
        if len(data) <= _IN_PLACE_SCRATCH_MAX:
            return self.seal_one_shot(nonce, data, aad, ct)
        return self.seal_detached(nonce, data, memoryview(aad), ct, one_pass=True)

    def _open_in_place(self, nonce, data, aad, out) -> None:
        """``data`` (``ciphertext || tag``) opened into ``out``, its start; a wrong tag
        zeroes ``out``, as ``open``'s in-place call leaves it."""
        n = len(data) - 16
        if n <= _IN_PLACE_SCRATCH_MAX:
            # OpenSSL decrypts into the thread's plaintext scratch, copied to out once the
            # tag verified; zeroed either way
            buf = _borrow("plain", n)
            plain = memoryview(buf)[:n]
            try:
                with held_interrupts():  # as open's: a wrong tag's clean-up comes first
                    try:
                        self._aead.decrypt_into(nonce, data, aad, plain)
                    except InvalidTag:
                        zeroing = [0]  # how far it went, for a second call
                        try:
                            zero_surely(out, progress=zeroing)
                        except BaseException as exc:  # noqa: B036 (a handler due as it began)
                            zero_surely(out, stopped=exc, progress=zeroing)
                        raise
                _copy(out, plain)
            finally:
                _zero(plain)
                _give_back("plain", buf)
            return
        try:
            self.open_detached(nonce, data[:n], data[n:], memoryview(aad), out, one_pass=True)
        except InvalidTag:  # the detached form gave out its ciphertext back
            zero_surely(out)
            raise

    def _seal_composed(self, nonce, data, aad, ct) -> bytes:
        """The whole keystream, then the MAC over the ciphertext; returns the tag. In place,
        a Ctrl-C waits for the end of both (the MAC of 2 GiB holds the GIL for seconds),
        and is then raised with the buffer given its plaintext back, as is any exception
        from the MAC: stopped there, it was ciphertext that no tag covers."""
        state = self._start(nonce)
        if not _same_memory(data, ct):
            self._xor(state, data, ct)
            return self._tag(state, ct, aad)
        sealed = False  # ct holds the whole ciphertext
        try:
            with held_interrupts():  # a Ctrl-C held is raised as the block ends: below
                self._xor(state, data, ct)
                sealed = True
                tag = self._tag(state, ct, aad)
        except BaseException:  # noqa: B036 (the tag is lost with the exception)
            if sealed:
                uninterrupted(_keystream_back, self._stream_at(state), ct, [(0, len(ct))])
            raise
        return tag

    def open(self, nonce, data, aad, out):
        if len(data) < 16:
            raise InvalidTag()
        if self._native(nonce, len(data) - 16, len(aad)):
            if AEAD_INTO_IN_PLACE or not _one_base(data, out):
                # OpenSSL writes the plaintext before it checks the tag: a Ctrl-C during
                # the call waits, so that it cannot fire before a wrong tag's zeroing
                with held_interrupts():
                    try:
                        self._aead.decrypt_into(nonce, data, aad, out)
                        return
                    except InvalidTag:
                        # another signal's handler is not held: one due runs as the
                        # zeroing begins, which then goes on all the same
                        zeroing = [0]  # how far it went, for a second call
                        try:
                            zero_surely(out, progress=zeroing)
                        except BaseException as exc:  # noqa: B036 (a handler due as it began)
                            zero_surely(out, stopped=exc, progress=zeroing)
                        raise
                    except ValueError:  # refused before any byte, if for an overlap
                        if AEAD_INTO_IN_PLACE or not _overlaps(data, out):
                            raise
            return self._open_in_place(nonce, data, aad, out)  # where this version refuses
        state = self._start(nonce)
        ct, tag = data[:-16], data[-16:]
        if not _tags_equal(self._tag(state, ct, aad), bytes(tag)):
            zero_surely(out)
            raise InvalidTag()
        self._open_composed_xor(state, ct, out)

    def _open_composed_xor(self, state, ct, out) -> None:
        """The keystream over ciphertext whose tag has verified, into ``out``: a Ctrl-C
        waits for its end (in place, one part way left the buffer part plaintext, part
        ciphertext) and is then raised with the ciphertext given back (in place) or
        ``out`` zeroed, as the one-pass opens do: the caller, interrupted, would not know
        the buffer holds plaintext. (The tag was computed over the ciphertext as read
        then and the keystream reads it again, as OpenSSL's one-shot ChaCha20-Poly1305
        does: a buffer another thread writes meanwhile is outside the contract.)"""
        opened = False
        try:
            with held_interrupts():
                self._xor(state, ct, out)
                opened = True
        except BaseException:  # noqa: B036 (a Ctrl-C held over the keystream)
            if opened and _same_memory(ct, out):
                uninterrupted(_keystream_back, self._stream_at(state), out, [(0, len(out))])
            elif opened:
                zero_surely(out)
            raise

    def seal_detached(self, nonce, data, aad, out, threads=1, one_pass=False, shared_gil=False):
        if len(data) <= ONE_SHOT_DETACHED_MAX and self._native(nonce, len(data), len(aad)):
            return self.seal_one_shot(nonce, data, aad, out)
        return self._seal_composed(nonce, data, aad, out)

    def open_detached(self, nonce, data, tag, aad, out, threads=1, one_pass=False, shared_gil=False):
        if len(tag) != 16:
            raise InvalidTag()
        if len(data) <= ONE_SHOT_DETACHED_MAX and self._native(nonce, len(data), len(aad)):
            return self.open_one_shot(nonce, data, tag, aad, out, into_out=one_pass)
        state = self._start(nonce)
        if not _tags_equal(self._tag(state, data, aad), bytes(tag)):
            if not _same_memory(data, out):
                _zero(out)
            raise InvalidTag()
        self._open_composed_xor(state, data, out)

    # Small messages: OpenSSL's one-shot AEAD through a scratch buffer holding
    # ``data || tag`` costs a copy of a few KiB; composing the AEAD from its primitives
    # costs ~20 us of cipher contexts per call.
    # These two are also called directly by the tensor API for its small tensors, where
    # seal_detached/open_detached's choosing cost as much as OpenSSL's work. Contract: the
    # arguments are cryptography's to take (``data`` and ``aad`` under OPENSSL_AEAD_MAX,
    # a nonce OpenSSL accepts; ``tag`` 16 bytes), ``data`` and ``out`` flat byte buffers.
    def seal_one_shot(self, nonce, data, aad, out) -> bytes:
        """OpenSSL's one-shot seal into the thread's scratch buffer (a fresh zeroed one per
        message cost a fifth of a 16 KiB tensor's seal in a batch), then the ciphertext
        out of it: ``out`` may be ``data`` itself, the scratch is apart."""
        n = len(data)
        buf = _borrow("buf", n + 16)  # only sealed bytes go into it, never plaintext
        scratch = memoryview(buf)[:n + 16]
        try:
            self._aead.encrypt_into(nonce, data, aad, scratch)
            tag = bytes(scratch[n:])
            try:
                _copy(out, scratch[:n])
                return tag
            except BaseException:  # noqa: B036 (Ctrl-C as the copy returns: the tag never leaves)
                uninterrupted(self._plaintext_back, nonce, data, scratch, aad, out)
                raise
        finally:
            _give_back("buf", buf)

    def _plaintext_back(self, nonce, data, sealed, aad, out) -> None:
        if _same_memory(data, out):  # an in-place seal: its plaintext, from the sealed copy
            self._aead.decrypt_into(nonce, sealed, aad, out)

    def open_one_shot(self, nonce, data, tag, aad, out, into_out=False) -> None:
        """``into_out`` (the ``one_pass`` contract: ``out`` is private to the caller during
        the call): OpenSSL decrypts straight into ``out``, which a wrong tag then gives back
        its ciphertext (in place) or zeroes; else through a scratch buffer, so that ``out``
        never holds unauthenticated bytes. ``data || tag`` goes into the thread's scratch
        buffer (sealed bytes only), not a fresh zeroed one."""
        n = len(data)
        buf = _borrow("buf", n + 16)
        try:
            self._open_sealed_copy(nonce, data, tag, aad, out, into_out, memoryview(buf)[:n + 16])
        finally:
            _give_back("buf", buf)

    def _open_sealed_copy(self, nonce, data, tag, aad, out, into_out, sealed) -> None:
        """:meth:`open_one_shot` with ``sealed``, the scratch for ``data || tag``."""
        n = len(data)
        _copy(sealed[:n], data)
        sealed[n:] = tag
        if into_out:
            try:
                self._aead.decrypt_into(nonce, sealed, aad, out)
            except BaseException:  # noqa: B036 (a wrong tag; or Ctrl-C as the call returns:
                # the caller would not know the buffer holds plaintext now)
                # The ciphertext goes back first, by slicing and assignment alone: a Ctrl-C
                # that came during the call runs at the next call or loop, so not before
                # this (holding SIGINT across the call instead cost a small tensor 1.3 us)
                out[:] = sealed[:n]
                uninterrupted(_zero_apart, data, out)  # a separate out: zeroes instead
                raise
            return
        plain = bytearray(n)  # decrypt_into writes even when the tag is wrong: not into out
        try:
            with held_interrupts():  # as in open(): a wrong tag's clean-up comes first
                try:
                    self._aead.decrypt_into(nonce, sealed, aad, plain)
                except InvalidTag:  # as the composed path: no stale bytes in a separate out
                    _zero_apart(data, out)
                    raise
            out[:] = plain
        finally:
            plain[:] = bytes(n)

    # composed path: state = what the nonce determines (ChaCha20: the nonce; GCM: J0)
    def _start(self, nonce: bytes) -> bytes:
        raise NotImplementedError

    def _xor(self, state: bytes, data: memoryview, out: memoryview) -> None:
        raise NotImplementedError

    def _tag(self, state: bytes, ct: memoryview, aad: memoryview) -> bytes:
        raise NotImplementedError

    def _stream_at(self, state: bytes):
        """``offset -> (a stream of the keystream that _xor runs from state, from byte
        offset on, the offset where that stream must stop)`` (see :func:`_keystream_back`)."""
        raise NotImplementedError


class _ChaCha20Poly1305(_OpenSslAead):
    _openssl_class = ChaCha20Poly1305

    def _start(self, nonce):
        return nonce

    # Larger seals: ``cryptography``'s ChaCha20 and Poly1305 (the composed path) hold the
    # GIL, its one-shot AEAD releases it. Segments sealed on several threads (a model
    # file, a DCP rank's shards) took turns on the composed path, and the waiting cost
    # CPU time besides (issue 16: a 2-rank DCP save spent 2.4x plain DCP's CPU time); one
    # OpenSSL pass plus a copy out of a reused buffer runs them side by side.
    #
    # ``one_pass=True`` (callers whose threads do nothing but seal and open, such as the
    # tensor API's): one ChaCha20 context runs from block 0 (the MAC's one-time key) on,
    # and the keystream and the MAC take turns over ONE_PASS_PIECE pieces. One pass over
    # memory, no copy, one cipher context: on one thread the cheapest form (the scratch
    # seal copies the whole message once more). The keystream releases the GIL; the
    # MAC's pieces (about a third of the work) hold it, a piece at a time.
    #
    # ``shared_gil=True`` as well (a tensor batch's pool workers): other threads of this
    # process seal and open at the same time, and the one-pass MAC's hold on the GIL makes
    # them wait (cryptography 50's Poly1305 holds it: two threads MAC no faster than one).
    # Messages up to SHARED_GIL_ONE_SHOT_MAX then take OpenSSL's one-shot AEAD through the
    # thread's scratch buffer and a NumPy copy, which hold the GIL only between calls.
    # 300-tensor 512 MiB state dict in place, 2 threads, Intel Xeon (AVX-512), against one
    # buffer on one thread: one-pass everywhere x1.26 encrypt / x1.00 decrypt, one-shot on
    # the workers and one-pass on the calling thread x1.34 / x1.46, one-shot on both x1.18
    # / x1.53 (the one-shot form is the slower one on a thread of its own).
    def _parallel(self, threads: int, data, out) -> bool:
        """Whether one message runs on several threads: the keystream on workers, the MAC
        here. Not in place where cryptography refuses it (51): a worker's piece goes
        through a window whose copy back needs the GIL, which this thread's Poly1305 holds
        over each call, and one 1 GiB tensor in place ran at 2.4-2.6 GB/s on 2 threads
        against 3.1 on one (4.5-4.9 on 2 with 50, in place): the one-thread forms then."""
        return threads >= 2 and len(data) >= PARALLEL_MIN and \
            (UPDATE_INTO_IN_PLACE or not _same_memory(data, out))

    def seal_detached(self, nonce, data, aad, out, threads=1, one_pass=False, shared_gil=False):
        if not self._parallel(threads, data, out):
            if one_pass and len(data) > ONE_SHOT_DETACHED_MAX:
                if shared_gil and len(data) <= SHARED_GIL_ONE_SHOT_MAX and \
                        self._native(nonce, len(data), len(aad)):
                    return self.seal_one_shot(nonce, data, aad, out)
                return self._seal_one_pass(nonce, data, aad, out)
            if ONE_SHOT_DETACHED_MAX < len(data) <= CHACHA_ONE_SHOT_SEAL_MAX and \
                    self._native(nonce, len(data), len(aad)):
                return self.seal_one_shot(nonce, data, aad, out)
            return super().seal_detached(nonce, data, aad, out)
        # the keystream on threads - 1 workers: this thread is the last one, running the MAC
        # behind them (with as many workers as threads, three threads shared two cores:
        # 512 MiB in place on 2 cores, 3.5 GB/s against 4.5 with one worker)
        mac = self._mac(nonce, aad)
        return self._xor_parallel(nonce, data, out, threads - 1, lambda a, b: mac.update(out[a:b]),
                                  mac.finalize)

    def open_detached(self, nonce, data, tag, aad, out, threads=1, one_pass=False, shared_gil=False):
        if not self._parallel(threads, data, out) or len(tag) != 16:
            if one_pass and len(data) > ONE_SHOT_DETACHED_MAX and len(tag) == 16:
                if shared_gil and len(data) <= SHARED_GIL_ONE_SHOT_MAX and \
                        self._native(nonce, len(data), len(aad)):
                    return self.open_one_shot(nonce, data, tag, aad, out, into_out=True)
                return self._open_one_pass(nonce, data, tag, aad, out)
            return super().open_detached(nonce, data, tag, aad, out, one_pass=one_pass)
        if one_pass:
            return self._open_pipelined(nonce, data, tag, aad, out, threads - 1)
        if not _tags_equal(self._tag(nonce, data, aad), bytes(tag)):
            if not _same_memory(data, out):
                _zero(out)
            raise InvalidTag()
        self._xor_parallel(nonce, data, out, threads, lambda a, b: None)

    def _seal_one_pass(self, nonce, data, aad, out) -> bytes:
        from .._host_primitives import Poly1305AeadMac  # loaded on first use (start-up)

        stream = self._stream(nonce, 0)
        mac = Poly1305AeadMac(stream.update(bytes(64))[:32], aad)  # block 0; block 1 is next
        update_into, mac_update = stream.update_into, mac.counted_update(len(data))
        done = 0         # out[:done] holds ciphertext
        pending = None   # (end, its first plaintext bytes, its output) of the piece encrypted
        try:
            for start in range(0, len(data), ONE_PASS_PIECE):
                end = min(start + ONE_PASS_PIECE, len(data))
                piece = out[start:end]
                pending = (end, bytes(data[start:start + 16]), piece)
                update_into(data[start:end], piece)
                done, pending = end, None
                mac_update(piece)
            return mac.finalize()
        except BaseException:  # noqa: B036 (an interrupt too: see _take_back)
            uninterrupted(lambda: self._take_back(
                nonce, data, out, [(0, _transformed_end(out, done, pending, stream))]))
            raise

    def _open_one_pass(self, nonce, data, tag, aad, out) -> None:
        """The MAC reads each piece of ciphertext, then the keystream decrypts it into
        ``out``; the tag is checked at the end. On a wrong tag ``out`` is given back its
        ciphertext (in place: the keystream once more over the whole buffer) or zeroed
        (apart) before ``InvalidTag`` is raised, as AES-GCM's in-place open does: no
        unauthenticated plaintext is returned or left behind (only another thread
        reading the buffer during the call could see it)."""
        from .._host_primitives import Poly1305AeadMac

        stream = self._stream(nonce, 0)
        mac = Poly1305AeadMac(stream.update(bytes(64))[:32], aad)
        update_into, mac_update = stream.update_into, mac.counted_update(len(data))
        done = 0         # out[:done] holds plaintext
        pending = None   # (end, its first ciphertext bytes, its output) of the piece decrypted
        try:
            for start in range(0, len(data), ONE_PASS_PIECE):
                end = min(start + ONE_PASS_PIECE, len(data))
                mac_update(data[start:end])
                piece = out[start:end]
                pending = (end, bytes(data[start:start + 16]), piece)
                update_into(data[start:end], piece)
                done, pending = end, None
            if not _tags_equal(mac.finalize(), bytes(tag)):  # inside: an interrupt here too
                raise InvalidTag()
        except BaseException:  # noqa: B036 (the plaintext goes back whatever stopped us)
            # taking back a piece that was never decrypted would put its plaintext there
            uninterrupted(lambda: self._take_back(
                nonce, data, out, [(0, _transformed_end(out, done, pending, stream))]))
            raise

    def _take_back(self, nonce, data, out, spans) -> None:
        """What a piecewise call that does not return must leave: an in-place buffer gets
        its input back over the ``(start, end)`` spans it had run (the keystream once
        more; ``start`` a multiple of 64): the ciphertext, for an open; the plaintext, for
        a seal, whose tag the caller never gets (an in-place tensor stopped part-way by
        Ctrl-C would be lost otherwise). A separate output is zeroed."""
        if not _same_memory(data, out):
            zero_surely(out)
            return
        _keystream_back(self._stream_at(nonce), out, spans)

    def _open_pipelined(self, nonce, data, tag, aad, out, workers: int) -> None:
        """The one-pass open on several threads: this thread runs the MAC over each piece
        of ciphertext, then hands the piece to one of ``workers`` threads to decrypt,
        while it goes on to the next piece; the tag is checked at the end, and a wrong
        one is handled as in :meth:`_open_one_pass` (:meth:`_take_back`). The MAC-first
        open would run the MAC over everything, then the keystream: 3.6 GB/s on 2 cores
        here, against 4.4."""
        from concurrent.futures import ThreadPoolExecutor

        n = len(data)
        mac = self._mac(nonce, aad)

        def xor(start: int) -> None:
            end = min(start + _PARALLEL_CHUNK, n)
            _xor_into(self._stream(nonce, 1 + start // 64), data[start:end], out[start:end])

        pool = ThreadPoolExecutor(workers)
        futures: list = []
        pending = None  # (start, its first ciphertext bytes) of the piece being handed out
        try:
            for start in range(0, n, _PARALLEL_CHUNK):
                mac.update(data[start:start + _PARALLEL_CHUNK])  # before a worker writes it
                pending = (start, bytes(data[start:start + 16]))
                _submit_piece(pool, futures, workers, xor, start)
                pending = None
                # Poly1305 holds the GIL, and this loop would keep it until the switch
                # interval (5 ms) ran out: the workers, each needing it for a moment
                # between pieces, would wait that long. Let them have it now.
                time.sleep(0)
            for future in futures:
                future.result()
            pool.shutdown(wait=True)  # inside: an interrupt while it waits is handled below
            if not _tags_equal(mac.finalize(), bytes(tag)):  # inside: an interrupt here too
                raise InvalidTag()
        except BaseException:  # noqa: B036 (the ciphertext goes back whatever stopped us)
            uninterrupted(self._stop_pieces, pool, futures, pending, nonce, data, out)
            raise

    def _stop_pieces(self, pool, futures: list, pending: tuple | None, nonce, data, out) -> None:
        """After a piecewise call on a pool stopped: stop the pieces not started, wait for
        the others, and take back every piece a worker ran (:meth:`_take_back`), the one
        being handed out (``pending``: its start and first input bytes) included if it
        ran: an interrupt can come as ``submit`` returns, before its future is kept."""
        n = len(data)
        for future in futures:
            future.cancel()
        pool.shutdown(wait=True)  # every piece a worker started (or was given) is finished
        ran = [(start, min(start + _PARALLEL_CHUNK, n))
               for start, future in zip(range(0, n, _PARALLEL_CHUNK), futures)
               if not future.cancelled() and future.exception() is None]
        # the pending piece only if its future was not kept (the interrupt came between
        # the append and the clearing of ``pending``: counted twice, it would be XORed
        # back twice, which undoes nothing)
        if pending is not None and pending[0] >= len(futures) * _PARALLEL_CHUNK \
                and bytes(out[pending[0]:pending[0] + 16]) != pending[1]:
            ran.append((pending[0], min(pending[0] + _PARALLEL_CHUNK, n)))
        self._take_back(nonce, data, out, ran)

    def _xor_parallel(self, nonce, data, out, threads: int, done, last=None):
        """ChaCha20 over ``_PARALLEL_CHUNK`` pieces on ``threads`` workers (a piece's
        keystream starts at its own block counter); ``done(start, end)`` is called in
        this thread, in order, as each piece is finished (the MAC follows the workers),
        and ``last()`` (a seal's tag) once all are, its result returned. If anything
        stops it, every piece run is taken back before the exception goes on."""
        from concurrent.futures import ThreadPoolExecutor

        n = len(data)
        starts = range(0, n, _PARALLEL_CHUNK)

        def xor(start: int) -> None:
            end = min(start + _PARALLEL_CHUNK, n)
            _xor_into(self._stream(nonce, 1 + start // 64), data[start:end], out[start:end])

        pool = ThreadPoolExecutor(threads)
        futures: list = []
        pending = None  # (start, its first input bytes) of the piece being handed out
        try:
            for start in starts:
                pending = (start, bytes(data[start:start + 16]))
                _submit_piece(pool, futures, threads, xor, start)
                pending = None
            for start, future in zip(starts, futures):
                future.result()
                done(start, min(start + _PARALLEL_CHUNK, n))
            pool.shutdown(wait=True)  # inside: an interrupt while it waits is handled below
            return last() if last is not None else None  # a seal's tag: the input comes
            # back if it does not reach the caller
        except BaseException:  # noqa: B036 (an interrupt too: the input comes back)
            uninterrupted(self._stop_pieces, pool, futures, pending, nonce, data, out)
            raise

    def _xor(self, nonce, data, out):
        _xor_into(self._stream(nonce, 1), data, out)

    def _stream(self, nonce: bytes, counter: int):
        return in_place_stream(Cipher(algorithms.ChaCha20(
            self._key, struct.pack("<I", counter) + nonce), None).encryptor())

    def _stream_at(self, nonce):
        return lambda offset: (self._stream(nonce, 1 + offset // 64), 2**64)

    def _tag(self, nonce: bytes, ct: memoryview, aad: memoryview) -> bytes:
        mac = self._mac(nonce, aad)
        mac.update(ct)
        return mac.finalize()

    def _mac(self, nonce: bytes, aad: memoryview) -> Poly1305AeadMac:
        """The AEAD MAC under this nonce's one-time key (keystream block 0)."""
        from .._host_primitives import Poly1305AeadMac  # these fallbacks load it (start-up)

        return Poly1305AeadMac(self._stream(nonce, 0).update(bytes(32)), aad)


class _AesGcm(_OpenSslAead):
    _openssl_class = AESGCM

    def _native(self, nonce, data_len, aad_len):
        return 8 <= len(nonce) <= 128 and super()._native(nonce, data_len, aad_len)

    def _start(self, nonce):
        return self._j0(nonce)

    # OpenSSL's streaming GCM is one pass where it accepts the nonce: the detached form
    # prefers it (an in-place open rolls the buffer back if the tag fails).
    def _streaming(self, nonce: bytes, data_len: int, aad_len: int) -> bool:
        return self._native(nonce, 0, 0) and aad_len <= OPENSSL_AEAD_MAX

    # Above OpenSSL's one call (2**31 - 1 bytes), the combined forms take the streaming GCM
    # too where OpenSSL accepts the nonce: composed, an open read the ciphertext twice
    # (GHASH, then CTR), so a write to it between the passes (another thread, a file mapped
    # shared) gave plaintext no tag covered; streaming reads each block once for both.
    def seal(self, nonce, data, aad, out):
        n = len(data)
        if self._native(nonce, n, len(aad)) or not self._streaming(nonce, n, len(aad)):
            return super().seal(nonce, data, aad, out)
        out[n:] = self.seal_detached(nonce, data, aad, out[:n])

    def open(self, nonce, data, aad, out):
        n = len(data) - 16
        if n < 0 or self._native(nonce, n, len(aad)) or not self._streaming(nonce, n, len(aad)):
            return super().open(nonce, data, aad, out)
        try:
            return self._open_streaming(nonce, data[:n], data[n:], aad, out)
        except InvalidTag:  # in place, out has its ciphertext back: zeroed, as every open leaves it
            zero_surely(out)
            raise

    def seal_detached(self, nonce, data, aad, out, threads=1, one_pass=False,
                      shared_gil=False):  # one OpenSSL pass, the GIL released
        if len(data) <= ONE_SHOT_DETACHED_MAX or not self._streaming(nonce, len(data), len(aad)):
            return super().seal_detached(nonce, data, aad, out)
        if self._in_place_one_shot(nonce, data, aad, out, shared_gil):
            return self.seal_one_shot(nonce, data, aad, out)
        done = 0         # out[:done] holds ciphertext
        pending = None   # (end, its first plaintext bytes, its output) of the piece encrypted
        enc = None
        try:
            enc = in_place_stream(self._gcm(nonce).encryptor())
            enc.authenticate_additional_data(aad)
            for start in range(0, len(data), _PIECE):
                end = min(start + _PIECE, len(data))
                piece = out[start:end]
                pending = (end, bytes(data[start:start + 16]), piece)
                enc.update_into(data[start:end], piece)
                done, pending = end, None
            enc.finalize()
            return enc.tag
        except BaseException:  # noqa: B036 (an in-place buffer gets its plaintext back)
            uninterrupted(self._gcm_take_back, nonce, data, out, done, pending, enc, False)
            raise

    def open_detached(self, nonce, data, tag, aad, out, threads=1, one_pass=False,
                      shared_gil=False):
        if len(tag) != 16 or len(data) <= ONE_SHOT_DETACHED_MAX or \
                not self._streaming(nonce, len(data), len(aad)):
            return super().open_detached(nonce, data, tag, aad, out, one_pass=one_pass)
        if self._in_place_one_shot(nonce, data, aad, out, shared_gil):
            return self.open_one_shot(nonce, data, tag, aad, out, into_out=one_pass)
        return self._open_streaming(nonce, data, tag, aad, out)

    # In place where cryptography refuses it (51), the streaming form goes through a
    # window, and every window takes the GIL twice (after the cipher, after the copy):
    # on workers side by side (a state dict on 2 threads) the waits for it cost a third
    # (256 MiB in place, 2 threads, Intel Xeon: 5.5 GB/s, 7.0-7.3 this way). OpenSSL's
    # one-shot call through the thread's scratch takes it twice per message instead, as
    # ChaCha20-Poly1305's shared_gil form does.
    def _in_place_one_shot(self, nonce, data, aad, out, shared_gil: bool) -> bool:
        return shared_gil and not UPDATE_INTO_IN_PLACE and len(data) <= SHARED_GIL_ONE_SHOT_MAX \
            and self._native(nonce, len(data), len(aad)) and _same_memory(data, out)

    def _open_streaming(self, nonce, data, tag, aad, out):
        """One pass: OpenSSL's streaming GCM decrypts into ``out`` in ``_PIECE`` pieces (in
        place too: in and out the very same memory, which OpenSSL's EVP update allows),
        then checks the tag. If the call does not return (a wrong tag, or an interrupt
        such as KeyboardInterrupt between pieces), what was decrypted is taken back
        before the exception goes on: an in-place buffer is encrypted back (GCM
        encryption under the same nonce gives the same ciphertext), a separate one
        zeroed. The caller never sees unauthenticated plaintext; only another thread
        reading the buffer during the call could (the caller lent it to us)."""
        n = len(data)
        done = 0         # out[:done] holds plaintext
        pending = None   # (end, its first ciphertext bytes, its output) of the piece decrypted
        dec = None
        try:
            dec = in_place_stream(self._gcm(nonce).decryptor())
            dec.authenticate_additional_data(aad)
            for start in range(0, n, _PIECE):
                end = min(start + _PIECE, n)
                piece = out[start:end]
                pending = (end, bytes(data[start:start + 16]), piece)
                dec.update_into(data[start:end], piece)
                done, pending = end, None
            with held_interrupts():  # a Ctrl-C due as a wrong tag is raised: see open_one_shot
                dec.finalize_with_tag(bytes(tag))
        except BaseException:  # noqa: B036 (the plaintext goes back whatever stopped us)
            uninterrupted(self._gcm_take_back, nonce, data, out, done, pending, dec, True)
            raise

    def _gcm_take_back(self, nonce: bytes, data: memoryview, out: memoryview, done: int,
                       pending: tuple | None, stream, zero_apart: bool) -> None:
        """CTR once more over what a streaming seal or open (``stream``, its context) had
        transformed of an in-place buffer (GCM's keystream is the same both ways): its
        input back. A separate output is zeroed after an open (``zero_apart``); after a
        seal it holds only ciphertext."""
        if not _same_memory(data, out):
            if zero_apart:
                zero_surely(out)
            return
        done = _transformed_end(out, done, pending, stream)
        if done:
            _keystream_back(self._stream_at(self._j0(nonce)), out, [(0, done)])

    def _gcm(self, nonce: bytes) -> Cipher:
        return Cipher(algorithms.AES(self._key), modes.GCM(nonce))

    def _xor(self, j0, data, out):
        self._ctr(j0, data, out)

    def _j0(self, nonce: bytes) -> bytes:
        from .._host_primitives import gcm_j0

        return gcm_j0(self._key, nonce)

    def _ctr(self, j0: bytes, data: memoryview, out: memoryview) -> None:
        """GCTR from inc32(J0): ``cryptography``'s CTR carries across all 128 bits,
        GCM's inc32 wraps the low 32, so split where the low word wraps."""
        prefix, low = j0[:12], struct.unpack(">I", j0[12:])[0]
        first = (low + 1) & 0xFFFFFFFF
        blocks_before_wrap = 2**32 - first
        split = min(len(data), blocks_before_wrap * 16)
        _xor_into(self._ctr_stream(prefix, first), data[:split], out[:split])
        if split < len(data):
            _xor_into(self._ctr_stream(prefix, 0), data[split:], out[split:])

    def _stream_at(self, j0):
        prefix, low = j0[:12], struct.unpack(">I", j0[12:])[0]

        def at(offset: int):  # GCM's inc32: a stream up to where the low 32 bits wrap
            counter = (low + 1 + offset // 16) & 0xFFFFFFFF
            return self._ctr_stream(prefix, counter), offset + (2**32 - counter) * 16
        return at

    def _ctr_stream(self, prefix: bytes, low: int):
        return in_place_stream(Cipher(algorithms.AES(self._key),
                                      modes.CTR(prefix + struct.pack(">I", low))).encryptor())

    def _tag(self, j0: bytes, ct: memoryview, aad: memoryview) -> bytes:
        from .._host_primitives import gcm_tag

        return gcm_tag(self._key, j0, aad, ct)


_AEADS = {"chacha20-poly1305": _ChaCha20Poly1305, "aes-gcm": _AesGcm}


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one): the
    natural thread count, since ``cryptography`` releases the GIL while it works."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def check_threads(threads) -> int:
    """A thread count from a caller: a positive int, or None for :func:`usable_cores`."""
    if threads is None:
        return usable_cores()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive int or None, not {threads!r}")
    return threads


class ContextCache:
    """The :data:`CONTEXT_CACHE_SIZE` AEAD contexts made last, by algorithm and key identity.

    Identity is the key *object*: a ``bytes`` key (immutable) passed again is the same
    object (:func:`gpucrypt._buffers.bytes_arg` hands ``bytes`` through uncopied), and
    the entry holds a reference to it, so its ``id`` cannot be reused by another
    object while the entry lives. Why not the key's bytes: as dict keys they would be
    a second copy of every key, listed by anything that walks the cache (a debugger,
    ``gc.get_referents``) and compared with a variable-time ``memcmp``; a keyed hash of
    them (BLAKE2b under a per-process secret) measured at half the cost of the key
    schedule it would save. Nothing here is logged or shown (``repr`` gives the count).
    Mutable keys (``bytearray``) are never cached: their bytes could change under the
    same identity. The contexts hold the key schedule anyway; the bound keeps at most
    that many keys alive after their callers dropped them, and :meth:`clear` drops
    them all. Thread-safe; the contexts themselves may be used by several threads at
    once (each call makes its own OpenSSL context from theirs).
    """

    def __init__(self, size: int = CONTEXT_CACHE_SIZE):
        self._size = size
        self._entries: OrderedDict = OrderedDict()  # (algorithm, id(key)) -> (key, context)
        self._lock = _thread.allocate_lock()  # threading.Lock; threading itself loads with a pool
        # the entry used last, tested first: one identity test for a caller repeating its
        # key (a 4 KiB tensor's whole call is a few microseconds); replaced in one store
        self._last: tuple = ("", None, None)

    def get(self, algorithm: str, key: bytes) -> AeadContext:
        last = self._last
        if last[1] is key and last[0] == algorithm:
            return last[2]
        if type(key) is not bytes:
            return _AEADS[algorithm](bytes_arg(key, "key"))  # bytes(16): a key of zeros
        slot = (algorithm, id(key))
        entry = self._entries.get(slot)  # a hit takes no lock (one dict lookup is atomic)
        if entry is not None and entry[0] is key:
            self._last = (algorithm, key, entry[1])
            return entry[1]
        ctx = _AEADS[algorithm](key)  # outside the lock: the key schedule takes microseconds
        with self._lock:
            self._entries[slot] = (key, ctx)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)  # the oldest entry first
            self._last = (algorithm, key, ctx)
        return ctx

    def clear(self) -> None:
        """Drop every context (and the references to the keys they were made from)."""
        with self._lock:
            self._entries.clear()
            self._last = ("", None, None)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:  # never shows a key
        return f"ContextCache({len(self._entries)} of {self._size})"


class CpuBackend(Backend):
    name = "cpu"

    def __init__(self):
        self.contexts = ContextCache()

    def aead(self, algorithm, key):
        return self.contexts.get(algorithm, key)

    # A batch's messages that OpenSSL's one call takes get its allocating form: one bytes
    # object each, not a zeroed buffer filled and then copied (6-8% of a batch of 1 KiB
    # messages, whose per-message argument checks cost more); the others the composed form.
    def _seal_one(self, ctx, nonce, data, aad):
        if ctx._native(nonce, len(data), len(aad)):
            return ctx.openssl.encrypt(nonce, data, aad)
        return super()._seal_one(ctx, nonce, data, aad)

    def _open_one(self, ctx, nonce, data, aad):
        if ctx._native(nonce, len(data) - 16, len(aad)):
            return ctx.openssl.decrypt(nonce, data, aad)
        return super()._open_one(ctx, nonce, data, aad)

    def aead_for_nonce(self, algorithm, key, nonce):
        if algorithm == "xchacha20-poly1305":  # a subkey per nonce: nothing worth caching
            from .._host_primitives import xchacha20_key_nonce

            subkey, nonce = xchacha20_key_nonce(key, nonce)
            return _AEADS["chacha20-poly1305"](subkey), nonce
        return self.aead(algorithm, key), nonce

    def xor_keystream(self, algorithm, key, iv, position, data, out):
        if algorithm == "chacha20":  # cryptography's own check cannot see ``position``
            from .._limits import check_chacha20_keystream  # here: `gpucrypt encrypt` skips it

            check_chacha20_keystream(iv, position, len(data))
        encryptor = self.keystream_encryptor(algorithm, key, iv, position)
        _xor_into(encryptor, data, out)

    @staticmethod
    def keystream_cipher(algorithm: str, key: bytes, iv: bytes):
        """``cryptography``'s ``Cipher`` for ``algorithm`` from keystream byte 0 (its
        ``encryptor()`` may be called any number of times)."""
        if algorithm == "chacha20":
            return Cipher(algorithms.ChaCha20(key, iv), None)
        return Cipher(algorithms.AES(key), modes.CTR(iv))

    @staticmethod
    def keystream_encryptor(algorithm: str, key: bytes, iv: bytes, position: int):
        """A ``cryptography`` encryptor positioned at byte ``position`` of the keystream,
        able to work in place (:func:`in_place_stream`)."""
        if position == 0:  # the common case: a fresh context
            return in_place_stream(CpuBackend.keystream_cipher(algorithm, key, iv).encryptor())
        block = 64 if algorithm == "chacha20" else 16
        skip_blocks, skip_bytes = divmod(position, block)
        if algorithm == "chacha20":
            counter = struct.unpack("<I", iv[:4])[0] + skip_blocks
            enc = Cipher(algorithms.ChaCha20(key, struct.pack("<I", counter) + iv[4:]), None).encryptor()
        else:
            cb = (int.from_bytes(iv, "big") + skip_blocks) % 2**128
            enc = Cipher(algorithms.AES(key), modes.CTR(cb.to_bytes(16, "big"))).encryptor()
        if skip_bytes:
            enc.update(bytes(skip_bytes))
        return in_place_stream(enc)

    def describe(self):
        import cryptography
        from cryptography.hazmat.backends.openssl.backend import backend as openssl

        return {"name": self.name, "library": f"cryptography {cryptography.__version__}",
                "openssl": openssl.openssl_version_text()}
