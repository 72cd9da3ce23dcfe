"""Suffix decoding (Oliaro et al., 2024): draft from what followed the same tokens before — in
this request's own prompt and output, and in the outputs of earlier requests.

A `SuffixTree` is a trie of every substring (up to `depth` tokens) of the sequences put in it;
the node of a pattern P counts how often P occurred, so its children say what followed P and
how often. To draft, the longest suffix of the request's tokens found in a tree anchors a walk
that follows the most frequent child at each step, while the product of the chosen children's
frequencies (the draft's estimated chance of surviving so far) stays above `min_prob`; when the
walk runs out of depth or children, it re-anchors on the text drafted so far. That score is the
expected number of accepted tokens, which picks between the request's own tree and the shared
one.

Two kinds of tree:
- one per running request, over its prompt + output, extended online: O(depth) per new token;
- one per cache salt (a tenant, or a LoRA adapter) over the outputs of finished requests, the
  agent / structured-output case where the same shapes recur across requests. Together they
  hold at most `max_global_tokens` tokens, oldest sequences out first; no text crosses salts.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from decoding.speculative.proposer import Draft, ProposeContext, Proposer


class _Node:
    __slots__ = ("count", "children")

    def __init__(self) -> None:
        self.count = 0
        self.children: dict[int, _Node] | None = None


class SuffixTree:
    """Counts of every substring of up to `depth` tokens of the sequences added."""

    def __init__(self, depth: int = 16) -> None:
        if depth < 2:
            raise ValueError(f"depth must be >= 2, got {depth}")
        self.depth = depth
        self.root = _Node()
        self.num_nodes = 0

    # ---- building ----------------------------------------------------------------------------

    def start(self) -> list[_Node]:
        """The frontier of an empty sequence (nodes of its suffixes of length 0 .. depth-1)."""
        return [self.root]

    def push(self, frontier: list[_Node], token: int) -> list[_Node]:
        """Append `token` to the sequence whose frontier this is; returns the new frontier."""
        nxt = [self.root]
        for i, node in enumerate(frontier):
            if node.children is None:
                node.children = {}
            child = node.children.get(token)
            if child is None:
                child = node.children[token] = _Node()
                self.num_nodes += 1
            child.count += 1
            if i + 1 < self.depth:
                nxt.append(child)
        return nxt

    def add(self, tokens: Sequence[int]) -> None:
        frontier = self.start()
        for t in tokens:
            frontier = self.push(frontier, t)

    def remove(self, tokens: Sequence[int]) -> None:
        """Undo `add(tokens)` (the same sequence added earlier)."""
        frontier = [self.root]
        for t in tokens:
            nxt = [self.root]
            for i, node in enumerate(frontier):
                child = node.children[t] if node.children else None
                if child is None:
                    continue   # pruned already: only the count bookkeeping of a removed branch
                child.count -= 1
                if child.count <= 0:
                    del node.children[t]
                    self.num_nodes -= _size(child)
                    continue
                if i + 1 < self.depth:
                    nxt.append(child)
            frontier = nxt

    # ---- drafting ------------------------------------------------------------------------------

    def _anchor(self, context: Sequence[int], max_match: int, min_match: int = 2) -> _Node | None:
        """The node of the longest suffix of `context` (min_match to max_match tokens) that has
        children. One token is too weak a match to draft from (it anchors on every newline)."""
        for m in range(min(max_match, self.depth - 1, len(context)), min_match - 1, -1):
            node = self.root
            for t in context[len(context) - m:]:
                node = node.children.get(t) if node.children else None
                if node is None:
                    break
            if node is not None and node.children:
                return node
        return None

    def draft(self, context: Sequence[int], k: int, min_prob: float = 0.1,
              max_match: int = 16) -> tuple[list[int], float, list[float]]:
        """Up to k tokens following `context`, their score (expected accepted tokens) and each
        token's frequency given the ones before it."""
        out: list[int] = []
        conf: list[float] = []
        score, prob = 0.0, 1.0
        node = self._anchor(context, max_match)
        depth = 0
        while node is not None and len(out) < k:
            if not node.children or depth >= self.depth - 1:
                node = self._anchor(list(context[-max_match:]) + out, max_match)   # re-anchor
                depth = 0
                continue
            total = sum(c.count for c in node.children.values())
            token, child = max(node.children.items(), key=lambda kv: kv[1].count)
            prob *= child.count / total
            if prob < min_prob:
                break
            out.append(token)
            conf.append(child.count / total)
            score += prob
            node, depth = child, depth + 1
        return out, score, conf


