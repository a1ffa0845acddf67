"""AEADs: gpucrypt against cryptography (PyNaCl/libsodium for XChaCha20-Poly1305), per size."""
from __future__ import annotations

import pytest

from _suite import cells, run_cell

from gpucrypt.bench.cpu import FORMS

AEADS = ["chacha20-poly1305", "xchacha20-poly1305", "aes-128-gcm", "aes-256-gcm"]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("operation", ["encrypt", "decrypt"])
@pytest.mark.parametrize("algorithm, implementation", cells(AEADS))
def test_aead(benchmark, algorithm, operation, implementation, size, form):
    run_cell(benchmark, algorithm, operation, implementation, size, form)
