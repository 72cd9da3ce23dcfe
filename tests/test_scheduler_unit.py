"""Scheduler + KV manager without a model (vLLM's tests/v1/core/test_scheduler.py style).

Requests are built by hand; `Driver.step` mirrors what `EngineCore.step` does after
`scheduler.schedule()` — the runner's work is replaced by a fake "model" whose next token is a
function of the position only, so every output is known in advance:

- real tokens' KV counts as computed (`num_computed_tokens += n - len(spec)`) and, for a request
  with no draft, its now-full blocks are registered in the prefix cache;
- a request whose real tokens are all computed gets one sampled token (plain) or its accepted
  drafts plus one more (verifying: `num_computed_tokens += accepted`, blocks registered after);
- tokens are appended through the request's real `StopChecker` (with a one-character-per-token
  decoder, the lightest real tokenizer), and a finish goes through `Scheduler.finish`;
- requests that go on and may speculate get a draft (`req.spec_draft`) for the next step, capped
  as `Speculator.propose` caps it (k, and room under max_tokens for the bonus token).

After every schedule the driver checks what must hold for the runner (budget, sequence slots,
block tables that cover every position written, consistent ref counts); every test ends with
the pool whole.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import pytest

from decoding.sampling import SamplingParams
from decoding.speculative.proposer import Draft
from decoding.stopping import StopChecker
from service.engine.kv_cache import KVCacheManager
from service.engine.request import Request, RequestStatus
from service.engine.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from service.engine.step import SeqInput

BS = 4
EOS = 2


class CharDecoder:
    """The `Decoder` StopChecker needs: one lowercase letter per token id."""

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(ord("a") + int(t) % 26) for t in ids)


def model_token(pos: int) -> int:
    """The fake model's output at position `pos` (never EOS)."""
    return 10 + (7 * pos) % 89


def make_req(rid: str, prompt: Sequence[int], max_tokens: int = 4, *, parent: str | None = None,
             index: int = 0, salt: str = "", k: int = 0, eos: Sequence[int] = (EOS,)) -> Request:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    req = Request(
        request_id=rid, parent_id=parent or rid, index=index, prompt_ids=list(prompt), params=params,
        stop_checker=StopChecker(params, CharDecoder(), list(prompt), eos), cache_salt=salt,
    )
    req.num_speculative_tokens = k
    return req


def prompt_of(n: int, base: int = 100) -> list[int]:
    return [base + i for i in range(n)]


Drafter = Callable[[Request, int], list[int]]


def perfect_drafter(req: Request, k: int) -> list[int]:
    return [model_token(req.num_tokens + j) for j in range(k)]


