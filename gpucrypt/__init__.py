"""gpucrypt: GPU-accelerated bulk encryption, byte-identical to OpenSSL and libsodium.

Drop-in AEAD classes (change the import, keep the bytes)::

    from gpucrypt import ChaCha20Poly1305, XChaCha20Poly1305, AESGCM

Each takes ``device="auto" | "cpu" | "gpu"``; see :mod:`gpucrypt.backends`.

``import gpucrypt`` loads ``cryptography`` and nothing heavier: the AEAD classes
(:mod:`gpucrypt.aead`), the tensor API (:mod:`gpucrypt.tensors.api`, which needs
NumPy) and :func:`info` are imported on first use of one of their names (``from gpucrypt
import AESGCM``, ``gpucrypt.encrypt_tensor``), so that ``gpucrypt encrypt`` of a small
file, which uses none of them, does not pay for them.
"""
from __future__ import annotations

from cryptography.exceptions import InvalidTag

from .backends import BackendUnavailable

__version__ = "0.1.0"

#: names served on first use (PEP 562) -> the module that defines them
_LAZY = {**dict.fromkeys(("AESGCM", "BatchInvalidTag", "ChaCha20Poly1305", "XChaCha20Poly1305"),
                         "gpucrypt.aead"),
         **dict.fromkeys(("encrypt_tensor", "decrypt_tensor", "encrypt_tensors", "decrypt_tensors",
                          "EncryptedTensor", "NonceSequence", "TensorCipher"), "gpucrypt.tensors.api"),
         "info": "gpucrypt._info"}

__all__ = ["InvalidTag", "BackendUnavailable", "__version__", *_LAZY]


def __getattr__(name: str) -> object:
    if name == "aead":  # ``gpucrypt.aead`` after a bare ``import gpucrypt``, as before it was lazy
        import importlib

        return importlib.import_module("gpucrypt.aead")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gpucrypt' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
