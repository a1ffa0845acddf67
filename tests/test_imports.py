"""What importing gpucrypt loads: no numpy, torch, numba, safetensors, JAX or CuPy for
``import gpucrypt`` and the primitives; the CLI imports only the command it runs.

Each check runs in a fresh interpreter (``sys.executable``), since this process has
long imported everything.
"""
from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

from gpucrypt.cli import SUBCOMMANDS

HEAVY = ("numpy", "torch", "numba", "safetensors", "jax", "cupy")


def loaded_after(code: str, cwd=None) -> dict:
    """Run ``code`` in a fresh interpreter; it leaves its result in ``result`` (JSON-able).
    Returns ``{"result": ..., "modules": sorted sys.modules}``."""
    script = (f"import json, sys\nresult = None\n{code}\n"
              "print(json.dumps({'result': result, 'modules': sorted(sys.modules)}))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=cwd, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def heavy_in(modules: list[str], names=HEAVY) -> list[str]:
    return [m for m in modules if m.split(".")[0] in names]


@pytest.mark.parametrize("module", ["gpucrypt", "gpucrypt.keys", "gpucrypt.ciphers",
                                    "gpucrypt.aead", "gpucrypt.backends"])
def test_import_loads_nothing_heavy(module):
    assert heavy_in(loaded_after(f"import {module}")["modules"]) == []


def test_primitives_on_bytes_load_nothing_heavy():
    code = ("import gpucrypt\n"
            "from gpucrypt.ciphers import ChaCha20\n"
            "c = gpucrypt.ChaCha20Poly1305(bytes(32))\n"
            "sealed = c.encrypt(bytes(12), b'data', b'aad')\n"
            "assert c.decrypt(bytes(12), sealed, b'aad') == b'data'\n"
            "c.decrypt_into(bytes(12), sealed, b'aad', bytearray(4))\n"
            "ChaCha20(bytes(32), bytes(16)).encryptor().update(memoryview(b'x' * 100))")
    assert heavy_in(loaded_after(code)["modules"]) == []


def test_tensor_names_resolve_on_first_use():
    code = ("import gpucrypt\n"
            "before = 'numpy' in sys.modules\n"
            "from gpucrypt.tensors import api\n"
            "same = all(getattr(gpucrypt, n) is getattr(api, n) for n in\n"
            "           ('encrypt_tensor', 'decrypt_tensor', 'encrypt_tensors', 'decrypt_tensors',\n"
            "            'EncryptedTensor', 'NonceSequence', 'TensorCipher'))\n"
            "result = [before, same, 'numpy' in sys.modules]")
    assert loaded_after(code)["result"] == [False, True, True]
    code = ("import gpucrypt\n"
            "f = gpucrypt.encrypt_tensor\n"
            "result = [f.__module__, 'numpy' in sys.modules]")
    assert loaded_after(code)["result"] == ["gpucrypt.tensors.api", True]


def test_lazy_names_are_listed_and_star_importable():
    import gpucrypt

    assert set(gpucrypt.__all__) <= set(dir(gpucrypt))
    for name in ("encrypt_tensor", "TensorCipher", "NonceSequence", "EncryptedTensor"):
        assert name in gpucrypt.__all__
    namespace: dict = {}
    exec("from gpucrypt import *", namespace)
    assert set(gpucrypt.__all__) <= set(namespace)
    with pytest.raises(AttributeError, match="no_such_name"):
        gpucrypt.no_such_name  # noqa: B018


def test_cli_encrypt_imports_only_what_it_needs(tmp_path):
    (tmp_path / "k").write_bytes(bytes(range(32)))
    (tmp_path / "k").chmod(0o600)  # the CLI refuses key files others can read
    (tmp_path / "in").write_bytes(b"x" * 4096)
    code = ("from gpucrypt.cli import main\n"
            "result = main(['encrypt', '--key-file', 'k', 'in', 'out'])")
    ran = loaded_after(code, cwd=tmp_path)
    assert ran["result"] == 0 and (tmp_path / "out").stat().st_size > 4096
    ours = [m for m in ran["modules"] if m.startswith("gpucrypt")]
    unwanted = ("gpucrypt.bench", "gpucrypt.files.models", "gpucrypt.tensors", "gpucrypt.cli.bench",
                "gpucrypt.cli.models")
    assert [m for m in ours if m.startswith(unwanted)] == []
    # numpy is not asserted here: the stream format's modules decide that, not the CLI
    assert heavy_in(ran["modules"], ("torch", "numba", "safetensors", "jax", "cupy")) == []


@pytest.mark.parametrize("argv", [["--help"], [], ["no-such-command"]])
def test_cli_lists_every_command_without_importing_them(argv):
    code = ("import contextlib, io\n"
            "from gpucrypt.cli import main\n"
            "out, err = io.StringIO(), io.StringIO()\n"
            "with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):\n"
            "    try:\n"
            "        code = main(%r)\n"
            "    except SystemExit as exc:\n"
            "        code = exc.code\n"
            "result = [code, out.getvalue() + err.getvalue()]" % (argv,))
    ran = loaded_after(code)
    code, text = ran["result"]
    assert code == (0 if argv == ["--help"] else 2)
    for name in SUBCOMMANDS:
        assert name in text
    if argv != ["no-such-command"]:  # argparse's error lists the choices, not the help
        for _, summary in SUBCOMMANDS.values():
            assert " ".join(summary.split()[:4]) in " ".join(text.split())
    commands = ("gpucrypt.cli.files", "gpucrypt.cli.keys", "gpucrypt.cli.bench", "gpucrypt.cli.models")
    assert [m for m in ran["modules"] if m.startswith(commands)] == []


def test_command_descriptions_match_their_functions():
    """The table's one-line descriptions are the configure functions' docstrings' first lines."""
    for name, (target, summary) in SUBCOMMANDS.items():
        module_name, func_name = target.split(":")
        doc = getattr(importlib.import_module(module_name), func_name).__doc__ or ""
        assert doc.strip().splitlines()[0] == summary, name


def test_every_subpackage_is_installed():
    """pyproject's explicit ``packages`` list names every folder of gpucrypt/ that holds an
    ``__init__.py``: an editable install finds a forgotten one on disk, a wheel leaves it out."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())
                 ["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(root).parts)
               for p in (root / "gpucrypt").rglob("__init__.py")}
    assert on_disk - listed == set()


#: standard modules a plain encrypt of a small file does without, each a millisecond or
#: more of its run: hmac/hashlib (load OpenSSL's shared library; only comparing a MAC
#: needs them), signal (only a named temporary file's cleanup), threading/the pool
#: (only a file of more than one segment) and ctypes (only where /proc is not mounted:
#: an unnamed output is linked through /proc/self/fd)
STARTUP_COSTS = ("hmac", "hashlib", "_hashlib", "signal", "threading", "concurrent.futures",
                 "ctypes")


def test_cli_small_encrypt_skips_costly_standard_modules(tmp_path):
    (tmp_path / "k").write_bytes(bytes(range(32)))
    (tmp_path / "k").chmod(0o600)
    (tmp_path / "in").write_bytes(b"y" * 4096)
    baseline = set(loaded_after("", cwd=tmp_path)["modules"])  # what Python loads anyway here
    code = ("from gpucrypt.cli import main\n"
            "result = main(['encrypt', '--key-file', 'k', 'in', 'out'])")
    ran = loaded_after(code, cwd=tmp_path)
    assert ran["result"] == 0
    assert [m for m in STARTUP_COSTS if m in ran["modules"] and m not in baseline] == []
    # the AEAD classes load on first use of their names; a file's stream needs only backends
    assert [m for m in ("gpucrypt.aead", "gpucrypt._limits") if m in ran["modules"]] == []
    # and the file is whole: decrypting it (which does compare MACs) gives the input back
    code = ("from gpucrypt.cli import main\n"
            "result = main(['decrypt', '--key-file', 'k', 'out', 'back'])")
    assert loaded_after(code, cwd=tmp_path)["result"] == 0
    assert (tmp_path / "back").read_bytes() == b"y" * 4096


def test_aead_classes_load_on_first_use():
    code = ("import gpucrypt\n"
            "before = 'gpucrypt.aead' in sys.modules\n"
            "from gpucrypt import AESGCM\n"
            "result = [before, AESGCM.__module__, gpucrypt.aead.AESGCM is AESGCM,\n"
            "          gpucrypt.ChaCha20Poly1305(bytes(32)).decrypt(\n"
            "              bytes(12), gpucrypt.ChaCha20Poly1305(bytes(32)).encrypt(bytes(12), b'x', None),\n"
            "              None).decode()]")
    assert loaded_after(code)["result"] == [False, "gpucrypt.aead", True, "x"]
    code = "import gpucrypt\nresult = gpucrypt.aead.__name__"  # the submodule, bare import
    assert loaded_after(code)["result"] == "gpucrypt.aead"