class Driver:
    """A model-free EngineCore: schedule, fake execute, sample/verify, commit, propose."""

    def __init__(self, *, num_blocks: int, budget: int, max_seqs: int = 256, block_size: int = BS,
                 prefix_caching: bool = True, drafter: Drafter = perfect_drafter,
                 next_token: Callable[[Request], int] | None = None) -> None:
        self.kv = KVCacheManager(num_blocks, block_size, prefix_caching)
        self.config = SchedulerConfig(budget, max_seqs, num_blocks * block_size)
        self.sched = Scheduler(self.config, self.kv)
        self.drafter = drafter
        self.next_token = next_token or (lambda r: model_token(r.num_tokens))
        self.num_steps = 0
        self.batches: list[ScheduledBatch] = []
        self.inputs: list[list[SeqInput]] = []     # what the runner got, step by step
        self.finished_at: dict[str, int] = {}
        self.first_scheduled: list[str] = []

    def add(self, *reqs: Request) -> None:
        for r in reqs:
            self.sched.add(r)

    def step(self) -> ScheduledBatch:
        sched, kv = self.sched, self.kv
        batch = sched.schedule()
        self.num_steps += 1
        self.batches.append(batch)
        self.check(batch)
        seqs = batch.seq_inputs()   # what the runner gets: taken before anything advances
        self.inputs.append(seqs)
        if not batch.requests:
            return batch
        for s, req, n, spec in zip(seqs, batch.requests, batch.num_tokens, batch.spec_tokens):
            assert s.start == req.num_computed_tokens
            assert s.token_ids == req.token_ids[s.start:s.start + n - len(spec)] + spec
            if req.request_id not in self.first_scheduled:
                self.first_scheduled.append(req.request_id)
        # _execute
        for req, n, spec in zip(batch.requests, batch.num_tokens, batch.spec_tokens):
            req.num_computed_tokens += n - len(spec)
            if not spec:
                self.register(req)
        plain = [r for s, r in zip(seqs, batch.requests) if s.num_logits and r.spec_draft is None]
        verifying = [(s, r) for s, r in zip(seqs, batch.requests) if s.num_logits and r.spec_draft is not None]
        # _verify: the target agrees with the draft as long as the draft is what the model says.
        for s, req in verifying:
            draft = req.spec_draft.tokens
            assert s.num_logits == len(draft) + 1
            accepted = 0
            while accepted < len(draft) and draft[accepted] == model_token(req.num_tokens + accepted):
                accepted += 1
            req.spec_draft = None
            req.num_computed_tokens += accepted
            self.commit(req, draft[:accepted] + [model_token(req.num_tokens + accepted)])
            if not req.finished:
                self.register(req)
        # _sample
        for req in plain:
            self.commit(req, [self.next_token(req)])
        # Speculator.propose
        for req in plain + [r for _, r in verifying]:
            if req.finished or not req.num_speculative_tokens:
                continue
            k = min(req.num_speculative_tokens, req.params.max_tokens - req.num_output_tokens - 1)
            if k > 0:
                tokens = self.drafter(req, k)
                req.spec_draft = Draft(tokens) if tokens else None
        return batch

    def register(self, req: Request) -> None:
        req.num_registered_blocks = self.kv.cache_full_blocks(
            req.request_id, req.token_ids, req.num_computed_tokens, req.block_hashes,
            req.num_registered_blocks, req.cache_salt)

    def commit(self, req: Request, tokens: list[int]) -> None:
        for tok in tokens:
            req.token_ids.append(tok)
            _, reason = req.stop_checker.append(tok)
            if reason is not None:
                self.sched.finish(req, reason)
                self.finished_at[req.request_id] = self.num_steps
                break

    def run(self, max_steps: int = 1000) -> int:
        start = self.num_steps
        while self.sched.has_work:
            assert self.num_steps - start < max_steps, "scheduler made no progress"
            self.step()
        return self.num_steps - start

    # ---- invariants after every schedule() ----------------------------------------------------

    def check(self, batch: ScheduledBatch) -> None:
        sched, kv = self.sched, self.kv
        assert batch.total_tokens <= self.config.max_num_batched_tokens
        assert len(sched.running) <= self.config.max_num_seqs
        assert len(batch.requests) == len(batch.num_tokens) == len(batch.spec_tokens)
        assert len({id(r) for r in batch.requests}) == len(batch.requests)
        running_ids = {id(r) for r in sched.running}
        for req, n, spec in zip(batch.requests, batch.num_tokens, batch.spec_tokens):
            assert req.status is RequestStatus.RUNNING and id(req) in running_ids
            assert n >= 1 and len(spec) < n
            assert req.num_computed_tokens + n - len(spec) <= req.num_tokens
            # The runner writes KV at positions [start, start + n): the block table must cover them.
            assert len(kv.block_ids(req.request_id)) * kv.block_size >= req.num_computed_tokens + n
        for req in batch.preempted:
            assert req.status is RequestStatus.PREEMPTED and req.num_computed_tokens == 0
            assert id(req) not in running_ids and req in sched.waiting
            assert kv.block_ids(req.request_id) == []
        for req in sched.waiting:
            assert id(req) not in running_ids and req.request_id not in kv.blocks
        assert_pool_consistent(kv, sched)


def assert_pool_consistent(kv: KVCacheManager, sched: Scheduler) -> None:
    pool = kv.pool
    holders = [0] * pool.num_blocks
    for rid, blocks in kv.blocks.items():
        assert len(set(blocks)) == len(blocks), f"{rid} holds a block twice"
        for b in blocks:
            holders[b] += 1
    assert holders == pool.ref_cnt
    assert set(pool.free) == {b for b in range(pool.num_blocks) if pool.ref_cnt[b] == 0}
    assert set(kv.blocks) <= {r.request_id for r in sched.running}


