"""``gpucrypt.stream``: the public path of :mod:`gpucrypt.files.stream` (the same module object)."""
from ._alias import alias

alias(__name__, "gpucrypt.files.stream")
