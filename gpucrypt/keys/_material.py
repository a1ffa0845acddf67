"""Objects that hold key material refuse to be pickled or copied.

Imports nothing: every module of :mod:`gpucrypt.keys` that holds a secret may use it.
"""
from __future__ import annotations

__all__ = ["HoldsKeyMaterial"]


class HoldsKeyMaterial:
    """Mixin for objects holding a secret (a key, a private key, a passphrase):
    ``pickle.dumps``, ``copy.copy`` and ``copy.deepcopy`` raise ``TypeError``.

    Why: a pickle carries the secret in the clear into task graphs, object stores, caches
    and logs (Ray, DCP, fsspec all pickle what they are given), and a copy is one more
    holder that nobody drops; :mod:`gpucrypt.aead`'s objects refuse for the same reason.
    What travels instead is a reference resolved where it is used
    (:class:`gpucrypt.keys.portable.KeyReferences`, :class:`gpucrypt.keys.KeyReference`);
    a subclass says which in ``_travel_instead``, the second half of the error.
    """

    __slots__ = ()
    _travel_instead = ("pickle a KeyReferences naming its file instead, and load it in the "
                       "process that uses it")

    def __reduce__(self):
        raise TypeError(f"cannot pickle or copy {type(self).__name__!r} object: it holds key "
                        f"material, which a pickle would carry in the clear; "
                        f"{self._travel_instead}")
