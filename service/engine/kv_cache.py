"""Paged KV cache bookkeeping: a pool of fixed-size blocks, per-request block lists, ref counts,
and the prefix cache (full blocks addressed by a chained hash of their tokens).

The scheduler only asks "what prefix is already cached?", "can this request get room for n
more tokens?" and "free it"; which blocks those are stays in here (vLLM v1's KVCacheManager).
The tensors themselves live in the runner; this class hands out block ids into them.

A freed block keeps its contents and its hash: it sits in the free queue (LRU order) where a
later request with the same prefix can take it back, until the pool needs it for new tokens
and evicts it from the front. Shared blocks are always full and never written again — a
request always recomputes at least its last prompt token into a block of its own.

Sliding windows: when every layer of the model attends through a window, a request's blocks
that slid wholly out of it are never read again (the attention kernels start at the block
holding the first visible key), so they go back to the pool as the request advances; their
entries in its block list become FREED. A long request then holds about window / block_size
blocks, not its whole length.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from decoding.prefix_cache import BlockHash, extend_block_hashes


FREED = -1   # a block list entry whose block slid out of the window and went back to the pool


class BlockPool:
    """Ref counts, the LRU free queue, and the hash -> block map."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.ref_cnt = [0] * num_blocks
        # Free blocks, least recently freed first; OrderedDict so a cache hit can pull one out in O(1).
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.hash_of: dict[int, BlockHash] = {}
        self.cached: dict[BlockHash, int] = {}

    @property
    def num_free(self) -> int:
        return len(self.free)

    def take(self, n: int) -> list[int]:
        """Fresh blocks for new tokens: evicts the least recently used cached ones."""
        blocks = []
        for _ in range(n):
            b, _ = self.free.popitem(last=False)
            h = self.hash_of.pop(b, None)
            if h is not None and self.cached.get(h) == b:
                del self.cached[h]
            self.ref_cnt[b] = 1
            blocks.append(b)
        return blocks

    def touch(self, blocks: list[int]) -> None:
        """Take a reference on cache hits (pulling any free ones out of the free queue)."""
        for b in blocks:
            if self.ref_cnt[b] == 0:
                del self.free[b]
            self.ref_cnt[b] += 1

    def release(self, blocks: list[int]) -> None:
        # Reverse order: a request's tail blocks are evicted first, its head (likeliest shared) last.
        for b in reversed(blocks):
            self.ref_cnt[b] -= 1
            if self.ref_cnt[b] == 0:
                self.free[b] = None
            elif self.ref_cnt[b] < 0:
                raise RuntimeError(f"block {b} freed twice")

    def register(self, block: int, h: BlockHash) -> None:
        if h not in self.cached:  # an equal block may already be cached; keep the first
            self.cached[h] = block
            self.hash_of[block] = h

    def reset_hashes(self) -> None:
        self.cached.clear()
        self.hash_of.clear()


@dataclass(slots=True)
class PrefixStats:
    queries: int = 0      # prompt tokens looked up
    hits: int = 0         # of those, found cached

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 window: int | None = None) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.blocks: dict[str, list[int]] = {}
        # The window every layer attends through (None: some layer sees the whole sequence).
        self.window = window
        self._num_freed: dict[str, int] = {}   # per request: its leading blocks already given back
        self.enable_prefix_caching = enable_prefix_caching
        self.stats = PrefixStats()

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def usage(self) -> float:
        return 1.0 - self.pool.num_free / self.pool.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def cached_prefix(self, token_ids: list[int], hashes: list[BlockHash], salt: str = "") -> list[int]:
        """Blocks holding the longest cached prefix of token_ids, leaving at least the last token
        to compute (its logits are needed). `hashes` is the request's hash list, extended here."""
        if not self.enable_prefix_caching:
            return []
        usable = (len(token_ids) - 1) // self.block_size
        extend_block_hashes(hashes, token_ids, usable * self.block_size, self.block_size, salt)
        hit: list[int] = []
        for h in hashes[:usable]:
            b = self.pool.cached.get(h)
            if b is None:
                break
            hit.append(b)
        return hit

    def record_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.stats.queries += num_tokens
        self.stats.hits += num_hit_tokens

    def allocate(self, request_id: str, total_tokens: int, cached: list[int] | None = None) -> bool:
        """Make room for `total_tokens` KV slots, starting from `cached` prefix blocks for a new
        request; False (and no change) if the pool can't."""
        held = self.blocks.get(request_id)
        if held is None:
            held = []
            cached = cached or []
            # Hit blocks sitting in the free queue stop counting as free once we take them.
            reclaimed = sum(1 for b in cached if self.pool.ref_cnt[b] == 0)
            need = self.blocks_needed(total_tokens) - len(cached)
            if need + reclaimed > self.pool.num_free:
                return False
            self.pool.touch(cached)
            held = self.blocks[request_id] = list(cached)
        need = self.blocks_needed(total_tokens) - len(held)
        if need > self.pool.num_free:
            return False
        if need > 0:
            held.extend(self.pool.take(need))
        return True

    def cache_full_blocks(self, request_id: str, token_ids: list[int], num_computed: int,
                          hashes: list[BlockHash], start: int, salt: str = "") -> int:
        """Register the request's blocks [start, ...) that are now completely computed; returns
        how many of its blocks are registered in all."""
        if not self.enable_prefix_caching:
            return start
        held = self.blocks.get(request_id, [])
        full = min(len(held), num_computed // self.block_size)
        extend_block_hashes(hashes, token_ids, full * self.block_size, self.block_size, salt)
        for i in range(start, full):
            if held[i] != FREED:
                self.pool.register(held[i], hashes[i])
        return max(start, full)

    def free_outside_window(self, request_id: str, num_computed: int) -> int:
        """Give back the request's blocks that no later query can see: its next token (position
        num_computed) sees keys from num_computed - window + 1 on, and every later one sees less.
        Returns how many blocks went back."""
        if self.window is None or request_id not in self.blocks:
            return 0
        held = self.blocks[request_id]
        first_visible = max(0, num_computed - self.window + 1) // self.block_size
        done = self._num_freed.get(request_id, 0)
        if first_visible <= done:
            return 0
        gone = held[done:first_visible]
        held[done:first_visible] = [FREED] * len(gone)
        self._num_freed[request_id] = first_visible
        self.pool.release(gone)
        return len(gone)

    def num_held(self, request_id: str) -> int:
        """Blocks the request holds now (its list less the FREED entries)."""
        return len(self.blocks.get(request_id, [])) - self._num_freed.get(request_id, 0)

    def free(self, request_id: str) -> None:
        blocks = self.blocks.pop(request_id, None)
        done = self._num_freed.pop(request_id, 0)
        if blocks:
            self.pool.release(blocks[done:])

    def block_ids(self, request_id: str) -> list[int]:
        return self.blocks.get(request_id, [])

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash (admin call). Blocks in use keep their contents; nothing new hits them."""
        self.pool.reset_hashes()
