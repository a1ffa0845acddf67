"""gpucrypt._interrupts: clean-ups that a Ctrl-C (a real SIGINT) cannot cut in two."""
from __future__ import annotations

import signal
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