def assert_pool_whole(d: Driver) -> None:
    assert not d.sched.running and not d.sched.waiting
    assert d.kv.blocks == {}
    assert d.kv.num_free_blocks == d.kv.pool.num_blocks
    assert all(c == 0 for c in d.kv.pool.ref_cnt)


def expected_output(req: Request, max_tokens: int) -> list[int]:
    return [model_token(req.num_prompt_tokens + j) for j in range(max_tokens)]


# ---- admission ---------------------------------------------------------------------------------


def test_fcfs_admission_respects_max_num_seqs() -> None:
    d = Driver(num_blocks=64, budget=1000, max_seqs=2)
    reqs = [make_req(f"r{i}", prompt_of(3 + i, base=100 * (i + 1)), max_tokens=2 + i) for i in range(5)]
    d.add(*reqs)
    first = d.step()
    assert [r.request_id for r in first.requests] == ["r0", "r1"]
    assert first.num_tokens == [3, 4]           # whole prompts: the budget is large
    assert [r.request_id for r in d.sched.waiting] == ["r2", "r3", "r4"]
    d.run()
    assert d.first_scheduled == [r.request_id for r in reqs]       # admitted in arrival order
    assert max(len(b) for b in d.batches) == 2
    for r in reqs:
        assert r.finish_reason == "length" and r.output_ids == expected_output(r, r.params.max_tokens)
    # A slot frees only when a request finishes: r2 starts the step after r0 (2 tokens) is done.
    assert d.finished_at["r0"] == 2 and d.batches[2].requests[-1].request_id == "r2"
    assert_pool_whole(d)


def test_head_of_queue_is_never_skipped() -> None:
    # 4 blocks of 4 tokens. `big` (10-token prompt, 3 blocks) cannot be admitted while `a` holds
    # 2 blocks; `small` behind it would fit, but FCFS keeps it waiting behind the head.
    d = Driver(num_blocks=4, budget=100, prefix_caching=False)
    a = make_req("a", prompt_of(7), max_tokens=2)
    d.add(a)
    d.step()
    big, small = make_req("big", prompt_of(10, base=300), max_tokens=2), make_req("small", [5], max_tokens=1)
    d.add(big, small)
    b = d.step()
    assert [r.request_id for r in b.requests] == ["a"]
    assert [r.request_id for r in d.sched.waiting] == ["big", "small"]
    assert a.finished                 # a's 2nd token: its blocks come back
    b = d.step()
    assert [r.request_id for r in b.requests] == ["big", "small"]   # both fit now, head first
    assert b.num_tokens == [10, 1]
    d.run()
    assert d.first_scheduled == ["a", "big", "small"]
    assert_pool_whole(d)


def test_token_budget_is_respected_and_filled() -> None:
    # No KV pressure and many slots: each step computes exactly min(budget, tokens still owed).
    budget = 10
    d = Driver(num_blocks=200, budget=budget)
    reqs = [make_req(f"r{i}", prompt_of(n, base=50 * i), max_tokens=m)
            for i, (n, m) in enumerate([(7, 3), (13, 1), (2, 6), (25, 2), (4, 4)])]
    d.add(*reqs)
    while d.sched.has_work:
        owed = sum(r.num_tokens - r.num_computed_tokens for r in list(d.sched.running) + list(d.sched.waiting))
        b = d.step()
        assert b.total_tokens == min(budget, owed)
        assert all(n <= budget for n in b.num_tokens)
    for r in reqs:
        assert r.output_ids == expected_output(r, r.params.max_tokens)
    assert_pool_whole(d)


# ---- chunked prefill ---------------------------------------------------------------------------


