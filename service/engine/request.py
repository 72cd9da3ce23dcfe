"""Per-request state the scheduler and runner share."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from decoding.guided.base import Guide
from decoding.sampling import SamplingParams, TokenLogprobs
from decoding.speculative.proposer import Draft
from decoding.stopping import StopChecker
from service.engine.lora_manager import AdapterRef


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


# Why a sequence ended; the API layers map these names one to one.
FINISH_REASONS = ("length", "stop", "eos", "cancelled", "error")


@dataclass(slots=True)
class Request:
    """One sequence. A request with n > 1 becomes n of these, `index` 0..n-1 under one `parent_id`.

    There is no prefill or decode phase: `num_computed_tokens` catches up with `token_ids`
    (prompt + generated). Chunked prefill, preemption by recompute and prefix hits only move it.
    """
    request_id: str
    parent_id: str
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    stop_checker: StopChecker | None   # None for an embedding request (it generates nothing)
    generator: torch.Generator | None = None
    cache_salt: str = ""
    guide: Guide | None = None                                # guided decoding state (None: unconstrained)
    lora: AdapterRef | None = None                            # the LoRA adapter it runs with (None: base model)
    lora_slot: int = -1                                       # its slot in the LoRA stacks while running
    block_hashes: list[bytes] = field(default_factory=list)   # chained hashes of its full blocks
    num_registered_blocks: int = 0                            # how many of them are in the prefix cache
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    # Speculative decoding: the draft for the next step (the scheduler may cut it; the step that
    # verifies it, a preemption or the finish clears it) and this request's k (0: off).
    spec_draft: Draft | None = None
    num_speculative_tokens: int = 0
    # Output not yet handed to the caller (drained by the engine after each step).
    pending_text: str = ""
    pending_ids: list[int] = field(default_factory=list)
    pending_logprobs: list[TokenLogprobs] = field(default_factory=list)
    # An embedding request (prefill only, no prefix-cache reuse, finished once its prompt is
    # computed): how its hidden states are pooled ("last" | "mean"; None: a generation request),
    # and for mean pooling the sum of the rows computed so far (reset by a preemption).
    pooling: str | None = None
    pool_sum: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_ids):]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_ids)

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED


@dataclass(slots=True)
class RequestOutput:
    """A delta for one sequence: what it produced since the last output."""
    request_id: str                 # the caller's id (parent id for n > 1)
    index: int                      # which of the n samples
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None
    finished: bool
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None
    spec: dict | None = None        # final output of a speculating sequence: its SpecStats.as_dict()
    embedding: torch.Tensor | None = None   # an embedding request's pooled vector [hidden] (float32, CPU)
