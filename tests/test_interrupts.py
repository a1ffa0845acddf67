"""gpucrypt._interrupts: clean-ups that a Ctrl-C (a real SIGINT) cannot cut in two, and a
zeroing that no signal handler's exception cuts short."""
from __future__ import annotations

import os
import signal
import sys
import threading

import pytest

from gpucrypt._interrupts import held_interrupts, uninterrupted


def _steps_with_a_ctrl_c_after(first: int, steps: int, done: list) -> None:
    for step in range(steps):
        if step == first:
            signal.raise_signal(signal.SIGINT)  # its handler runs at the next call
        done.append(step)


def test_a_ctrl_c_inside_waits_for_the_end_then_goes_on():
    done: list = []
    with pytest.raises(KeyboardInterrupt):
        uninterrupted(_steps_with_a_ctrl_c_after, 1, 5, done)
    assert done == [0, 1, 2, 3, 4]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_without_held_interrupts_the_same_steps_are_cut_short():
    """The control: the steps above with nothing holding the Ctrl-C back (its handler
    runs as raise_signal returns)."""
    done: list = []
    with pytest.raises(KeyboardInterrupt):
        _steps_with_a_ctrl_c_after(1, 5, done)
    assert done == [0]


def test_a_ctrl_c_already_due_waits_too(monkeypatch):
    """A handler already due runs as the holder is installed (KeyboardInterrupt from
    inside ``__enter__``): the holder is installed all the same, the block runs, and
    that interrupt goes on after it."""
    import _signal

    real, calls = _signal.signal, []

    def due_first(signum, handler):
        calls.append(handler)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(signum, handler)
    monkeypatch.setattr(_signal, "signal", due_first)
    done: list = []
    with pytest.raises(KeyboardInterrupt):
        with held_interrupts():
            done.append("block")
    assert done == ["block"] and len(calls) == 3  # tried, installed, set back
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_holder_left_installed_sets_the_handler_back_at_the_next_ctrl_c(monkeypatch):
    """Another signal's handler raising (a timeout, say) right after the holder went in,
    before the block began: the exception leaves the ``with``, the holder stays installed
    and inactive. A later Ctrl-C was swallowed for good; now it puts the handler back
    and goes on as KeyboardInterrupt."""
    import _signal

    real = _signal.signal

    def then_a_timeout(signum, handler):
        previous = real(signum, handler)
        if handler is not signal.default_int_handler:
            raise TimeoutError("another signal's handler")
        return previous
    monkeypatch.setattr(_signal, "signal", then_a_timeout)
    with pytest.raises(TimeoutError):
        with held_interrupts():
            pass
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler  # left there
    with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_result_and_no_interrupt_pass_through():
    assert uninterrupted(sum, [1, 2, 3]) == 6
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_other_handlers_are_given_the_ctrl_c_afterwards(monkeypatch):
    seen: list = []
    monkeypatch.setattr(signal, "SIGINT", signal.SIGINT)
    previous = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    try:
        done: list = []
        uninterrupted(_steps_with_a_ctrl_c_after, 0, 3, done)
        assert done == [0, 1, 2] and seen == [signal.SIGINT]
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        uninterrupted(_steps_with_a_ctrl_c_after, 0, 2, done)  # ignored: stays ignored
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_other_threads_run_the_clean_up_as_it_is():
    """Handlers run in the main thread only: a worker cannot swap them, nor needs to."""
    result: list = []
    worker = threading.Thread(target=lambda: result.append(uninterrupted(len, "four")))
    worker.start()
    worker.join()
    assert result == [4]


def test_a_block_whose_exit_never_ran_sets_the_handler_back_when_dropped():
    """``with`` calls ``__exit__``, and another signal's handler can raise at its very
    first line: the holder stayed active, and every later Ctrl-C was noted and lost.
    Dropped with the exception, the object sets the handler back."""
    block = held_interrupts()
    block.__enter__()
    assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    del block
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)


