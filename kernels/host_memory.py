"""Large CPU tensors on 2 MiB pages (transparent huge pages, asked for with madvise).

The paged KV cache is read a block (a few KB) at a time from wherever its blocks lie in
gigabytes: on 4 KB pages nearly every block costs a TLB miss and a page walk, which the
attention kernel's prefetches then wait on. (The weights, streamed in order, gained nothing
from huge pages when measured: kernels/NOTES.md, "Huge pages".) Linux gives huge pages to
memory that asks for them (madvise) when /sys/kernel/mm/transparent_hugepage/enabled is
`madvise` (the common default) or `always`; the pages are taken at the first touch, so the
buffer is asked for before anything is written to it.
Anywhere else (not Linux, THP off) these are plain tensors.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import math
import sys
from functools import cache

import torch

HUGE_PAGE = 1 << 21
_MADV_HUGEPAGE = 14


@cache
def _madvise() -> ctypes._CFuncPtr | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor whose memory starts on a huge-page boundary and is
    marked for huge pages (when under one huge page, or without madvise: torch.empty)."""
    nbytes = math.prod(shape) * dtype.itemsize
    madvise = _madvise()
    if madvise is None or nbytes < HUGE_PAGE:
        return torch.empty(shape, dtype=dtype)
    size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    raw = torch.empty(size + HUGE_PAGE, dtype=torch.uint8)   # room to start on a boundary
    start = -raw.data_ptr() % HUGE_PAGE
    # Refused (THP compiled out, say): the memory is still good, on small pages.
    madvise(raw.data_ptr() + start, size, _MADV_HUGEPAGE)
    return raw[start:start + nbytes].view(dtype).view(shape)


def zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return empty(shape, dtype).zero_()