def _size(node: _Node) -> int:
    n, stack = 0, [node]
    while stack:
        x = stack.pop()
        n += 1
        if x.children:
            stack.extend(x.children.values())
    return n


@dataclass(slots=True)
class _Request:
    tree: SuffixTree
    frontier: list
    length: int = 0            # tokens in the tree
    last_token: int = -1       # tokens[length - 1], to notice a text that is not an extension


@dataclass(slots=True)
class _Shared:
    """The outputs of finished requests, per cache salt, bounded in tokens, oldest out first."""
    depth: int
    max_tokens: int
    trees: dict[str, SuffixTree] = field(default_factory=dict)
    order: deque = field(default_factory=deque)   # (salt, tokens), oldest first
    num_tokens: int = 0

    def add(self, salt: str, tokens: Sequence[int]) -> None:
        tokens = list(tokens[-self.max_tokens:])
        if not tokens:
            return
        tree = self.trees.get(salt)
        if tree is None:
            tree = self.trees[salt] = SuffixTree(self.depth)
        tree.add(tokens)
        self.order.append((salt, tokens))
        self.num_tokens += len(tokens)
        while self.num_tokens > self.max_tokens:
            old_salt, old = self.order.popleft()
            self.trees[old_salt].remove(old)
            self.num_tokens -= len(old)
            if not self.trees[old_salt].root.children:
                del self.trees[old_salt]

    @property
    def num_nodes(self) -> int:
        return sum(t.num_nodes for t in self.trees.values())


class SuffixProposer(Proposer):
    """Suffix decoding over the request's own text and the shared outputs of its salt."""

    deterministic = True

    def __init__(self, k: int = 4, depth: int = 16, min_prob: float = 0.1, max_global_tokens: int = 16384,
                 max_requests: int = 4096) -> None:
        self.k, self.depth, self.min_prob = k, depth, min_prob
        self.shared = _Shared(depth, max_global_tokens)
        self.max_requests = max_requests
        self._requests: OrderedDict[str, _Request] = OrderedDict()

    def propose(self, contexts: Sequence[ProposeContext]) -> list[list[int]]:
        return [d.tokens for d in self.draft(contexts)]

    def draft(self, contexts: Sequence[ProposeContext]) -> list[Draft]:
        return [self._draft_one(c) for c in contexts]

    def _draft_one(self, ctx: ProposeContext) -> Draft:
        k = min(ctx.k, self.k)
        if k <= 0:
            return Draft([])
        own = self._indexed(ctx.request_id, ctx.token_ids)
        tokens, score, conf = own.tree.draft(ctx.token_ids, k, self.min_prob)
        shared = self.shared.trees.get(ctx.cache_salt)
        if shared is not None:
            other = shared.draft(ctx.token_ids, k, self.min_prob)
            if other[1] > score:
                tokens, score, conf = other
        return Draft(tokens, confidence=conf)

    def _indexed(self, request_id: str, tokens: Sequence[int]) -> _Request:
        state = self._requests.get(request_id)
        if state is None or state.length > len(tokens) or (
                state.length and tokens[state.length - 1] != state.last_token):
            tree = SuffixTree(self.depth)
            state = self._requests[request_id] = _Request(tree, tree.start())
            while len(self._requests) > self.max_requests:   # bounded even if `free` is never called
                self._requests.popitem(last=False)
        for t in tokens[state.length:]:
            state.frontier = state.tree.push(state.frontier, t)
        state.length = len(tokens)
        state.last_token = tokens[-1] if tokens else -1
        return state

    def complete(self, request_id: str, token_ids: Sequence[int], num_prompt_tokens: int, cache_salt: str) -> None:
        self.shared.add(cache_salt, token_ids[num_prompt_tokens:])

    def free(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    def reset(self) -> None:
        self._requests.clear()
        self.shared = _Shared(self.depth, self.shared.max_tokens)

    def memory(self) -> dict[str, int]:
        """Nodes held (each ~100 bytes), for metrics."""
        return {"shared_tokens": self.shared.num_tokens, "shared_nodes": self.shared.num_nodes,
                "request_nodes": sum(r.tree.num_nodes for r in self._requests.values())}
