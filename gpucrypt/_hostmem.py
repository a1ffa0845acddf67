"""Fresh host memory for large decryption outputs, faulted in 2 MiB at a time.

Why this exists: a decryption into freshly allocated memory pays one page fault per
4 KiB page, and the kernel zeroes each page before we overwrite it. On this project's
reference machine (AMD EPYC, Linux 6.18, transparent huge pages in ``madvise`` mode)
opening 256 MiB of ChaCha20-Poly1305 into ``torch.empty`` memory took 294 ms, and
157 ms into memory that asked for huge pages: the faults cost as much as the cipher.
``malloc`` (and so ``torch.empty``/``numpy.empty``) never asks for huge pages in
``madvise`` mode, so large outputs are mapped here instead.

Contract of :func:`empty_host_bytes`:

- returns a writable, C-contiguous ``uint8`` NumPy array of exactly ``nbytes``, whose
  content is undefined (as ``numpy.empty``'s) and whose memory lives as long as the
  array or any view of it (a ``torch.from_numpy`` tensor keeps it alive too);
- below :data:`HUGE_PAGE_MIN_BYTES`, or where the platform has no ``MADV_HUGEPAGE``
  (macOS, Windows), it is plain ``numpy.empty``;
- otherwise it is an anonymous private mapping: the array starts on a 2 MiB boundary,
  its whole 2 MiB pages are advised ``MADV_HUGEPAGE`` and its last partial one stays on
  4 KiB pages, so no huge page is ever partly used (the extra 2 MiB mapped for the
  alignment is never touched, so it takes no memory). The kernel may
  still decline huge pages (``never`` mode, fragmentation): then it is ordinary memory.
"""
from __future__ import annotations

import mmap

import numpy as np

HUGE_PAGE = 2 << 20
#: Outputs smaller than this come from ``numpy.empty``: a mapping per small tensor costs
#: more in system calls than its faults.
HUGE_PAGE_MIN_BYTES = 4 * HUGE_PAGE
_PAGE = mmap.PAGESIZE
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", None)


def empty_host_bytes(nbytes: int) -> np.ndarray:
    """A fresh ``uint8`` array of ``nbytes`` for a large output (see the module's contract)."""
    if nbytes < HUGE_PAGE_MIN_BYTES or _MADV_HUGEPAGE is None:
        return np.empty(nbytes, dtype=np.uint8)
    # One huge page more than needed, so that the array can start on a 2 MiB boundary
    # and every one of its whole huge pages lies inside the mapping.
    mapped = -(-nbytes // _PAGE) * _PAGE + HUGE_PAGE
    region = mmap.mmap(-1, mapped, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = np.frombuffer(region, dtype=np.uint8)
    start = -whole.ctypes.data % HUGE_PAGE
    huge = nbytes // HUGE_PAGE * HUGE_PAGE
    try:
        region.madvise(_MADV_HUGEPAGE, start, huge)
    except OSError:
        pass  # THP compiled out or disabled: ordinary pages, same content
    return whole[start:start + nbytes]
