"""Distributed training: encrypted sharded checkpoints for ``torch.distributed.checkpoint``.

- :mod:`~gpucrypt.distributed.checkpoint`: :class:`EncryptedWriter` and
  :class:`EncryptedReader`, a DCP storage writer/reader pair (subclasses of DCP's
  ``FileSystemWriter``/``FileSystemReader``): each rank seals its own shards into a
  gpucrypt model file under its own data key, and the checkpoint's metadata is
  encrypted and records every data file, so that swapped, truncated or replaced
  files are refused;
- :mod:`~gpucrypt.distributed.extension`: :class:`EncryptionExtension`, a DCP
  ``StreamTransformExtension`` for users who keep DCP's stock writer and reader.

``docs/DISTRIBUTED.md`` says how to use them and what they protect.

Importing this package imports torch (``import gpucrypt`` does not import this package).
May import: :mod:`gpucrypt.files`, :mod:`gpucrypt.keys`, :mod:`gpucrypt.pipeline`,
:mod:`gpucrypt.backends` (its ``check_device``: arguments are checked where the backend
choice is made) and the ground floor. Nothing in gpucrypt imports it.
"""
from __future__ import annotations

from .checkpoint import EncryptedReader, EncryptedStorageInfo, EncryptedWriter
from .extension import EncryptionExtension

__all__ = ["EncryptedWriter", "EncryptedReader", "EncryptedStorageInfo", "EncryptionExtension"]
