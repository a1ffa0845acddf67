"""The README's examples run as written: every ``python`` block, the marked ones (after an
``<!-- example: NAME -->`` line) with checks of what they print."""
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


def _unmarked_blocks() -> list[str]:
    text = open(README).read()
    blocks = re.findall(r"(<!-- example: \w+ -->\n)?```python\n(.*?)```", text, re.S)
    assert len(blocks) >= len(_examples()) + 3, "README lost its python blocks"
    return [code for marker, code in blocks if not marker]


@pytest.mark.parametrize("index", range(len(_unmarked_blocks())))
def test_every_other_python_block_runs(index, tmp_path, monkeypatch):
    """Each python block without a marker runs on its own, as a reader would paste it (the
    marked ones run above)."""
    monkeypatch.chdir(tmp_path)
    exec(compile(_unmarked_blocks()[index], f"README.md:python block {index}", "exec"),
         {"__name__": "__readme__"})


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


def _main_command() -> str:
    block = re.search(r"<!-- main-command -->\n```\n(.*?)\n```", open(README).read(), re.S)
    assert block, "README has no main command"
    return block.group(1)


def test_main_command_installs_the_gpu_stack():
    """A fresh clone's main command installs the gpu extra, and that extra is numba-cuda
    and CuPy: on a GPU machine the main job then runs on the GPU."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli", reason="Python 3.10 reads pyproject.toml with tomli")
    assert re.search(r"""pip install -e "\.\[gpu\]" """, _main_command() + " "), _main_command()
    with open(os.path.join(os.path.dirname(README), "pyproject.toml"), "rb") as f:
        extra = tomllib.load(f)["project"]["optional-dependencies"]["gpu"]
    assert any(r.startswith("numba-cuda") for r in extra) and any(r.startswith("cupy") for r in extra)


def test_without_a_gpu_info_says_why_and_the_selftest_passes_on_the_cpu():
    """What the main command shows on a machine with no GPU: the reason the GPU backend
    is unavailable, and a selftest that passes on the CPU (no simulator here: the
    environment is that of a user's machine)."""
    import ctypes.util
    import glob

    if glob.glob("/dev/nvidia[0-9]*") or ctypes.util.find_library("cuda"):
        pytest.skip("this machine has an NVIDIA driver: test_main_command_runs_here covers it")
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_ENABLE_CUDASIM", "GPUCRYPT_DEVICE")}
    info = subprocess.run([sys.executable, "-m", "gpucrypt", "info"], capture_output=True, text=True,
                          timeout=300, env=env)
    assert info.returncode == 0, info.stderr
    assert "backend gpu unavailable: no CUDA driver library (libcuda) can be loaded" in info.stdout
    selftest = subprocess.run([sys.executable, "-m", "gpucrypt", "selftest", "--size", "4096"],
                              capture_output=True, text=True, timeout=300, env=env)
    assert selftest.returncode == 0, selftest.stderr
    assert "ok" in selftest.stdout and "FAILED" not in selftest.stdout
    assert {line.split()[0] for line in selftest.stdout.splitlines() if line.strip()} == {"cpu"}


def test_benchmark_results_pages_are_current():
    """benchmarks/RESULTS.md and the README's results section are what the recorded JSON
    renders to (every results file has a renderer, and nobody edited the pages by hand)."""
    script = os.path.join(os.path.dirname(README), "benchmarks", "make_results_md.py")
    done = subprocess.run([sys.executable, script, "--check"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
