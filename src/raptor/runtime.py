"""Process-level CPU tuning used by long jobs (extraction, training).

``tune_malloc``: glibc hands every allocation above a dynamic threshold (up to 32 MB) to mmap and returns it to
the OS on free, so each new activation buffer page-faults and gets zeroed again. A trajectory pipeline allocates
a few such buffers per batch (the stacked images, the bf16 copy to store), and that churn costs a noticeable share
of the forward time (figures: docs/benchmarks.md). Raising the mmap and trim thresholds keeps freed blocks in the
heap for reuse; the bare forward pass is not faster with it, only our extra allocations stop costing.
No-op where glibc is absent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_done = False


def tune_malloc(threshold: int = 1 << 30) -> bool:
    """Keep freed blocks up to ``threshold`` bytes in the heap. Returns True if applied."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, threshold) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, threshold) == 1
    except (OSError, AttributeError):
        return False
    _done = ok
    return ok
