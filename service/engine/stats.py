"""A snapshot of the engine's counters, taken on the engine thread.

Metrics, the admin RPCs and tests read engine state through this object only: it is built
between two steps by the thread that owns `EngineCore`, so no other thread ever walks the
scheduler's queues or the KV pool while a step mutates them."""
from __future__ import annotations

from dataclasses import dataclass, field

from decoding.speculative import SpecStats


@dataclass(slots=True, frozen=True)
class EngineStats:
    num_running: int = 0              # sequences in the running batch
    num_waiting: int = 0              # sequences waiting to be scheduled (preempted ones included)
    num_blocks: int = 0               # KV pool size
    num_free_blocks: int = 0
    prefix_queried_tokens: int = 0    # prompt tokens looked up in the prefix cache
    prefix_hit_tokens: int = 0        # of those, found cached
    num_preemptions: int = 0
    spec: SpecStats = field(default_factory=SpecStats)   # speculative decoding since start-up
    spec_num_disabled: int = 0        # requests whose speculation switched itself off
    # What the proposer holds (suffix decoding: tokens and tree nodes of the shared store and of
    # the running requests' trees); empty for proposers that hold nothing worth counting.
    spec_memory: dict[str, int] = field(default_factory=dict)
    lora_resident: int = 0            # LoRA adapters in the batch's stacks
    lora_loaded: int = 0              # LoRA adapters served

    @property
    def kv_usage(self) -> float:
        """Fraction of KV blocks in use (0-1)."""
        return 1.0 - self.num_free_blocks / self.num_blocks if self.num_blocks else 0.0

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_queried_tokens if self.prefix_queried_tokens else 0.0
