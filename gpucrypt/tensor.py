"""``gpucrypt.tensor``: the public path of :mod:`gpucrypt.tensors.api` (the same module object)."""
from ._alias import alias

alias(__name__, "gpucrypt.tensors.api")
