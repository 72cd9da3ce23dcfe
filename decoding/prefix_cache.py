"""Content addresses for full KV blocks: a chained hash of the block's tokens.

Block i's hash covers its own token ids and block i-1's hash, so equal hashes mean equal
whole prefixes, not just equal blocks. The first block also takes `extra` (cache salt,
adapter id): two tenants with different salts never share a block, so neither can learn from
timing what the other's prompts were. SHA-256 keeps collisions out of the question.
"""
from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

BlockHash = bytes


def hash_block(parent: BlockHash | None, tokens: Sequence[int], extra: str = "") -> BlockHash:
    h = hashlib.sha256()
    h.update(parent if parent is not None else b"root:" + extra.encode())
    h.update(array("q", tokens).tobytes())
    return h.digest()


def extend_block_hashes(
    hashes: list[BlockHash], token_ids: Sequence[int], num_tokens: int, block_size: int, extra: str = ""
) -> list[BlockHash]:
    """Append hashes for every block that is full within the first `num_tokens` tokens."""
    for i in range(len(hashes), num_tokens // block_size):
        parent = hashes[i - 1] if i else None
        hashes.append(hash_block(parent, token_ids[i * block_size:(i + 1) * block_size], extra))
    return hashes
