"""Test helpers for laying several messages out in one device buffer, as the backend does."""
from __future__ import annotations

import numpy as np


def pack_buffer(parts, rng, *, random_gaps: bool = True):
    """Concatenate byte strings with garbage between them; returns (uint8 array, offsets).

    Without ``random_gaps`` every part starts 16-byte aligned (the kernel's fast
    path); with it, parts start at random offsets (the byte path).
    """
    chunks, offsets, pos = [], [], 0
    for part in parts:
        gap = int(rng.integers(0, 9)) if random_gaps else -pos % 16
        chunks.append(rng.bytes(gap))  # garbage between messages must never be read
        pos += gap
        offsets.append(pos)
        chunks.append(part)
        pos += len(part)
    chunks.append(rng.bytes(16))  # garbage after the last message
    return np.frombuffer(b"".join(chunks), dtype=np.uint8).copy(), offsets
