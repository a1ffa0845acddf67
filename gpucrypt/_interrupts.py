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
"""
from __future__ import annotations

import _signal
import _thread
import sys
import weakref
from typing import Any, Callable

_SIGINT = _signal.SIGINT
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
