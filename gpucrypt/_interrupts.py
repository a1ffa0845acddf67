"""Steps that a Ctrl-C cannot cut in two.

A piecewise seal or open that stops part-way (a wrong tag, an error, Ctrl-C) puts the
caller's buffer back before the exception goes on: in place, the keystream once more over
what it had transformed; apart, zeroes. That clean-up takes about as long as the work it
undoes, so a KeyboardInterrupt can well arrive inside it: Ctrl-C pressed as a forged
message's tag was being handled, or pressed twice. Raised there, it left the buffer part
plaintext, part ciphertext (14 of 113 interrupted 2 MiB in-place opens of a forged message
on worker threads, with a real SIGINT at a random moment). Handing a piece to a worker is
such a step too: interrupted inside ``submit``, the piece was queued, its thread started,
but the pool knew neither, and a clean-up that had already looked found the piece
untouched before the orphan thread decrypted it.

:class:`held_interrupts` holds SIGINT's handler back over a block; a Ctrl-C that comes
meanwhile is handed to that handler as the block ends (KeyboardInterrupt, then, with
Python's default handler). :func:`uninterrupted` runs a clean-up so. A hold costs about a
microsecond (``_signal``'s own calls: ``signal.signal``'s enum conversions cost 4 us).

The holder repairs itself: should the block end without putting the handler back (an
exception from another signal's handler, a SIGALRM timeout say, landing as ``with``
enters or leaves), the object is dropped with the exception and sets the handler back
(a Ctrl-C it had held then is lost: there is no way to raise it from there); a holder
left in place finds its block gone or no longer active at the next Ctrl-C, sets the
handler back and hands that Ctrl-C on. Ctrl-C is never turned off for good.

Limits: Python runs signal handlers in the main thread only, so elsewhere the block simply
runs (no KeyboardInterrupt is raised in other threads). Only SIGINT is held: a program
that turns other signals into exceptions keeps its own handlers. A Ctrl-C whose handler is
already due as the block is entered (it came during the C call that failed, such as a
tag check) is raised as the block is entered, before the clean-up: callers whose failing
call is long hold the interrupt across that call too.

Other signals' exceptions (a SIGALRM handler's TimeoutError, a SIGTERM handler's
``sys.exit``) are not held, so what must not be left half done does not rely on holding:
:func:`zero_surely`, the zeroing of an output that may hold a forged message's plaintext,
goes on through any exception and raises the first once it is done; the piecewise seals
and opens of the CPU backend (one-pass, streaming GCM) know how far a piece stopped being
written (:class:`gpucrypt.backends.cpu.InPlaceStream` counts its windows), so that their
clean-up takes back exactly that much; and that clean-up (the keystream once more, to give
an in-place buffer its input back) goes on through such exceptions in the same way. Not
yet the composed forms past OpenSSL's one call (2 GiB), whose keystream, held for SIGINT,
runs in several calls: another signal's exception there leaves the buffer part
transformed. And Python code can always be cut somewhere: a handler due as such a
function is called runs at its first line, before it can catch anything (see
:func:`zero_surely` for how callers meet that), and a second one raising in the few
instructions between catching the first and trying again ends the run there.
"""
from __future__ import annotations

import _signal
import _thread
import sys
import weakref
from typing import Any, Callable

_SIGINT = _signal.SIGINT
#: what :func:`zero_surely` copies over a buffer, a step at a time: one step is all that an
#: exception can make it do again (made here, so that zeroing allocates nothing)
_ZEROS = memoryview(bytes(64 << 10))
#: tries in a row that made no progress after which a clean-up that goes on through
#: exceptions gives up and raises: signals do not come that fast; an error of its own does
GIVE_UP_AFTER = 32
#: the main thread's id, once a hold has succeeded there (``threading`` tells it at once,
#: but costs the command line its import): other threads then skip the attempt
_main_thread: list = [None]


def _hand_on(handler: Any, frame: Any) -> None:
    """Give a held Ctrl-C to ``handler``, as the interpreter would have."""
    if callable(handler):
        handler(_SIGINT, frame)
    elif handler == _signal.SIG_DFL:
        _signal.raise_signal(_SIGINT)  # the default action: the process ends


def _holder(block: "weakref.ref", saved: Any) -> Callable[[int, Any], None]:
    """SIGINT's handler while ``block`` (a :class:`held_interrupts`) is active: it notes
    the Ctrl-C. Once the block is not (over without having set the handler back, or
    gone), it sets ``saved`` back and hands the Ctrl-C on."""
    def hold(signum: int, frame: Any) -> None:
        this = block()
        if this is not None and this._active:
            this._came.append(signum)
            return
        _signal.signal(_SIGINT, saved)
        _hand_on(saved, frame)
    return hold


