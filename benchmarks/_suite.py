"""What the pytest-benchmark modules share: one benchmark body for every cell.

The operations are ``gpucrypt bench``'s own (:mod:`gpucrypt.bench.cpu`), so the suite and
the command time exactly the same calls on the same kind of preallocated buffers.
"""
from __future__ import annotations

import functools

import pytest

from gpucrypt.bench.cpu import ALGORITHMS, Material, NotAvailable, applicable, host_operation
from gpucrypt.bench import format_size

#: host-timed implementations in display order; the GPU one needs a real GPU
IMPLEMENTATIONS = ("cryptography", "pynacl", "gpucrypt-cpu", "pycryptodome", "gpucrypt-gpu+transfer")


def cells(algorithms: list[str]) -> list:
    """``(algorithm, implementation)`` parameters for the pairs that make sense (pynacl only for
    XChaCha20-Poly1305, cryptography for everything else), GPU rows marked ``gpu``."""
    params = []
    for algorithm in algorithms:
        for impl in IMPLEMENTATIONS:
            if applicable(impl, ALGORITHMS[algorithm]):
                marks = [pytest.mark.gpu] if impl.startswith("gpucrypt-gpu") else []
                params.append(pytest.param(algorithm, impl, marks=marks, id=f"{algorithm}-{impl}"))
    return params


@functools.lru_cache(maxsize=4)
def material(algorithm: str, size: int) -> Material:
    """Inputs shared by every implementation of one group (a 1 GiB plaintext is made once)."""
    return Material(ALGORITHMS[algorithm], size)


def run_cell(benchmark, algorithm: str, operation: str, implementation: str, size: int) -> None:
    """Benchmark one cell, grouped by algorithm, operation and size; GB/s in extra_info."""
    alg = ALGORITHMS[algorithm]
    benchmark.group = f"{algorithm} {operation} {format_size(size)}"
    benchmark.extra_info.update(bytes=size, baseline=alg.baseline)
    try:
        op = host_operation(implementation, material(algorithm, size), operation)
    except NotAvailable as exc:
        pytest.skip(f"{implementation}: {exc}")
    benchmark(op)
    median = benchmark.stats.stats.median
    benchmark.extra_info["gbps_median"] = size / median / 1e9
