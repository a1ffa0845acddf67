"""Tensors: encrypt the arrays of PyTorch, CuPy, JAX, numba and NumPy where they live.

- :mod:`~gpucrypt.tensors.api`: ``encrypt_tensor(s)``, ``decrypt_tensor(s)``,
  :class:`EncryptedTensor`, :class:`NonceSequence`, :class:`TensorCipher`
  (re-exported by :mod:`gpucrypt`; ``gpucrypt.tensor`` is this module's old path);
- ``_frameworks``: one adapter per framework (placement, byte views, allocation, streams).

May import: the ground floor, :mod:`gpucrypt.backends` and :mod:`gpucrypt.pipeline`.
Loads NumPy (and a framework only when given one of its tensors).
"""
