"""Paged KV cache bookkeeping: a pool of fixed-size blocks, per-request block lists, ref counts.

The scheduler only asks "can this request get room for n more tokens?" and "free it"; which
blocks those are stays in here (vLLM v1's KVCacheManager). The tensors themselves live in the
runner; this class hands out block ids into them.
"""
from __future__ import annotations

from collections import deque


class BlockPool:
    """Free list + reference counts over block ids [0, num_blocks)."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.ref_cnt = [0] * num_blocks
        self.free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free)

    def take(self, n: int) -> list[int]:
        blocks = [self.free.popleft() for _ in range(n)]
        for b in blocks:
            self.ref_cnt[b] = 1
        return blocks

    def release(self, blocks: list[int]) -> None:
        # Reverse order: a request's tail blocks are reused first, its head (likeliest shared) last.
        for b in reversed(blocks):
            self.ref_cnt[b] -= 1
            if self.ref_cnt[b] == 0:
                self.free.append(b)
            elif self.ref_cnt[b] < 0:
                raise RuntimeError(f"block {b} freed twice")


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.blocks: dict[str, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def usage(self) -> float:
        return 1.0 - self.pool.num_free / self.pool.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, request_id: str, total_tokens: int) -> bool:
        """Make room for `total_tokens` KV slots for the request; False (and no change) if the pool can't."""
        held = self.blocks.setdefault(request_id, [])
        need = self.blocks_needed(total_tokens) - len(held)
        if need <= 0:
            return True
        if need > self.pool.num_free:
            return False
        held.extend(self.pool.take(need))
        return True

    def free(self, request_id: str) -> None:
        blocks = self.blocks.pop(request_id, None)
        if blocks:
            self.pool.release(blocks)

    def block_ids(self, request_id: str) -> list[int]:
        return self.blocks.get(request_id, [])
