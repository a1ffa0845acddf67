"""What the pytest-benchmark modules share: one benchmark body for every cell.

The operations are ``gpucrypt bench``'s own (:mod:`gpucrypt.bench.cpu`), so the suite and
the command time exactly the same calls, in both forms: ``alloc`` (calls returning a new
result, as PyNaCl's do) and ``into`` (writing into a buffer made once), each against the
baseline of the same form. As in the command, every operation's output is checked against
the reference before it is timed (:class:`~gpucrypt.bench.cpu.WrongOutput` otherwise), and
the checked buffer is spoiled, so no later call is checked on bytes it did not write.
"""
from __future__ import annotations

import functools

import pytest

from gpucrypt.bench import format_size
from gpucrypt.bench.cpu import (ALGORITHMS, Material, NotAvailable, applicable, checked_call,
                                host_operation, spoil)

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


@functools.lru_cache(maxsize=1)
def material(algorithm: str, size: int) -> Material:
    """Inputs shared by every implementation of one group (a 1 GiB plaintext is made once);
    the tests run size, then algorithm, outermost, so one is alive at a time."""
    return Material(ALGORITHMS[algorithm], size)


def run_cell(benchmark, algorithm: str, operation: str, implementation: str, size: int,
             form: str = "into") -> None:
    """Benchmark one cell, grouped by algorithm, operation, form and size, after checking
    its output against the reference once; GB/s in extra_info."""
    alg = ALGORITHMS[algorithm]
    m = material(algorithm, size)
    benchmark.group = f"{algorithm} {operation} {form} {format_size(size)}"
    benchmark.extra_info.update(bytes=size, form=form, baseline=alg.baseline_for(form) or "")
    try:
        op = host_operation(implementation, m, operation, form)
    except NotAvailable as exc:
        pytest.skip(f"{implementation}: {exc}")
    expected = m.expected(operation)
    spoil(checked_call(implementation, op, expected), expected)
    benchmark(op)
    median = benchmark.stats.stats.median
    benchmark.extra_info["gbps_median"] = size / median / 1e9
