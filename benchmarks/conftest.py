"""pytest-benchmark suite configuration (``pytest benchmarks/``; not part of ``pytest``'s default
run, whose testpaths are ``tests/``).

Sizes come from ``GPUCRYPT_BENCH_SIZES`` (``gpucrypt bench``'s syntax: ``16,1KiB,1MiB`` or a
preset ``openssl``/``bulk``/``all``); the default keeps a full run to a few minutes on two
cores. Every test takes ``size`` and is grouped per algorithm, operation and size, so the
table pytest-benchmark prints compares gpucrypt with ``cryptography`` row by row and
``--benchmark-compare`` lines up runs of different commits.

The GPU rows (``gpucrypt-gpu+transfer``: the public classes with ``device="gpu"`` on host
buffers) carry the ``gpu`` marker and skip with the reason where no GPU is usable. The
simulator is never switched on here: its timings mean nothing. Device-resident GPU
figures, timed with CUDA events, come from ``gpucrypt bench``.
"""
from __future__ import annotations

import os

import pytest

from gpucrypt.bench import format_size, parse_sizes

DEFAULT_SIZES = "16,1KiB,16KiB,1MiB,16MiB"


def bench_sizes() -> tuple[int, ...]:
    return parse_sizes(os.environ.get("GPUCRYPT_BENCH_SIZES", DEFAULT_SIZES))


def pytest_generate_tests(metafunc):
    if "size" in metafunc.fixturenames:
        sizes = bench_sizes()
        metafunc.parametrize("size", sizes, ids=[format_size(s).replace(" ", "") for s in sizes])


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") is None:
        return
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        pytest.skip("numba's CUDA simulator is active: GPU timings would mean nothing")
    from gpucrypt.backends import BackendUnavailable, get_backend

    try:
        get_backend("gpu")
    except BackendUnavailable as exc:
        if os.environ.get("GPUCRYPT_REQUIRE_GPU") == "1":
            pytest.fail(f"GPUCRYPT_REQUIRE_GPU=1 but the gpu backend is unavailable: {exc}",
                        pytrace=False)
        pytest.skip(f"gpu backend unavailable: {exc}")
