"""Speculation counters, per request and in aggregate, and the rule that switches speculation
off for a request whose drafts keep being rejected.

A *draft* is one verification of a request with k >= 1 draft tokens (a step where the
proposer had nothing is not a draft). With `a` of its k tokens accepted, the request gained
a + 1 tokens from one target forward, so the mean acceptance length is
1 + accepted_tokens / drafts (vLLM's definition): the tokens per verified step.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass(slots=True)
class SpecStats:
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    drafted_per_position: list[int] = field(default_factory=list)    # [j]: drafts with > j tokens
    accepted_per_position: list[int] = field(default_factory=list)   # [j]: drafts whose token j was accepted

    def record(self, num_draft_tokens: int, num_accepted: int) -> None:
        """One verification: `num_accepted` of `num_draft_tokens` drafts accepted (a prefix)."""
        if num_draft_tokens < 0 or not 0 <= num_accepted <= max(num_draft_tokens, 0):
            raise ValueError(f"need 0 <= accepted <= drafted, got {num_accepted} of {num_draft_tokens}")
        if num_draft_tokens == 0:
            return
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        _grow(self.drafted_per_position, num_draft_tokens)
        _grow(self.accepted_per_position, num_draft_tokens)
        for j in range(num_draft_tokens):
            self.drafted_per_position[j] += 1
        for j in range(num_accepted):
            self.accepted_per_position[j] += 1

    def merge(self, other: SpecStats) -> None:
        self.num_drafts += other.num_drafts
        self.num_draft_tokens += other.num_draft_tokens
        self.num_accepted_tokens += other.num_accepted_tokens
        for mine, theirs in ((self.drafted_per_position, other.drafted_per_position),
                             (self.accepted_per_position, other.accepted_per_position)):
            _grow(mine, len(theirs))
            for j, v in enumerate(theirs):
                mine[j] += v

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted tokens (0 when nothing was drafted)."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """1 + accepted / drafts: tokens gained per verification (1.0 when nothing was drafted)."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 1.0

    def as_dict(self) -> dict:
        return {
            "num_drafts": self.num_drafts,
            "num_draft_tokens": self.num_draft_tokens,
            "num_accepted_tokens": self.num_accepted_tokens,
            "accepted_per_position": list(self.accepted_per_position),
            "drafted_per_position": list(self.drafted_per_position),
            "acceptance_rate": self.acceptance_rate,
            "mean_acceptance_length": self.mean_acceptance_length,
        }


def _grow(values: list[int], n: int) -> None:
    if len(values) < n:
        values.extend([0] * (n - len(values)))


@dataclass(slots=True)
class AutoDisablePolicy:
    """Switch speculation off for a request when, over its last `window` drafts, fewer than
    `min_acceptance_rate` of the drafted tokens were accepted. Each verified step costs k extra
    target positions (and, for a draft model, k draft forwards); at a low rate that costs more
    than it saves. `window` = 0 never disables."""
    window: int = 8
    min_acceptance_rate: float = 0.2

    def __post_init__(self) -> None:
        if self.window < 0:
            raise ValueError(f"window must be >= 0, got {self.window}")
        if not 0.0 <= self.min_acceptance_rate <= 1.0:
            raise ValueError(f"min_acceptance_rate must be in [0, 1], got {self.min_acceptance_rate}")


@dataclass(slots=True)
class _RequestState:
    stats: SpecStats = field(default_factory=SpecStats)
    recent: deque = field(default_factory=deque)    # (drafted, accepted) of the last `window` drafts
    enabled: bool = True


class SpecTracker:
    """The engine's book of speculation: one per engine (aggregate + per live request)."""

    def __init__(self, policy: AutoDisablePolicy | None = None) -> None:
        self.policy = policy or AutoDisablePolicy()
        self.aggregate = SpecStats()
        self.num_disabled = 0           # requests switched off by the policy, ever
        self._requests: dict[str, _RequestState] = {}

    def record(self, request_id: str, num_draft_tokens: int, num_accepted: int) -> None:
        if num_draft_tokens == 0:
            return
        state = self._requests.setdefault(request_id, _RequestState())
        state.stats.record(num_draft_tokens, num_accepted)
        self.aggregate.record(num_draft_tokens, num_accepted)
        window = self.policy.window
        if not window or not state.enabled:
            return
        state.recent.append((num_draft_tokens, num_accepted))
        if len(state.recent) > window:
            state.recent.popleft()
        if len(state.recent) == window:
            drafted = sum(d for d, _ in state.recent)
            accepted = sum(a for _, a in state.recent)
            if accepted < self.policy.min_acceptance_rate * drafted:
                state.enabled = False
                self.num_disabled += 1

    def enabled(self, request_id: str) -> bool:
        state = self._requests.get(request_id)
        return state is None or state.enabled

    def stats(self, request_id: str) -> SpecStats:
        state = self._requests.get(request_id)
        return state.stats if state is not None else SpecStats()

    def finish(self, request_id: str) -> SpecStats:
        """Forget a finished request; returns its counters (for its final response)."""
        state = self._requests.pop(request_id, None)
        return state.stats if state is not None else SpecStats()
