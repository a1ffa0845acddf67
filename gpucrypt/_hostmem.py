"""Fresh host memory for large decryption outputs: NumPy's allocator, which asks for
huge pages itself and recycles freed memory.

Why this module exists: a decryption into freshly allocated memory pays one page fault
per 4 KiB page, and the kernel zeroes each page before we overwrite it; the faults can
cost as much as the cipher. ``torch.empty`` takes 4 KiB pages where transparent huge
pages are in ``madvise`` mode (as on our machines). ``numpy.empty`` does better on both
counts that matter: NumPy advises ``MADV_HUGEPAGE`` on every allocation of 4 MiB and more
(``numpy._core.multiarray._get_madvise_hugepage()``), and its memory comes from
``malloc``, whose heap hands a freed output's memory to the next load without a fault.

An earlier version mapped each output on its own 2 MiB-aligned anonymous mapping. Side
by side on the reference machine (AMD EPYC, 2 cores, a VM whose kernel reports freed
2 MiB blocks back to the hypervisor, ``page_reporting``), loading the same 1 GiB
ChaCha20-Poly1305 model file to torch tensors, medians of 5 interleaved loads in one
process: 0.74 s into private mappings, 0.70 s into ``torch.empty``, 0.40 s into
``numpy.empty``. Freshly mapped huge pages there are often blocks the hypervisor took
back, and touching them again cost up to 1.2 s of system time per GiB (0.1 s when the
freed memory is reused at once); in fresh processes (one load each) the three were
within the noise of each other (0.65-1.2 s).

Contract of :func:`empty_host_bytes`:

- returns a writable, C-contiguous ``uint8`` NumPy array of exactly ``nbytes``, whose
  content is undefined (as ``numpy.empty``'s) and whose memory lives as long as the
  array or any view of it (a ``torch.from_numpy`` tensor keeps it alive too);
- of :data:`HUGE_PAGE_MIN_BYTES` and more, on Linux with transparent huge pages, its
  whole 2 MiB pages are advised ``MADV_HUGEPAGE`` (by NumPy); the kernel may still
  decline them (``never`` mode, fragmentation): then it is ordinary memory.
"""
from __future__ import annotations

import numpy as np

HUGE_PAGE = 2 << 20
#: NumPy advises huge pages on allocations of this size and more (its own threshold);
#: the adapters take host results at least this large from :func:`empty_host_bytes`.
HUGE_PAGE_MIN_BYTES = 4 << 20


def empty_host_bytes(nbytes: int) -> np.ndarray:
    """A fresh ``uint8`` array of ``nbytes`` for a large output (see the module's contract)."""
    return np.empty(nbytes, dtype=np.uint8)
