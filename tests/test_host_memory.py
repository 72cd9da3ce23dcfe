"""kernels/host_memory.py: big CPU tensors that start on a huge-page boundary and are marked for
transparent huge pages (the KV cache's home on the CPU)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from kernels import host_memory

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _vma_fields(address: int) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping holding `address`."""
    fields: dict[str, str] = {}
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            if inside:
                break
            inside = lo <= address < hi
        elif inside:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def test_zeros_are_zero_aligned_and_of_the_shape() -> None:
    t = host_memory.zeros((3, 5, 1 << 17), torch.bfloat16)   # 3.75 MiB
    assert t.shape == (3, 5, 1 << 17) and t.dtype == torch.bfloat16 and t.is_contiguous()
    assert t.data_ptr() % host_memory.HUGE_PAGE == 0
    assert not t.any()
    t[2, 4, -1] = 1.5   # the whole range is writable, and it is the tensor's own
    assert float(t.float().sum()) == 1.5


def test_small_tensors_are_plain() -> None:
    t = host_memory.zeros((7, 3), torch.float32)
    assert t.shape == (7, 3) and not t.any()


@pytest.mark.skipif(not sys.platform.startswith("linux") or not THP.exists()
                    or "[never]" in THP.read_text(), reason="no transparent huge pages on this machine")
def test_marked_for_huge_pages() -> None:
    t = host_memory.zeros((8 << 20,), torch.uint8)
    fields = _vma_fields(t.data_ptr())
    assert fields.get("THPeligible") == "1", fields
