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
    """``signal.signal`` runs a handler already due before it installs the new one (so
    raises KeyboardInterrupt, nothing installed): the holder is installed all the same,
    the block runs, and that interrupt goes on after it."""
    real, calls = signal.signal, []

    def due_first(signum, handler):
        calls.append(handler)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(signum, handler)
    monkeypatch.setattr(signal, "signal", due_first)
    done: list = []
    with pytest.raises(KeyboardInterrupt):
        with held_interrupts():
            done.append("block")
    assert done == ["block"] and len(calls) == 3  # tried, installed, set back
    assert real(signal.SIGINT, signal.default_int_handler) is signal.default_int_handler


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
