"""The README's examples run as written (the blocks after an ``<!-- example: NAME -->`` line)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


def _examples() -> dict[str, str]:
    text = open(README).read()
    found = dict(re.findall(r"<!-- example: (\w+) -->\n```python\n(.*?)```", text, re.S))
    assert found, "README has no marked examples"
    return found


@pytest.mark.parametrize("name", ["tensors", "keys", "distributed"])
def test_readme_example_runs(name, tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch") if name in ("tensors", "distributed") else None
    monkeypatch.chdir(tmp_path)
    exec(compile(_examples()[name], f"README.md:{name}", "exec"), {"__name__": "__readme__"})
    if name == "keys":
        out = capsys.readouterr().out
        assert "bob: no recipient in this file matches your key(s)" in out
        assert "file.rekey" in out


@pytest.mark.gpu
def test_readme_tensor_example_on_the_gpu(monkeypatch, tmp_path):
    """Issue 5's "done when": the README's state-dict example, run where torch has CUDA,
    encrypts a model on the GPU in place and gets it back bit-identical."""
    import torch

    assert torch.cuda.is_available(), "torch has no CUDA device here"
    monkeypatch.chdir(tmp_path)
    scope = {"__name__": "__readme__"}
    exec(compile(_examples()["tensors"], "README.md:tensors", "exec"), scope)
    assert scope["device"] == "cuda"
    assert all(t.is_cuda for t in scope["restored"].values())


def test_readme_commands_agree_with_ci():
    """.ci/run executes the README's test command, read from the README itself."""
    text = open(README).read()
    block = re.search(r"<!-- test-command -->\n```\n(.*?)\n```", text, re.S)
    assert block and "pytest" in block.group(1)
    ci = open(os.path.join(os.path.dirname(README), ".ci", "run")).read()
    assert "<!-- test-command -->" in ci


def test_main_command_runs_here():
    """The quick start's first command after installation: info and the selftest."""
    for args in (["info"], ["selftest", "--size", "4096"]):
        result = subprocess.run([sys.executable, "-m", "gpucrypt", *args], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout and "FAILED" not in result.stdout


def test_benchmark_results_pages_are_current():
    """benchmarks/RESULTS.md and the README's results section are what the recorded JSON
    renders to (every results file has a renderer, and nobody edited the pages by hand)."""
    script = os.path.join(os.path.dirname(README), "benchmarks", "make_results_md.py")
    done = subprocess.run([sys.executable, script, "--check"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