class _ViewRaising:
    """A byte view of ``buf`` whose writes raise, as they return, the next of ``errors``
    (an exception class, or None for none) as a signal's handler would there (it runs
    after a C call), then None for ever after."""

    def __init__(self, buf: bytearray, errors: list):
        self.view, self.errors, self.raised = memoryview(buf), list(errors), []

    def __len__(self) -> int:
        return len(self.view)

    def __setitem__(self, key, value) -> None:
        self.view[key] = value
        error = self.errors.pop(0) if self.errors else None
        if error is not None:
            self.raised.append(error)
            raise error(f"raised at write {len(self.raised)}")


def test_a_zeroing_goes_on_through_any_exception_then_raises_the_first():
    """After a wrong tag the output is zeroed, and a signal's handler raising meanwhile (a
    SIGALRM timeout, a SIGTERM handler's sys.exit: nothing holds them) stopped the zeroing
    with unauthenticated plaintext left. It goes on to the end; the first exception goes
    on from there."""
    from gpucrypt import _interrupts

    buf = bytearray(os.urandom(5 * len(_interrupts._ZEROS) + 3))
    view = _ViewRaising(buf, [None, TimeoutError, None, SystemExit])
    with pytest.raises(TimeoutError, match="raised at write 1"):
        _interrupts.zero_surely(buf, lambda b: view)
    assert view.raised == [TimeoutError, SystemExit] and buf == bytes(len(buf))


def test_a_zeroing_goes_on_from_where_it_was_stopped():
    """Signals coming faster than a whole zeroing (an exception at every other step): each
    run goes on from where the last stopped, so that it ends, each exception costing a
    step; started again from the beginning, it never would."""
    from gpucrypt import _interrupts

    steps = 16
    buf = bytearray(os.urandom(steps * len(_interrupts._ZEROS)))
    view = _ViewRaising(buf, [None, TimeoutError] * 1000)
    with pytest.raises(TimeoutError):
        _interrupts.zero_surely(buf, lambda b: view)
    assert buf == bytes(len(buf)) and len(view.raised) <= steps, len(view.raised)


def test_a_zeroing_stopped_as_it_began_is_finished_by_the_second_call():
    """A handler already due as the zeroing is called (its signal came during the C call
    that failed) raises at the function's first line, before it can catch anything: the
    caller calls it again (the documented form), which zeroes, then raises that
    exception. A second call after a first that finished zeroing does not zero again."""
    from gpucrypt._interrupts import zero_surely

    views: list = []

    def as_view(buf):
        views.append(None)
        return memoryview(buf)

    def stopped_at_its_call(frame, event, arg):
        if frame.f_code is zero_surely.__code__ and event == "call" and not views:
            raise TimeoutError("due as it began")
        return None
    buf, zeroing = bytearray(os.urandom(1000)), [0]
    sys.settrace(stopped_at_its_call)
    try:
        with pytest.raises(TimeoutError, match="due as it began"):
            try:
                zero_surely(buf, as_view, progress=zeroing)
            except BaseException as exc:
                sys.settrace(None)
                zero_surely(buf, as_view, exc, zeroing)
    finally:
        sys.settrace(None)
    assert buf == bytes(1000) and zeroing == [-1] and len(views) == 1
    with pytest.raises(KeyboardInterrupt):  # done: raised, nothing zeroed again
        zero_surely(buf, as_view, KeyboardInterrupt(), zeroing)
    assert len(views) == 1


def test_a_zeroing_of_a_buffer_it_cannot_write_raises_instead_of_trying_for_ever():
    """zero_surely takes every exception for a signal's and tries again: an error that
    comes back at every try (a read-only buffer's TypeError) spun for ever. It gives up
    after GIVE_UP_AFTER tries in a row that made no progress, raising that error."""
    from gpucrypt._interrupts import zero_surely

    with pytest.raises(TypeError):
        zero_surely(bytes(10))
    progress = [0]
    with pytest.raises(TimeoutError):  # a signal's first: raised once the buffer's own gives up
        zero_surely(bytes(10), stopped=TimeoutError("deadline"), progress=progress)