def test_long_prompt_is_prefilled_in_chunks_within_the_budget() -> None:
    d = Driver(num_blocks=32, budget=8)
    r = make_req("long", prompt_of(30), max_tokens=3)
    d.add(r)
    outputs = []
    while r.num_computed_tokens < r.num_prompt_tokens:
        d.step()
        outputs.append(r.num_output_tokens)
    rows = [[(s.start, len(s.token_ids), s.num_logits) for s in seqs] for seqs in d.inputs]
    # Chunks of the budget, each starting where the last stopped; only the last one wants logits.
    assert rows == [[(0, 8, 0)], [(8, 8, 0)], [(16, 8, 0)], [(24, 6, 1)]]
    assert outputs == [0, 0, 0, 1]          # a token is sampled only after the last chunk
    d.run()
    assert r.output_ids == expected_output(r, 3)
    assert [s.num_logits for seqs in d.inputs[4:] for s in seqs] == [1, 1]
    assert_pool_whole(d)


def test_decodes_are_scheduled_before_prefill_chunks() -> None:
    budget = 6
    d = Driver(num_blocks=64, budget=budget)
    d0, d1 = make_req("d0", [1, 3, 4], max_tokens=20), make_req("d1", [5, 6], max_tokens=20)
    d.add(d0, d1)
    d.step()
    assert d0.num_output_tokens == d1.num_output_tokens == 1
    long = make_req("long", prompt_of(17), max_tokens=2)
    d.add(long)
    chunks = []
    while long.num_output_tokens == 0:
        b = d.step()
        ids = [r.request_id for r in b.requests]
        assert ids == ["d0", "d1", "long"]           # the decodes first, the chunk gets the rest
        assert b.num_tokens[:2] == [1, 1]
        chunks.append(b.num_tokens[2])
    assert chunks == [4, 4, 4, 4, 1]
    assert sum(chunks) == 17
    d.run()
    for r in (d0, d1, long):
        assert r.output_ids == expected_output(r, r.params.max_tokens)
    assert_pool_whole(d)


# ---- preemption ----------------------------------------------------------------------------------


def test_newest_running_request_is_preempted_by_recompute_and_completes() -> None:
    # 6 blocks; three requests of 4 + 8 tokens need 3 blocks each at the end: the pool runs dry
    # when they all reach their 9th token, and the newest (c) is preempted.
    d = Driver(num_blocks=6, budget=100, prefix_caching=False)
    a, b, c = (make_req(n, prompt_of(4, base=10 * i + 100), max_tokens=8) for i, n in enumerate("abc"))
    d.add(a, b, c)
    while not d.sched.num_preemptions:
        batch = d.step()
    assert [r.request_id for r in batch.preempted] == ["c"]
    assert [r.request_id for r in batch.requests] == ["a", "b"]   # older ones go on; nothing admitted
    assert c.status is RequestStatus.PREEMPTED and c.num_computed_tokens == 0
    assert list(d.sched.waiting) == [c] and d.kv.block_ids("c") == []
    out_before = list(c.output_ids)
    assert len(out_before) == 5            # its output so far is kept, recomputed later
    # c waits while a and b finish, then comes back recomputing prompt + output in one chunk.
    while c.status is not RequestStatus.RUNNING:
        batch = d.step()
    assert a.finished and b.finished
    assert batch.requests == [c] and batch.num_tokens == [4 + 5]   # prompt + its 5 tokens, no cache
    assert c.num_cached_tokens == 0        # counted once, at its first admission
    d.run()
    assert c.output_ids[:5] == out_before and c.output_ids == expected_output(c, 8)
    assert a.output_ids == expected_output(a, 8) and b.output_ids == expected_output(b, 8)
    assert d.sched.num_preemptions == 1
    assert_pool_whole(d)


