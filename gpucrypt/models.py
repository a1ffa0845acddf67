"""``gpucrypt.models``: the public path of :mod:`gpucrypt.files.models` (the same module object)."""
from ._alias import alias

alias(__name__, "gpucrypt.files.models")
