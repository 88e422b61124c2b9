"""Allocator settings that keep a streaming merge fast and its memory flat.

A merge allocates and frees the same few buffer sizes (a tensor's float32 copies) thousands of
times. glibc's defaults hand large freed buffers back to the kernel and give each thread its own
arena, so every new buffer is fresh memory that the kernel must zero page by page: on the 505M
benchmark that was 2.5 million page faults and 5 s of system time. Serving buffers up to 32 MB
from one heap that is not trimmed lets them be reused instead; peak memory is then the peak of
live buffers (plus fragmentation), not more. Measured in docs/benchmarks.md.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameter numbers from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_MMAP_THRESHOLD = 32 << 20  # glibc's maximum
_TRIM_THRESHOLD = 1 << 30

_done = False


def tune_allocator() -> bool:
    """Apply the settings once per process (glibc only); returns whether they were applied."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (e.g. musl)
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = all(
        mallopt(param, value)
        for param, value in (
            (_M_ARENA_MAX, 1),
            (_M_MMAP_THRESHOLD, _MMAP_THRESHOLD),
            (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD),
        )
    )
    _done = ok
    return ok
