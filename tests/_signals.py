"""A real child process for tests that send it a real signal at a chosen moment (the
signal cleanup of :mod:`gpucrypt.files._atomic`): the child prints a line when it has
reached that moment and then waits; the test reads the line, looks at the files, and
signals it."""
from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from typing import Any, Callable, Iterator


@contextlib.contextmanager
def python_child(code: str, *args: str, env: dict | None = None) -> Iterator[subprocess.Popen]:
    """``python -c code args...`` with text pipes; killed and reaped however the block ends."""
    child = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    try:
        yield child
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
        child.stderr.close()


def dies_of(child: subprocess.Popen, signame: str) -> None:
    """Send ``signame`` and check the child died of it (its stderr shown if not)."""
    signum = getattr(signal, signame)
    child.send_signal(signum)
    assert child.wait(timeout=60) == -signum, child.stderr.read()


def forged_opens_cut_by_alarms(open_forged: Callable[[Any], Any], new_out: Callable[[], Any],
                               plaintext_left: Callable[[Any], bool],
                               seconds: float = 0.7) -> tuple[int, int]:
    """``open_forged(out)`` (a decryption of a forged message into ``out = new_out()``) again
    and again for ``seconds``, each under one real SIGALRM, due after a delay that sweeps
    2 us to 0.5 ms, whose handler raises TimeoutError, as timeout libraries do: (how many
    opens a timeout cut as the tag failed, how many of those left
    ``plaintext_left(out)``). One alarm per open, not a periodic timer: a second signal
    raising in the instructions between a clean-up's catching the first and its retry
    ends any Python clean-up (see gpucrypt._interrupts), which a loaded machine's
    scheduler made a periodic one do now and then. SIGINT's handler is put back
    afterwards: a with block a timeout broke into as it began may leave its holder."""
    import time

    from cryptography.exceptions import InvalidTag

    armed = [False]

    def timeout(signum, frame):
        if armed[0] and frame.f_code.co_name != "__del__":  # never inside a finaliser
            raise TimeoutError("deadline")
    delays = [2e-6 * 1.25 ** k for k in range(25)]  # 2 us .. 0.4 ms
    previous_int = signal.getsignal(signal.SIGINT)
    previous = signal.signal(signal.SIGALRM, timeout)
    interrupted = left = rounds = 0
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            out = new_out()
            try:
                signal.setitimer(signal.ITIMER_REAL, delays[rounds % len(delays)])
                rounds += 1
                armed[0] = True
                try:
                    open_forged(out)
                finally:
                    armed[0] = False
                    signal.setitimer(signal.ITIMER_REAL, 0)
            except InvalidTag:
                pass
            except TimeoutError as exc:
                if isinstance(exc.__context__, InvalidTag):  # came as the tag failed
                    interrupted += 1
                    left += bool(plaintext_left(out))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        signal.signal(signal.SIGINT, previous_int)
    return interrupted, left
