"""Let the daemon's processes keep freed memory for the next instance (glibc only).

Why: glibc hands out every block above its mmap threshold (128 KiB at start) as fresh pages
from the kernel, and gives the top of the heap back above 128 KiB free. Every instance
allocates the same few large arrays (the decoded frame, its float copies, the resized image,
the residuals), so each one page-faults its memory in again: on this 2-core VM that was a
quarter of scoring a 512x512 CR (6.1 ms against 4.7 ms with the settings below) and a third for
2048x2500 (27 ms against 17-18 ms), at the same peak RSS (161 MB for one scoring process);
bench/RESULTS.md, "Allocator". Raising both thresholds keeps blocks up to 32 MiB in the heap
and up to 128 MiB of free heap in the process between instances. Peak memory does not grow:
the same arrays are reused instead of mapped again; the daemon's peak-RSS benchmark
(``bench.scaling``) checks it.

Called first thing by ``sentinel serve`` and by each scoring process. Not by the ``detector``
library itself: a process that only imports it keeps its own allocator settings. On a C
library without ``mallopt`` (musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

LOG = logging.getLogger("sentinel.allocator")

M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = 128 << 20


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; True where it took effect."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not ok:
        LOG.debug("mallopt refused the thresholds; the allocator keeps its defaults")
    return ok