def test_several_victims_go_back_in_arrival_order() -> None:
    # a's next step needs 3 more blocks (a jump-forward appended several forced tokens); the pool
    # has none: d, then c are preempted (newest first), and wait in arrival order c, d.
    d = Driver(num_blocks=8, budget=100, prefix_caching=False)
    # (4 + 20 tokens each: one request alone always fits the pool, as EngineCore's max_model_len ensures)
    a = make_req("a", prompt_of(4), max_tokens=20)
    others = [make_req(n, prompt_of(4, base=200 + 10 * i), max_tokens=20) for i, n in enumerate("bcd")]
    d.add(a, *others)
    d.step()                                  # each holds 1 block (4 prompt tokens), 4 free
    d.step()                                  # each takes a 2nd block for token 5
    assert d.kv.num_free_blocks == 0
    # A jump-forward: forced tokens appended without a forward pass (as _append_guided does).
    for _ in range(12):
        d.commit(a, [model_token(a.num_tokens)])
    assert a.num_tokens - a.num_computed_tokens == 13      # 18 slots to hold -> 5 blocks, 3 more
    batch = d.step()
    assert [r.request_id for r in batch.preempted] == ["d", "c"]
    assert [r.request_id for r in d.sched.waiting] == ["c", "d"]
    assert [r.request_id for r in batch.requests] == ["a", "b"]
    d.run()
    assert d.first_scheduled == ["a", "b", "c", "d"]
    assert a.output_ids[:13] == expected_output(a, 13)     # the forced tokens were the model's own
    for r in others:
        assert r.output_ids == expected_output(r, 20)
    assert_pool_whole(d)


def test_a_request_that_cannot_fit_next_to_older_ones_preempts_itself() -> None:
    # a is older and keeps its blocks; b, the only other one, is preempted when it needs a block.
    d = Driver(num_blocks=3, budget=100, prefix_caching=False)
    a, b = make_req("a", prompt_of(4), max_tokens=6), make_req("b", prompt_of(3, base=300), max_tokens=6)
    d.add(a, b)
    d.step()
    d.step()                              # a: 2 blocks, b: 1 block (4 tokens), 0 free
    batch = d.step()                      # a fits in its blocks; b needs a 2nd block: none
    assert [r.request_id for r in batch.preempted] == ["b"] and batch.requests == [a]
    d.run()
    assert a.output_ids == expected_output(a, 6) and b.output_ids == expected_output(b, 6)
    assert_pool_whole(d)


# ---- speculative tokens --------------------------------------------------------------------------


def test_draft_is_cut_before_the_real_token_when_the_budget_is_short() -> None:
    d = Driver(num_blocks=32, budget=3)
    r = make_req("s", [7, 8], max_tokens=12, k=4)
    d.add(r)
    d.step()                                   # prefill: first token, then a 4-token draft
    assert r.spec_draft is not None and len(r.spec_draft.tokens) == 4
    b = d.step()
    assert b.num_tokens == [3] and len(b.spec_tokens[0]) == 2     # 1 real + 2 drafts, 2 cut
    assert b.seq_inputs()[0].num_logits == 3
    d.run()
    assert r.output_ids == expected_output(r, 12)
    assert_pool_whole(d)


def test_budget_of_one_drops_the_draft_entirely() -> None:
    d = Driver(num_blocks=32, budget=1)
    r = make_req("s", [7], max_tokens=5, k=3)
    d.add(r)
    d.step()
    assert r.spec_draft is not None
    b = d.step()
    assert b.num_tokens == [1] and b.spec_tokens == [[]] and r.num_output_tokens == 2
    d.run()
    assert r.output_ids == expected_output(r, 5)
    assert_pool_whole(d)


def test_draft_is_dropped_rather_than_preempting_when_the_pool_is_short() -> None:
    # r's draft would need a 3rd block and the pool has none; its real token fits in its 2nd
    # block. The draft is dropped; neither r nor f (newer, the natural victim) is preempted.
    d = Driver(num_blocks=4, budget=100, prefix_caching=False)
    r = make_req("r", prompt_of(6), max_tokens=6, k=2)
    f = make_req("f", prompt_of(7, base=300), max_tokens=2)
    d.add(r, f)
    d.step()                                   # r: 2 blocks (6 tokens), f: 2 blocks (7), 0 free
    assert d.kv.num_free_blocks == 0 and len(r.spec_draft.tokens) == 2
    b = d.step()                               # r: slot 6 fits; its drafts want slots 7 and 8
    assert b.preempted == [] and b.requests == [r, f]
    assert b.spec_tokens == [[], []] and b.num_tokens == [1, 1]
    assert len(d.kv.block_ids("r")) == 2       # no block was taken for the dropped draft
    assert f.finished                          # its 2 blocks come back; r speculates again
    draft = list(r.spec_draft.tokens)
    b = d.step()
    assert len(draft) == 2 and b.spec_tokens == [draft]
    d.run()
    assert r.output_ids == expected_output(r, 6) and f.output_ids == expected_output(f, 2)
    assert d.sched.num_preemptions == 0
    assert_pool_whole(d)