class held_interrupts:
    """``with held_interrupts(): ...``: the block runs to its end even if Ctrl-C comes
    meanwhile; that Ctrl-C is then handed to SIGINT's handler, whose exception goes on
    from the ``with``."""

    __slots__ = ("_came", "_saved", "_hold", "_active", "_stopped", "__weakref__")

    def __enter__(self) -> "held_interrupts":
        self._came: list = []
        self._saved = self._hold = self._stopped = None
        self._active = False
        if _main_thread[0] is not None and _thread.get_ident() != _main_thread[0]:
            return self  # only the main thread runs signal handlers: nothing to hold here
        while True:
            try:
                saved = _signal.getsignal(_SIGINT)
                if saved is None:  # not Python's: nothing to set back
                    return self
                if self._hold is None or saved is not self._hold:  # a retry finds ours there
                    self._saved, self._hold = saved, _holder(weakref.ref(self), saved)
                _signal.signal(_SIGINT, self._hold)
                self._active = True
                _main_thread[0] = _thread.get_ident()  # it succeeds in the main thread only
                return self
            except KeyboardInterrupt as exc:  # a Ctrl-C already due (run by these calls, or
                self._stopped = self._stopped or exc  # handed on by an inactive holder)
            except ValueError:  # not the main thread (whose alone signals are: no Ctrl-C is
                return self      # raised elsewhere), or not the main interpreter

    def __exit__(self, *exc_info: Any) -> None:
        if not self._active:
            if self._stopped is not None:
                raise self._stopped
            return
        self._active = False  # from here a Ctrl-C is handed on at once (see _holder)
        _signal.signal(_SIGINT, self._saved)
        if self._stopped is not None:
            raise self._stopped
        if self._came:
            _hand_on(self._saved, sys._getframe(1))

    def __del__(self) -> None:
        # __exit__ never ran (another signal's handler raised as the with called it): set
        # the handler back. A Ctrl-C held meanwhile is lost: raised here, it could only be
        # ignored (an exception in __del__), and sent again it is handled here at once
        if getattr(self, "_active", False):
            self._active = False
            if _signal.getsignal(_SIGINT) is self._hold:
                _signal.signal(_SIGINT, self._saved)


def uninterrupted(cleanup: Callable[..., Any], *args: Any) -> Any:
    """``cleanup(*args)`` run to its end even if Ctrl-C comes meanwhile (see
    :class:`held_interrupts`)."""
    with held_interrupts():
        return cleanup(*args)


def zero_surely(buf: Any, as_view: Callable[[Any], memoryview] = memoryview,
                stopped: BaseException | None = None, progress: list | None = None) -> None:
    """Overwrite ``buf`` (``as_view(buf)``, a flat writable byte view) with zeros to its
    end whatever exceptions come meanwhile (signal handlers': Ctrl-C, a SIGALRM timeout,
    a SIGTERM handler's ``sys.exit``), then raise ``stopped`` or else the first of them:
    after a wrong tag, no unauthenticated plaintext stays there. An exception costs the
    step it stopped (a C copy of 64 KiB; a handler runs after it), not the zeroing so
    far, so that signals coming faster than a whole zeroing cannot hold it back for
    ever; nothing is allocated, so every exception is taken for a signal's.

    A handler already due as this is called (its signal came during the C call that
    failed) runs at this function's first line, before anything here can catch it; so
    where one may be, as after OpenSSL's decryption, call it as below. ``progress``
    (``[0]`` at first: how far it went, ``-1`` once done) lets the second call go on
    from where the first stopped, or find it done::

        zeroing = [0]
        try:
            zero_surely(out, progress=zeroing)
        except BaseException as exc:  # a signal due as it began
            zero_surely(out, stopped=exc, progress=zeroing)
    """
    if progress is None:
        progress = [0]
    view, stuck = None, 0
    while True:
        before = progress[0]
        try:
            if progress[0] >= 0:
                view = as_view(buf)
                while progress[0] < len(view):
                    start = progress[0]
                    end = min(start + len(_ZEROS), len(view))
                    view[start:end] = _ZEROS[:end - start]
                    progress[0] = end
                progress[0] = -1
            break
        except BaseException as exc:  # noqa: B036 (zeroed first, whatever came)
            if stopped is None:
                stopped = exc
            # an error that comes back at every try, with no step done (a buffer that
            # cannot be written: TypeError), is the buffer's, not a signal's: it ends here
            stuck = stuck + 1 if progress[0] == before else 0
            if stuck >= GIVE_UP_AFTER:
                break
    if stopped is not None:
        try:
            raise stopped
        finally:  # this frame goes with the exception: no cycle through it to the
            del stopped, view  # exception, no view to keep buf exported (an mmap unclosable)
