"""gpucrypt._hostmem: large decryption outputs from NumPy's allocator, which advises huge
pages on them, and model loads and tensor results that use it.

The checks read the kernel's own account of the mapping (``/proc/self/smaps``): the
``hg`` VmFlag is what ``madvise(MADV_HUGEPAGE)`` sets, whatever memory the kernel then
manages to find, so the test does not depend on free huge pages.
"""
from __future__ import annotations

import gc
import mmap
import os
import sys

import numpy as np
import pytest
import torch
from numpy._core.multiarray import _get_madvise_hugepage

from gpucrypt import _hostmem, models
from gpucrypt.stream import AuthenticationError

MIB = 1 << 20
#: NumPy advises MADV_HUGEPAGE on Linux kernels that have it (it turns this off on
#: kernels before 4.6, where the advice made allocation slow)
LINUX_THP = sys.platform == "linux" and hasattr(mmap, "MADV_HUGEPAGE") and _get_madvise_hugepage()


def advised(address: int) -> bool:
    """Whether the memory a whole huge page past ``address`` is advised MADV_HUGEPAGE
    (NumPy advises from the first 4 KiB boundary of the allocation, not its first byte)."""
    return "hg" in vm_flags(address + _hostmem.HUGE_PAGE)


def vm_flags(address: int) -> set[str]:
    """The VmFlags of the mapping of this process that holds ``address``."""
    current = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                current = lo <= address < hi
            elif head == "VmFlags:" and current:
                return set(line.split()[1:])
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not LINUX_THP, reason="MADV_HUGEPAGE is Linux-only; elsewhere plain numpy.empty")
def test_large_output_is_advised_and_exact():
    n = 9 * MIB + 5
    a = _hostmem.empty_host_bytes(n)
    assert a.dtype == np.uint8 and a.shape == (n,) and a.flags.c_contiguous and a.flags.writeable
    assert advised(a.ctypes.data)
    a[:] = 7
    assert int(a.sum()) == 7 * n


def test_a_torch_tensor_keeps_the_mapping_alive():
    n = _hostmem.HUGE_PAGE_MIN_BYTES + 123
    t = torch.from_numpy(_hostmem.empty_host_bytes(n)).view(torch.uint8)
    t.fill_(3)
    gc.collect()
    big = [np.ones(4 * MIB, dtype=np.uint8) for _ in range(4)]  # reuse of freed memory would show
    assert int(t.sum()) == 3 * n
    del big


@pytest.mark.parametrize("framework", ["torch", "numpy"])
@pytest.mark.parametrize("algorithm", ["chacha20-poly1305", "aes-256-gcm"])
def test_model_load_of_large_tensors_round_trips(tmp_path, framework, algorithm):
    torch.manual_seed(3)
    # Odd sizes: a huge-page output whose tail is not a whole page, next to a small one.
    state = {"big": torch.randn(4 * MIB + 3, dtype=torch.float32).to(torch.bfloat16).reshape(-1),
             "f32": torch.randn(1, 2 * MIB + 7), "small": torch.arange(5)}
    key = os.urandom(32)
    path = tmp_path / "m.gcm"
    models.save_encrypted(state, path, key, algorithm=algorithm, device="cpu")
    out = models.load_encrypted(path, key, "cpu", framework=framework)
    for name, want in state.items():
        got = out[name] if framework == "torch" else torch.from_numpy(out[name].view(np.uint8)) \
            .view(want.dtype).reshape(want.shape)
        assert got.shape == want.shape and torch.equal(got, want), name
    if LINUX_THP:
        big = out["big"]
        assert advised(big.data_ptr() if framework == "torch" else big.ctypes.data)


def test_model_load_of_a_tampered_large_tensor_fails(tmp_path):
    state = {"big": torch.randn(3 * MIB)}
    key = os.urandom(32)
    path = tmp_path / "m.gcm"
    models.save_encrypted(state, path, key, device="cpu")
    raw = bytearray(path.read_bytes())
    raw[len(raw) - 1000] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(AuthenticationError, match="big"):
        models.load_encrypted(path, key, "cpu")


@pytest.mark.parametrize("make", [lambda n: torch.randn(n // 4), lambda n: np.random.default_rng(1)
                                  .standard_normal(n // 8)], ids=["torch", "numpy"])
def test_tensor_api_large_results_round_trip_on_huge_pages(make):
    from gpucrypt import tensor

    key = os.urandom(32)
    x = make(_hostmem.HUGE_PAGE_MIN_BYTES + 4 * MIB)
    enc = tensor.encrypt_tensor(x, key, device="cpu")
    back = tensor.decrypt_tensor(enc, key)
    assert type(back) is type(x) and back.shape == x.shape and back.dtype == x.dtype
    assert (torch.equal(back, x) if isinstance(x, torch.Tensor) else np.array_equal(back, x))
    if LINUX_THP:
        assert advised(back.data_ptr() if isinstance(back, torch.Tensor) else back.ctypes.data)
