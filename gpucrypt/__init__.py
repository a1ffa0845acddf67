"""gpucrypt: GPU-accelerated bulk encryption, byte-identical to OpenSSL and libsodium.

Drop-in AEAD classes (change the import, keep the bytes)::

    from gpucrypt import ChaCha20Poly1305, XChaCha20Poly1305, AESGCM

Each takes ``device="auto" | "cpu" | "gpu"``; see :mod:`gpucrypt.backends`.

``import gpucrypt`` loads ``cryptography`` and nothing heavier: the tensor API
(:mod:`gpucrypt.tensors.api`, which needs NumPy) is imported on first use of one of
its names (``gpucrypt.encrypt_tensor``, ``from gpucrypt import TensorCipher``).
"""
from __future__ import annotations

from cryptography.exceptions import InvalidTag

from .aead import AESGCM, BatchInvalidTag, ChaCha20Poly1305, XChaCha20Poly1305
from .backends import BackendUnavailable
from ._info import info

__version__ = "0.1.0"

#: names served on first use (PEP 562) -> the module that defines them
_LAZY = dict.fromkeys(("encrypt_tensor", "decrypt_tensor", "encrypt_tensors", "decrypt_tensors",
                       "EncryptedTensor", "NonceSequence", "TensorCipher"), "gpucrypt.tensors.api")

__all__ = ["ChaCha20Poly1305", "XChaCha20Poly1305", "AESGCM", "InvalidTag", "BatchInvalidTag",
           "BackendUnavailable", "info", "__version__", *_LAZY]


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gpucrypt' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
