"""Public import paths that outlived a move.

``gpucrypt.stream``, ``gpucrypt.models`` and ``gpucrypt.tensor`` are documented import
paths; their code now lives in the feature packages (:mod:`gpucrypt.files`,
:mod:`gpucrypt.tensors`). Each old path is the very module object of its new home, not
a copy of its names, so ``gpucrypt.stream is gpucrypt.files.stream`` and setting an
attribute on one (a test's monkeypatch, a tuning knob) sets it on the other.
"""
from __future__ import annotations

import importlib
import sys


def alias(old_name: str, new_name: str) -> None:
    """Make the module being imported as ``old_name`` be the module ``new_name``."""
    sys.modules[old_name] = importlib.import_module(new_name)
