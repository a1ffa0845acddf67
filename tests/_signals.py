"""A real child process for tests that send it a real signal at a chosen moment (the
signal cleanup of :mod:`gpucrypt.files._atomic`): the child prints a line when it has
reached that moment and then waits; the test reads the line, looks at the files, and
signals it."""
from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from typing import Iterator


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
