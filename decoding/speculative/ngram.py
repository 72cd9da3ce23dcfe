"""N-gram (prompt lookup) proposer: continue the text the way it continued before.

For the current tokens t[0..L), find the longest n in [min_n, max_n] such that the suffix
t[L-n..L) also occurs earlier, ending at some e <= L-2 (so at least one token follows it),
take the most recent such occurrence (largest e), and propose the tokens that followed it:
t[e+1], t[e+2], ... up to k of them. When the continuation runs into the end of the text
(e + 1 + i >= L) the match is periodic with period P = L-1-e, so it keeps going by repeating
the proposal itself (a loop "a b a b" proposes "a b a b ..." rather than stopping short).

`ngram_propose` is the definition: stateless, O(max_n * L) numpy passes per call. The
engine's `NgramProposer` gives the same answer from an index per request (n-gram -> latest
end position) that is extended only by the tokens appended since the last call: O(max_n)
per new token and O(max_n) per lookup, whatever the sequence length.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from decoding.speculative.proposer import ProposeContext, Proposer


def _check(min_n: int, max_n: int) -> None:
    if not 1 <= min_n <= max_n:
        raise ValueError(f"need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")


def _continue(tokens: Sequence[int], end: int, k: int) -> list[int]:
    """Up to k tokens after position `end`, repeating with period L-1-end past the text's end."""
    period = len(tokens) - 1 - end
    out = list(tokens[end + 1: end + 1 + min(k, period)])
    for i in range(len(out), k):
        out.append(out[i - period])
    return out


def ngram_propose(tokens: Sequence[int], k: int, min_n: int = 2, max_n: int = 4) -> list[int]:
    """The reference prompt-lookup proposal (see the module docstring)."""
    _check(min_n, max_n)
    length = len(tokens)
    if k <= 0 or length < min_n + 1:
        return []
    t = np.asarray(tokens, dtype=np.int64)
    # match[e], e in [0, L-2]: the last j tokens equal the j tokens ending at e.
    match = np.ones(length - 1, dtype=bool)
    best = -1
    for j in range(1, min(max_n, length - 1) + 1):
        match[: j - 1] = False
        match[j - 1:] &= t[: length - j] == t[length - j]
        hits = np.flatnonzero(match)
        if hits.size == 0:
            break
        if j >= min_n:
            best = int(hits[-1])
    if best < 0:
        return []
    return _continue(tokens, best, k)


@dataclass(slots=True)
class _Index:
    """Per request: for each n, n-gram -> the largest end position e (<= L-2) where it occurs."""
    tables: dict[int, dict[tuple[int, ...], int]]
    next_end: int = 0          # end positions < next_end are indexed
    check_token: int = -1      # the token at next_end - 1, to notice a text that changed


class NgramProposer(Proposer):
    """Prompt lookup with an incremental index per request (call `free` when a request ends)."""

    deterministic = True

    def __init__(self, k: int = 4, min_n: int = 2, max_n: int = 4) -> None:
        _check(min_n, max_n)
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        self.k = k            # upper bound on any request's draft, whatever ctx.k says
        self.min_n = min_n
        self.max_n = max_n
        self._index: dict[str, _Index] = {}

    def propose(self, contexts: Sequence[ProposeContext]) -> list[list[int]]:
        return [self.propose_one(c.request_id, c.token_ids, min(c.k, self.k)) for c in contexts]

    def propose_one(self, request_id: str, tokens: Sequence[int], k: int) -> list[int]:
        length = len(tokens)
        if k <= 0 or length < self.min_n + 1:
            return []
        index = self._indexed(request_id, tokens)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            end = index.tables[n].get(tuple(tokens[length - n:]))
            if end is not None:
                return _continue(tokens, end, k)
        return []

    def _indexed(self, request_id: str, tokens: Sequence[int]) -> _Index:
        """The request's index, extended to every end position <= L-2."""
        index = self._index.get(request_id)
        if index is None or index.next_end > len(tokens) - 1 or (
                index.next_end and tokens[index.next_end - 1] != index.check_token):
            # New request, or a text that is not an extension of the indexed one: start over.
            index = self._index[request_id] = _Index({n: {} for n in range(self.min_n, self.max_n + 1)})
        stop = len(tokens) - 1
        if index.next_end < stop:
            lo = max(0, index.next_end - self.max_n + 1)
            window = list(tokens[lo:stop])
            for n, table in index.tables.items():
                for e in range(max(index.next_end, n - 1), stop):
                    table[tuple(window[e - n + 1 - lo: e + 1 - lo])] = e
            index.next_end = stop
            index.check_token = tokens[stop - 1]
        return index

    def free(self, request_id: str) -> None:
        self._index.pop(request_id, None)

    def reset(self) -> None:
        self._index.clear()
