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

:func:`held_interrupts` holds SIGINT's handler back over a block; a Ctrl-C that comes
meanwhile is handed to that handler as the block ends (KeyboardInterrupt, then, with
Python's default handler). :func:`uninterrupted` runs a clean-up so. Each costs a
``signal.getsignal`` and two ``signal.signal`` calls: 8-20 us on the 2-core Xeon here,
so they guard failing paths and rare steps, not every call.

Limits: Python runs signal handlers in the main thread only, so elsewhere the block simply
runs (no KeyboardInterrupt is raised in other threads). Only SIGINT is held: a program
that turns other signals into exceptions keeps its own handlers. A Ctrl-C whose handler is
already due as the block is entered (it came during the very call that failed) is raised
before the block begins.
"""
from __future__ import annotations

import signal
import threading
from typing import Any, Callable


class held_interrupts:
    """``with held_interrupts(): ...``: the block runs to its end even if Ctrl-C comes
    meanwhile; that Ctrl-C is then handed to SIGINT's handler, whose exception goes on
    from the ``with``."""

    __slots__ = ("_came", "_previous", "_stopped")

    def __enter__(self) -> "held_interrupts":
        self._came: list = []
        self._previous = self._stopped = None
        if threading.current_thread() is not threading.main_thread() or \
                signal.getsignal(signal.SIGINT) is None:  # None: not Python's to set back
            return self
        while True:
            try:  # signal.signal first runs a handler already due: that Ctrl-C waits too
                self._previous = signal.signal(signal.SIGINT,
                                               lambda signum, frame: self._came.append(signum))
                return self
            except KeyboardInterrupt as exc:
                self._stopped = self._stopped or exc
            except ValueError:  # signals are not this interpreter's (a sub-interpreter)
                return self

    def __exit__(self, *exc_info: Any) -> None:
        previous = self._previous
        if previous is None:
            return
        signal.signal(signal.SIGINT, previous)  # a Ctrl-C due now goes to ours: _came
        if self._stopped is not None:
            raise self._stopped
        if self._came:
            if callable(previous):
                previous(signal.SIGINT, None)
            elif previous == signal.SIG_DFL:
                signal.raise_signal(signal.SIGINT)


def uninterrupted(cleanup: Callable[..., Any], *args: Any) -> Any:
    """``cleanup(*args)`` run to its end even if Ctrl-C comes meanwhile (see
    :class:`held_interrupts`)."""
    with held_interrupts():
        return cleanup(*args)
