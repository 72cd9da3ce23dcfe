"""One token budget per step, shared by decodes and prefill chunks (vLLM v1's scheduler).

Each step: running requests first (in arrival order), each taking what it still needs up to
the remaining budget — one token for a decode, a chunk for a long prompt, a decode plus its
draft tokens for a speculating request (drafts are cut first when the budget is short, and
dropped rather than preempting anyone when the pool is). When the pool can't
hold a running request's next tokens, the newest running request is preempted (its blocks
freed, recomputed later). Then waiting requests are admitted in FCFS order while budget,
sequence slots and blocks allow; the head of the queue is never skipped, so none starves.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from service.engine.kv_cache import KVCacheManager
from service.engine.lora_manager import LoRAManager
from service.engine.request import Request, RequestStatus
from service.engine.step import SeqInput


@dataclass(slots=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 1024   # the per-step token budget
    max_num_seqs: int = 256              # running sequences at once
    max_model_len: int = 2048            # prompt + output, per sequence


@dataclass(slots=True)
class ScheduledBatch:
    requests: list[Request] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)   # tokens computed for each request this step
    # Per request: the draft tokens among its num_tokens (they come after its real tokens; [] if none).
    spec_tokens: list[list[int]] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    def __len__(self) -> int:
        return len(self.requests)

    def seq_inputs(self) -> list[SeqInput]:
        """The step as the runner sees it. A request whose real tokens all get computed this step
        wants logits: one row, or 1 + k for a draft of k (its last real token's row, then each draft's)."""
        out = []
        for req, n, spec in zip(self.requests, self.num_tokens, self.spec_tokens):
            start = req.num_computed_tokens
            real = n - len(spec)
            done = start + real == req.num_tokens
            if req.pooling is not None:   # an embedding request: hidden states, no logits
                out.append(SeqInput(req.request_id, req.token_ids[start:start + real], start, 0, want_hidden=True))
                continue
            out.append(SeqInput(req.request_id, req.token_ids[start:start + real] + spec, start,
                                len(spec) + 1 if done else 0, req.lora_slot))
        return out


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, lora: LoRAManager | None = None) -> None:
        self.config = config
        self.kv = kv
        self.lora = lora   # pins a running request's adapter in a slot of the LoRA stacks
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            self.kv.free_outside_window(req.request_id, req.num_computed_tokens)
            n, spec = self._with_draft(req, budget)
            if self._make_room(req, n, batch):
                batch.requests.append(req)
                batch.num_tokens.append(n)
                batch.spec_tokens.append(spec)
                budget -= n
                i += 1
            # else: req itself was preempted and removed from running; index i now holds the next one.
        if not batch.preempted:
            self._admit(batch, budget)
        return batch

    def _with_draft(self, req: Request, budget: int) -> tuple[int, list[int]]:
        """Tokens to compute for a running request, and which of them are its (possibly cut) draft."""
        real = req.num_tokens - req.num_computed_tokens
        draft = req.spec_draft
        if draft is None or not draft.tokens:
            return min(real, budget), []
        keep = max(0, min(len(draft.tokens), budget - real))
        # Draft slots are worth taking only if they fit without evicting anyone.
        if keep and not self.kv.allocate(req.request_id, req.num_computed_tokens + real + keep):
            keep = 0
        req.spec_draft = draft.truncate(keep) if keep else None
        return min(real + keep, budget), list(draft.tokens[:keep])

    def _make_room(self, req: Request, n: int, batch: ScheduledBatch) -> bool:
        """Allocate KV for `req`'s next n tokens, preempting from the back of `running` as needed."""
        while not self.kv.allocate(req.request_id, req.num_computed_tokens + n):
            victim = self.running.pop()
            self._preempt(victim)
            batch.preempted.append(victim)
            if victim is req:
                return False
        return True

    def _preempt(self, req: Request) -> None:
        # Recompute, not swap: drop the KV; prompt + output so far is recomputed when it returns.
        self.kv.free(req.request_id)
        self._unpin(req)
        req.num_computed_tokens = 0
        req.spec_draft = None
        req.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(req)
        self.num_preemptions += 1

    def _admit(self, batch: ScheduledBatch, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if self._sibling_prefilling(req):
                break  # n > 1: let one sample compute the prompt, the others then hit the cache
            # Embedding requests compute every token: mean pooling needs each row's hidden state.
            cached = [] if req.pooling is not None else self.kv.cached_prefix(req.token_ids, req.block_hashes,
                                                                               req.cache_salt)
            num_cached = len(cached) * self.kv.block_size
            n = min(req.num_tokens - num_cached, budget)
            if req.lora is not None and self.lora is not None:
                slot = self.lora.pin(req.lora)
                if slot is None:
                    break   # every slot runs other adapters: wait for one (FCFS, as for blocks)
                req.lora_slot = slot
            if not self.kv.allocate(req.request_id, num_cached + n, cached):
                self._unpin(req)
                break
            req.num_computed_tokens = num_cached
            if req.status is RequestStatus.WAITING and req.pooling is None:
                # Reported in usage and metrics; a preempted request's re-run doesn't count again.
                req.num_cached_tokens = num_cached
                self.kv.record_lookup(req.num_prompt_tokens, num_cached)
            req.num_registered_blocks = len(cached)
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            batch.requests.append(req)
            batch.num_tokens.append(n)
            batch.spec_tokens.append([])
            budget -= n

    def _sibling_prefilling(self, req: Request) -> bool:
        if req.index == 0 or not self.kv.enable_prefix_caching:
            return False
        return any(r.parent_id == req.parent_id and r.num_computed_tokens < r.num_prompt_tokens
                   for r in self.running)

    def finish(self, req: Request, reason: str) -> None:
        """Take a request out (done, aborted or failed) and return its blocks."""
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
            self._unpin(req)
        elif req.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
            self.waiting.remove(req)
        if req.lora is not None and self.lora is not None and req.status is not RequestStatus.FINISHED:
            self.lora.release(req.lora)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.spec_draft = None
        self.kv.free(req.request_id)

    def _unpin(self, req: Request) -> None:
        if req.lora_slot >= 0 and self.lora is not None and req.lora is not None:
            self.lora.unpin(req.lora)
        req.lora_slot = -1
