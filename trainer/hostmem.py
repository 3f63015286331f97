"""glibc malloc settings for a training process: keep freed activation memory for the next step.

Why: every training step frees and re-allocates the same activation buffers (megabytes each).
glibc returns blocks above its mmap threshold with ``munmap`` and trims the top of the heap past
``M_TRIM_THRESHOLD``, so the next step faults every page back in (the kernel zeroes each one): on
a small CPU that kernel time is a large part of a step. Whether glibc's dynamic threshold happens
to adapt depends on the allocation history, so without this the same run can be fast one time and
slow the next. Fixed thresholds end the churn (no page faults per step once warm); the cost is
that up to ``trim_threshold`` of freed memory stays mapped in the process.

A user who preloads jemalloc/tcmalloc or sets ``MALLOC_*`` variables keeps their choice.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameter numbers
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's upper limit for M_MMAP_THRESHOLD on 64-bit
ENV_OVERRIDES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_CONF")


def user_chose_allocator() -> bool:
    preload = os.environ.get("LD_PRELOAD", "")
    return any(v in os.environ for v in ENV_OVERRIDES) or any(a in preload for a in ("jemalloc", "tcmalloc"))


def tune_malloc(
    mmap_threshold: int = MMAP_THRESHOLD_MAX, trim_threshold: int = 1 << 30, top_pad: int = 64 << 20
) -> bool:
    """Set glibc's mmap/trim thresholds and top pad; True if applied (False off glibc or when the
    user chose an allocator). Process-wide and lasting: call it once from a tool's main()."""
    if not sys.platform.startswith("linux") or user_chose_allocator():
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = ((M_MMAP_THRESHOLD, mmap_threshold), (M_TRIM_THRESHOLD, trim_threshold), (M_TOP_PAD, top_pad))
    return all(mallopt(param, value) == 1 for param, value in settings)
