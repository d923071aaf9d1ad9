"""Host memory of a training process: freed blocks kept for the next step instead of returned to the kernel.

glibc serves every block above its mmap threshold (at most 32 MiB) with a fresh mmap and unmaps it on free, so each
step's large activations (the padded query/key/value grid, the MLM loss chunks) are new pages that the kernel must
fault in and zero again, on every step; smaller blocks go the same way until glibc's dynamic threshold has grown,
which slows the first steps of a run. Serving all blocks from the heap and never trimming it makes the steps, once
the first ones have grown the heap to their peak, reuse the same pages (a steady footprint of that peak)."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters, <malloc.h>


def keep_freed_memory() -> bool:
    """Configures glibc's malloc (Linux) to keep freed memory in the process; returns whether it applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (musl has no mallopt)
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
