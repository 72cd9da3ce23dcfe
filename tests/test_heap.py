"""common/heap.py: a freed large block is taken again without faulting its pages in."""
from __future__ import annotations

import subprocess
import sys

import pytest

from common import env

# In a fresh process as Weft starts one: a 24 MB block (one layer's activations in a long
# prefill step) is written, freed, taken again and written again; prints the minor page faults
# of the second time.
PROBE = """
import ctypes, resource
import service  # noqa: F401  (what every Weft process imports first)
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def write_block():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(24 << 20)
    ctypes.memset(p, 1, 24 << 20)
    libc.free(p)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
write_block()
print(write_block())
"""
PAGES = (24 << 20) // 4096


def _second_faults(keep: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE], check=True, capture_output=True, text=True,
                         env=env.child_environment(WEFT_KEEP_HEAP=keep))
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_freed_block_is_reused_without_page_faults() -> None:
    kept, returned = _second_faults("1"), _second_faults("0")
    # Kept: the block comes back from the heap with its pages. glibc's defaults: the first block
    # was mmapped and unmapped, the second comes from fresh heap pages that all fault in (the
    # control: the probe measures what it claims).
    assert kept < PAGES // 20, (kept, returned)
    assert returned > PAGES // 2, (kept, returned)