def test_speculation_advances_computed_tokens_by_accepted_drafts_only() -> None:
    # A drafter that is wrong at every third position: rejected drafts' KV slots stay allocated
    # past num_computed_tokens and are overwritten; the output equals plain decoding's.
    def drafter(req: Request, k: int) -> list[int]:
        toks = perfect_drafter(req, k)
        return [0 if (req.num_tokens + j) % 3 == 0 else t for j, t in enumerate(toks)]

    d = Driver(num_blocks=32, budget=64, drafter=drafter)
    r = make_req("s", prompt_of(5), max_tokens=14, k=3)
    d.add(r)
    d.step()
    while d.sched.has_work:
        before_computed, before_tokens = r.num_computed_tokens, r.num_tokens
        draft = list(r.spec_draft.tokens) if r.spec_draft else []
        b = d.step()
        assert b.spec_tokens == [draft] and b.num_tokens == [1 + len(draft)]
        emitted = r.num_tokens - before_tokens
        if not r.finished:
            # 1 real token computed + (emitted - 1) accepted drafts
            assert r.num_computed_tokens == before_computed + emitted
            assert r.num_computed_tokens == r.num_tokens - 1
    assert r.output_ids == expected_output(r, 14)
    assert len(r.output_ids) == 14              # drafts never run past max_tokens
    assert_pool_whole(d)


def test_spec_and_plain_requests_share_the_budget() -> None:
    d = Driver(num_blocks=64, budget=100)
    s = make_req("s", prompt_of(3), max_tokens=10, k=4)
    p = make_req("p", prompt_of(3, base=400), max_tokens=10)
    d.add(s, p)
    d.step()
    b = d.step()
    assert [r.request_id for r in b.requests] == ["s", "p"] and b.num_tokens == [5, 1]
    assert [len(x) for x in b.spec_tokens] == [4, 0]
    assert [si.num_logits for si in b.seq_inputs()] == [5, 1]
    d.run()
    assert s.output_ids == expected_output(s, 10) and p.output_ids == expected_output(p, 10)
    assert_pool_whole(d)


def test_preempted_request_loses_its_draft() -> None:
    d = Driver(num_blocks=3, budget=100, prefix_caching=False)
    a = make_req("a", prompt_of(4), max_tokens=6)
    b = make_req("b", prompt_of(3, base=300), max_tokens=6, k=3)
    d.add(a, b)
    d.step()
    d.step()        # a: 2 blocks, b: 1 block holding 4 tokens, with a draft
    assert b.spec_draft is not None
    batch = d.step()
    assert batch.preempted == [b] and b.spec_draft is None and b.num_computed_tokens == 0
    d.run()
    assert a.output_ids == expected_output(a, 6) and b.output_ids == expected_output(b, 6)
    assert_pool_whole(d)


# ---- no starvation ------------------------------------------------------------------------------


def test_stream_of_arrivals_all_finish_in_bounded_steps() -> None:
    # 240 steps of arrivals (~0.4 per step, some sharing a prefix, a third speculating) into a
    # small pool, budget and slot count: the pool runs dry again and again. FCFS admission and
    # newest-first preemption must keep every request's time in the system bounded, far below
    # the run's length (a request passed over until the stream dries up would wait ~200 steps).
    rng = random.Random(20240601)
    d = Driver(num_blocks=12, budget=12, max_seqs=4)
    arrived: dict[str, int] = {}
    reqs: list[Request] = []
    for _ in range(240):
        for _ in range(rng.choice((0, 0, 0, 1, 1))):
            i = len(reqs)
            shared = reqs and rng.random() < 0.3
            head = list(reqs[rng.randrange(len(reqs))].prompt_ids[:8]) if shared else []
            prompt = (head + prompt_of(rng.randint(1, 14), base=1000 * (i + 1)))[:20]
            r = make_req(f"r{i}", prompt, max_tokens=rng.randint(1, 12), k=rng.choice((0, 0, 2)))
            reqs.append(r)
            arrived[r.request_id] = d.num_steps
            d.add(r)
        d.step()
    d.run(max_steps=500)
    # The stream did what it is meant to: preemptions, prefix hits and drafts all happened.
    assert len(reqs) > 80 and d.sched.num_preemptions > 5 and d.kv.stats.hits > 0
    assert sum(1 for b in d.batches for spec in b.spec_tokens if spec) > 20
    waits = [d.finished_at[r.request_id] - arrived[r.request_id] for r in reqs]
    assert max(waits) <= 60, max(waits)          # measured: 28
    assert d.first_scheduled == [r.request_id for r in reqs]   # first admissions in arrival order
    for r in reqs:
        assert r.finish_reason == "length" and r.output_ids == expected_output(r, r.params.max_tokens)
    assert_pool_whole(d)


