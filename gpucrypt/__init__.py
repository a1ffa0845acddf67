"""gpucrypt: GPU-accelerated bulk encryption, byte-identical to OpenSSL and libsodium.

Drop-in AEAD classes (change the import, keep the bytes)::

    from gpucrypt import ChaCha20Poly1305, XChaCha20Poly1305, AESGCM

Each takes ``device="auto" | "cpu" | "gpu"``; see :mod:`gpucrypt.backends`.
"""
from __future__ import annotations

from cryptography.exceptions import InvalidTag

from .aead import AESGCM, BatchInvalidTag, ChaCha20Poly1305, XChaCha20Poly1305
from .backends import BackendUnavailable
from ._info import info
from .tensors.api import (EncryptedTensor, NonceSequence, TensorCipher, decrypt_tensor,
                     decrypt_tensors, encrypt_tensor, encrypt_tensors)

__version__ = "0.1.0"

__all__ = ["ChaCha20Poly1305", "XChaCha20Poly1305", "AESGCM", "InvalidTag", "BatchInvalidTag",
           "BackendUnavailable", "info", "__version__"]
__all__ += ["encrypt_tensor", "decrypt_tensor", "encrypt_tensors", "decrypt_tensors",
            "EncryptedTensor", "NonceSequence", "TensorCipher"]
