"""Running a snippet where numba's CUDA simulator is off, as a user's process is: the
suite's own process runs under it (tests/conftest.py), where a "GPU" is always there."""
from __future__ import annotations

import os
import subprocess
import sys


def run_outside_simulator(code: str, cwd) -> tuple[str, bool]:
    """(what ``code`` printed, whether the GPU backend runs in such a process); a failure
    of ``code`` itself fails the test that called this."""
    environment = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    done = subprocess.run([sys.executable, "-c", code], env=environment, cwd=cwd,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    has_gpu = subprocess.run([sys.executable, "-c", "from gpucrypt.backends import "
                              "available_backends; print('gpu' in available_backends())"],
                             env=environment, capture_output=True, text=True,
                             timeout=120).stdout.strip() == "True"
    return done.stdout, has_gpu


def assert_gpu_call_refused_outside_simulator(setup: str, call: str, cwd) -> None:
    """Run ``setup`` then ``call`` (Python lines) where the simulator is off: ``call`` must
    run where the GPU backend runs, and raise BackendUnavailable where it does not (not
    another error, nor later)."""
    code = (f"{setup}\n"
            f"from gpucrypt import BackendUnavailable\n"
            f"try:\n"
            f"    {call}\n"
            f"    print('ran on a GPU')\n"
            f"except BackendUnavailable as exc:\n"
            f"    print('BackendUnavailable:', exc)\n")
    printed, has_gpu = run_outside_simulator(code, cwd)
    assert printed.startswith("ran on a GPU" if has_gpu else "BackendUnavailable:"), printed