# ---- prefix cache -------------------------------------------------------------------------------


def test_same_prefix_reuses_full_blocks() -> None:
    d = Driver(num_blocks=32, budget=100)
    prompt = prompt_of(10)                   # 2 full blocks + 2 tokens
    a = make_req("a", prompt, max_tokens=6)
    d.add(a)
    d.step()
    a_blocks = list(d.kv.block_ids("a"))
    b = make_req("b", prompt[:9] + [999, 998], max_tokens=3)   # same first 2 blocks, then differs
    d.add(b)
    batch = d.step()
    assert batch.requests == [a, b] and batch.num_tokens == [1, 11 - 8]
    assert b.num_cached_tokens == 8
    assert d.kv.block_ids("b")[:2] == a_blocks[:2]
    assert [d.kv.pool.ref_cnt[x] for x in a_blocks[:2]] == [2, 2]
    assert d.kv.stats.hits == 8 and d.kv.stats.queries == 10 + 11
    d.run()
    assert b.output_ids == expected_output(b, 3) and a.output_ids == expected_output(a, 6)
    # After both finished, the freed blocks still hit: a third request takes them back.
    c = make_req("c", a.token_ids[:13], max_tokens=1)
    d.add(c)
    batch = d.step()
    assert c.num_cached_tokens == 12 and batch.num_tokens == [1]     # a's 3rd block was full too
    assert_pool_whole(d)


def test_last_prompt_token_is_always_recomputed() -> None:
    d = Driver(num_blocks=16, budget=100)
    prompt = prompt_of(8)                     # exactly 2 blocks
    a = make_req("a", prompt, max_tokens=1)
    d.add(a)
    d.run()
    b = make_req("b", prompt, max_tokens=1)
    d.add(b)
    batch = d.step()
    assert b.num_cached_tokens == 4 and batch.num_tokens == [4]
    assert b.output_ids == expected_output(b, 1)
    assert_pool_whole(d)


def test_cache_salt_isolates_tenants() -> None:
    d = Driver(num_blocks=32, budget=100)
    prompt = prompt_of(13)
    a = make_req("a", prompt, max_tokens=4, salt="tenant-1")
    d.add(a)
    d.step()
    other = make_req("other", prompt, max_tokens=2, salt="tenant-2")
    unsalted = make_req("unsalted", prompt, max_tokens=2)
    same = make_req("same", prompt, max_tokens=2, salt="tenant-1")
    d.add(other, unsalted, same)
    d.step()
    assert other.num_cached_tokens == 0 and unsalted.num_cached_tokens == 0
    assert same.num_cached_tokens == 12
    assert set(d.kv.block_ids("other")).isdisjoint(d.kv.block_ids("a"))
    assert set(d.kv.block_ids("unsalted")).isdisjoint(d.kv.block_ids("a"))
    d.run()
    assert_pool_whole(d)


def test_prefix_caching_off_never_hits() -> None:
    d = Driver(num_blocks=16, budget=100, prefix_caching=False)
    a, b = make_req("a", prompt_of(9), max_tokens=2), make_req("b", prompt_of(9), max_tokens=2)
    d.add(a)
    d.run()
    d.add(b)
    batch = d.step()
    assert b.num_cached_tokens == 0 and batch.num_tokens == [9]
    d.run()
    assert_pool_whole(d)


