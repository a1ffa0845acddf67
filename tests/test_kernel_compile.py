"""kernels/_compile.py: the disk-cache key covers every module a kernel inlines; `gpucrypt warmup`."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from gpucrypt.cli import main
from gpucrypt.kernels import _compile

KERNEL_DIR = Path(_compile.PACKAGE_DIR)


def test_package_hash_follows_every_module(tmp_path):
    """Editing a helper module a kernel inlines (not the kernel's own file) changes the key."""
    copy = tmp_path / "kernels"
    shutil.copytree(KERNEL_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    before = _compile.package_source_hash(str(copy))
    assert before == _compile.package_source_hash(str(KERNEL_DIR))
    for helper in ("_vector_io.py", "_launch.py", "_compile.py"):
        original = (copy / helper).read_bytes()
        (copy / helper).write_bytes(original + b"\nTHREADS = 128\n")
        _compile.package_source_hash.cache_clear()
        assert _compile.package_source_hash(str(copy)) != before, helper
        (copy / helper).write_bytes(original)
        _compile.package_source_hash.cache_clear()
    assert _compile.package_source_hash(str(copy)) == before
    (copy / "README.md").write_text("not code")  # only Python modules count
    assert _compile.package_source_hash(str(copy)) == before


def test_every_kernel_is_registered():
    import gpucrypt.kernels.aes  # noqa: F401
    import gpucrypt.kernels.chacha20  # noqa: F401
    import gpucrypt.kernels.ghash  # noqa: F401
    import gpucrypt.kernels.poly1305  # noqa: F401

    names = sorted(_compile.kernel_name(k) for k in _compile.KERNELS)
    assert names == ["aes._aes_ctr_xor_kernel", "chacha20._chacha20_xor_kernel", "ghash._ghash_blocks",
                     "ghash._ghash_blocks_mixed_keys", "ghash._ghash_combine", "ghash._ghash_key_tables",
                     "poly1305._poly1305_aead_partial", "poly1305._poly1305_combine", "poly1305._poly1305_powers"]


def test_cache_key_of_every_kernel_holds_the_package_hash():
    """Without the simulator (numba-cuda's real dispatcher; no GPU needed to build a cache key)."""
    code = textwrap.dedent("""
        from gpucrypt.kernels import _compile, aes, chacha20, ghash, poly1305

        class Codegen:
            def magic_tuple(self):
                return ("nvptx64-nvidia-cuda", "sm_90", "")

        cache_class = _compile._package_keyed_cache_class()
        assert cache_class is not None
        keys = []
        for k in _compile.KERNELS:
            assert isinstance(k._cache, cache_class), (_compile.kernel_name(k), type(k._cache))
            key = k._cache._index_key((), Codegen())
            assert key[-1] == ("gpucrypt.kernels", _compile.package_source_hash()), key
            keys.append(key)
        _compile.package_source_hash = lambda folder=None: "an edited helper module"
        for k, key in zip(_compile.KERNELS, keys):
            assert k._cache._index_key((), Codegen()) != key
        print("ok", len(keys))
    """)
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0 and run.stdout.split() == ["ok", "9"], run.stdout + run.stderr


def test_row_stack_is_given_back_only_where_numpy_lacks_it():
    import types

    import numpy as np

    modern = types.SimpleNamespace(vstack=np.vstack)  # NumPy >= 2.5: no row_stack
    assert _compile.restore_numpy_row_stack(modern) is True
    assert modern.row_stack is np.vstack
    assert _compile.restore_numpy_row_stack(modern) is False  # idempotent
    older = types.SimpleNamespace(vstack=np.vstack, row_stack=object())
    kept = older.row_stack
    assert _compile.restore_numpy_row_stack(older) is False
    assert older.row_stack is kept


def test_kernels_compile_for_the_device_under_a_numpy_without_row_stack():
    """NumPy 2.5 removed ``np.row_stack``; numba-cuda 0.30 needs it for any compile for the
    CUDA target (kernels/_compile.py). Here the name is taken away as NumPy 2.5 lacks it, the
    kernels are imported, and a kernel is compiled to sm_90 PTX by the real CUDA target (no GPU
    needed; a kernel without device functions, which would ask the driver for the device)."""
    code = textwrap.dedent("""
        import numpy as np
        if hasattr(np, "row_stack"):
            del np.row_stack
        from numba import cuda, uint32
        from gpucrypt.kernels import chacha20  # noqa: F401
        assert np.row_stack is np.vstack

        def one(out):
            out[cuda.grid(1)] = uint32(1)

        ptx, _ = cuda.compile_ptx(one, "void(uint32[:])", cc=(9, 0))
        print("ok", ".entry" in ptx)
    """)
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0 and run.stdout.split() == ["ok", "True"], run.stdout + run.stderr


def test_warmup_on_the_simulator_compiles_nothing(capsys, on_cudasim):
    if not on_cudasim:
        import pytest

        pytest.skip("a real GPU is in use: benchmarks/gpu_session.sh runs `gpucrypt warmup` there (its warmup step)")
    assert main(["warmup"]) == 0
    assert "simulator" in capsys.readouterr().out


def test_warmup_compiles_the_mixed_key_ghash_kernel_with_a_two_key_batch(monkeypatch):
    """Every AEAD round trip of the warm-up is under one key (GHASH's table kernel); only a
    batch that mixes AES keys reaches the mixed-key kernel, which warm-up must compile too."""
    from gpucrypt.backends import get_backend
    from gpucrypt.cli import _warm_two_key_gcm
    from gpucrypt.kernels import ghash

    one_key_flags = []
    real = ghash.ghash_aead_tags

    def spy(*args, **kwargs):
        one_key_flags.append(kwargs.get("one_key"))
        return real(*args, **kwargs)

    monkeypatch.setattr(ghash, "ghash_aead_tags", spy)
    _warm_two_key_gcm(get_backend("gpu"))
    assert one_key_flags == [False]
