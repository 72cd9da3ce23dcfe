"""Freed memory stays in the process's heap (glibc) instead of going back to the OS.

A prefill step of a thousand tokens allocates ~20 MB of activations per layer, frees them, and
allocates them again in the next layer. glibc serves blocks that large by mmap, or trims the heap
top once it is free, so every step faults each page in again (zero-filled by the kernel): on 2
cores of a Xeon (SmolLM2, 32 prompts of ~100 tokens) 120-250k page faults a wave, and a
1,024-token step took 360-1,170 ms instead of a steady 420-450 ms. Raising the mmap threshold to
its 32 MB ceiling and never trimming keeps those pages mapped: the process holds its peak heap, as
vLLM and llama.cpp hold their buffers (the default model: ~50 MB more resident after a step of
four 1,000-token prompts, 1,603 against 1,556 MB). Other C libraries (macOS, musl) are left as
they are.
"""
from __future__ import annotations

import ctypes

from common import env

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20   # glibc's ceiling on 64-bit (4 * 1024 * 1024 * sizeof(long))
NEVER_TRIM = (1 << 31) - 1      # an int, as mallopt takes: 2 GiB of free heap top before a trim


def keep_freed_memory() -> bool:
    """Tell glibc to keep freed blocks in the heap (see the module doc); False where there is no
    glibc mallopt or WEFT_KEEP_HEAP=0."""
    if not env.keep_heap():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # Setting either disables glibc's dynamic threshold, which would otherwise move them again.
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