def test_n_siblings_wait_for_the_first_prefill_then_hit_the_cache() -> None:
    d = Driver(num_blocks=32, budget=100)
    prompt = prompt_of(9)
    sibs = [make_req(f"p#{i}", prompt, max_tokens=3, parent="p", index=i) for i in range(3)]
    d.add(*sibs)
    b = d.step()
    assert b.requests == [sibs[0]]                 # the others wait while #0 computes the prompt
    b = d.step()
    assert b.requests[:2] == sibs[:2] and b.num_tokens[:2] == [1, 1]   # #1 hits #0's 2 full blocks
    d.run()
    assert [s.num_cached_tokens for s in sibs] == [0, 8, 8]
    for s in sibs:
        assert s.output_ids == expected_output(s, 3)
    assert_pool_whole(d)


def test_preempted_request_takes_its_own_blocks_back_from_the_cache() -> None:
    # With prefix caching on, a preempted request's full blocks stay cached in the free queue; if
    # nothing evicts them it recomputes only past them. Its reported num_cached_tokens is unchanged.
    d = Driver(num_blocks=3, budget=100)
    a = make_req("a", prompt_of(4), max_tokens=2)
    b = make_req("b", prompt_of(5, base=300), max_tokens=6)
    d.add(a, b)
    d.step()                               # a: 1 block, b: 2 blocks (5 tokens), 0 free
    batch = d.step()                       # a needs a 2nd block for its 5th token: b preempted
    assert batch.preempted == [b] and a.finished
    batch = d.step()
    assert batch.requests == [b]
    assert b.num_computed_tokens - batch.num_tokens[0] == 4     # its first block came back
    assert b.num_cached_tokens == 0
    d.run()
    assert b.output_ids == expected_output(b, 6)
    assert_pool_whole(d)


# ---- finishing through the public API -----------------------------------------------------------


def test_finish_from_every_state_frees_the_blocks() -> None:
    d = Driver(num_blocks=6, budget=100, prefix_caching=False)
    run1, run2 = make_req("run1", prompt_of(4), max_tokens=50), make_req("run2", prompt_of(8), max_tokens=50)
    waiting = make_req("waiting", prompt_of(12), max_tokens=50)
    d.add(run1, run2)
    d.step()
    d.add(waiting)
    d.step()                                        # waiting can't fit (3 blocks, 1 free + ...)
    while not d.sched.num_preemptions:
        d.step()
    preempted = d.sched.waiting[0]
    assert preempted.status is RequestStatus.PREEMPTED
    for req in (preempted, *d.sched.running, *d.sched.waiting):
        d.sched.finish(req, "cancelled")
        assert req.finished and req.finish_reason == "cancelled"
        assert d.kv.block_ids(req.request_id) == []
        assert_pool_consistent(d.kv, d.sched)
    assert_pool_whole(d)


def test_eos_and_stop_token_finish_early() -> None:
    d = Driver(num_blocks=16, budget=100, next_token=lambda r: EOS if r.num_output_tokens == 2 else 50)
    a = make_req("a", [1, 3], max_tokens=10)
    b = make_req("b", [1, 4], max_tokens=10, eos=())    # ignores EOS: runs to its length
    d.add(a, b)
    d.run()
    assert a.finish_reason == "eos" and a.output_ids == [50, 50, EOS]
    assert b.finish_reason == "length" and b.num_output_tokens == 10
    assert_pool_whole(d)


@pytest.mark.parametrize("budget", [1, 2, 7])
def test_tiny_budgets_still_complete_everything(budget: int) -> None:
    d = Driver(num_blocks=10, budget=budget, max_seqs=3)
    reqs = [make_req(f"r{i}", prompt_of(3 + 2 * i, base=100 * i), max_tokens=4, k=2 * (i % 2)) for i in range(4)]
    d.add(*reqs)
    d.run()
    for r in reqs:
        assert r.output_ids == expected_output(r, 4)
    assert d.first_scheduled == [r.request_id for r in reqs]
    assert_pool_whole(d)
