"""Raw stream ciphers: gpucrypt.ciphers against cryptography's Cipher(...).encryptor()."""
from __future__ import annotations

import pytest

from _suite import cells, run_cell

from gpucrypt.bench.cpu import FORMS

STREAMS = ["chacha20", "aes-128-ctr", "aes-256-ctr"]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("operation", ["encrypt", "decrypt"])
@pytest.mark.parametrize("algorithm, implementation", cells(STREAMS))
def test_stream(benchmark, algorithm, operation, implementation, size, form):
    run_cell(benchmark, algorithm, operation, implementation, size, form)
