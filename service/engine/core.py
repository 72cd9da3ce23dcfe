"""EngineCore: owns the model, the KV cache and the scheduler; `step()` advances every running
request by one scheduled chunk. Single-threaded by design: the async engine calls it from one
thread, the offline LLM from the caller's.

A step is four methods a reader can follow in order: `scheduler.schedule()` picks the work,
`_execute` runs it (one `StepOutput`: logits and which rows are whose), `_sample` / `_verify`
turn rows into tokens (one row per plain request, 1 + k per request verifying k drafts), and
`_commit` appends them, checks stops and grammars and hands out the deltas."""
from __future__ import annotations

import dataclasses
import logging
import time

import torch

from common.errors import InvalidArgumentError, ModelLoadError, UnavailableError
from decoding.guided import CompiledGrammar, GuideCompiler
from decoding.sampling import NoValidTokenError, Sampler, SampleRequest, SamplingParams, TokenLogprobs
from decoding.stopping import StopChecker
from kernels.mask import apply_logit_bias_, apply_token_bitmask_
from service.config import EngineConfig
from service.engine.draft import DraftModelProposer
from service.engine.kv_cache import KVCacheManager
from service.engine.lora_manager import AdapterInfo, LoRAManager
from service.engine.request import Request, RequestOutput
from service.engine.runner import ModelRunner
from service.engine.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from service.engine.speculation import Speculator
from service.engine.stats import EngineStats
from service.engine.tensor_parallel import TPGroup, model_fingerprint, start_group, tensor_bytes
from service.engine.step import SeqInput, StepOutput
from service.loader import LoadedModel, load_model
from service.models.bf16_packed import load_dtype, run_dtype
from service.models.build import auto_dtype, build_model
from service.models.layers.windows import kv_window
from service.models.lora import LoRAStacks, LoRAWeights, load_lora

log = logging.getLogger("weft.engine")

# Adaptive k's start-up measurement runs on a scratch sequence of this many tokens (attention's
# share of a step grows with the context; a chat turn's is of this order), before any request
# exists and freed before the first one comes.
CALIBRATION_CONTEXT = 256
CALIBRATION_ID = "calibration"


class EngineCore:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        self.config = config
        dtype = config.torch_dtype()
        self.device = torch.device(config.device)
        loaded = loaded or load_model(config.model, dtype=load_dtype(self.device, dtype), progress=config.progress)
        self.loaded = loaded
        if config.dtype == "auto":   # the dtype chosen from here on, for every part that asks the config
            dtype = auto_dtype(loaded, self.device, sharded=config.tensor_parallel_size > 1)
            self.config = config = dataclasses.replace(config, dtype=str(dtype).removeprefix("torch."))
        self.model_name = loaded.name
        self.tokenizer = loaded.tokenizer
        hf = loaded.config
        config.validate_parallel()
        self.kv_dtype = config.kv_torch_dtype(dtype)   # bf16 blocks for bf16 weights on CPU too
        # Tensor parallel: this process is rank 0; the other ranks build their shards meanwhile.
        self.tp: TPGroup | None = start_group(config) if config.tensor_parallel_size > 1 else None
        try:
            model, context = build_model(loaded, self.device, dtype, self.tp)
        except Exception:
            self.close()
            raise
        self.model = model
        kv_dtype = self.kv_dtype
        dtype = run_dtype(model, dtype)   # float32 for bf16 weights on CPU (service/models/bf16_packed.py)

        # Per rank under tensor parallelism: each holds its KV heads of every block.
        block_bytes = ModelRunner.kv_bytes_per_block(model, config.block_size, kv_dtype)
        num_blocks = config.num_blocks or max(1, int(config.kv_cache_gb * 2**30) // block_bytes)
        self.num_blocks = num_blocks
        self.max_model_len = min(config.max_model_len or context, context, num_blocks * config.block_size)
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching, kv_window(model))
        self.lora: LoRAManager | None = None
        if config.enable_lora:
            adapters = config.lora_modules()
            self.lora = LoRAManager(LoRAStacks(model.lora_shapes(), config.max_loras, config.max_lora_rank, dtype,
                                               self.device))
            for name, path in adapters:
                self.add_adapter(*self.read_adapter(name, path))
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_batched_tokens, config.max_num_seqs, self.max_model_len), self.kv, self.lora
        )
        self.runner = ModelRunner(model, self.kv, num_blocks, config.block_size, kv_dtype, self.device,
                                  self.lora.stacks if self.lora is not None else None, self.tp)
        # Each rank's (weight bytes, KV bytes), rank 0 first: what sharding saved, measured.
        self.rank_memory: list[tuple[int, int]] = [(tensor_bytes(model.parameters()),
                                                    tensor_bytes([self.runner.kv_tensor]))]
        if self.tp is not None:
            try:
                self.tp.send_ints([num_blocks, config.block_size, *model_fingerprint(model, dtype)])
                reports = self.tp.gather_ints([*self.rank_memory[0], 1])
                if not all(same for _, _, same in reports):
                    bad = [r for r, (_, _, same) in enumerate(reports) if not same]
                    raise ModelLoadError(f"tensor parallel: rank(s) {bad} loaded another model or dtype than rank 0 "
                                         f"({config.model}, {dtype}); start every rank with the same --model and "
                                         "--dtype")
                self.rank_memory = [(w, k) for w, k, _ in reports]
            except Exception:
                self.close()
                raise
        self.sampler = Sampler()
        self.requests: dict[str, list[Request]] = {}   # parent id -> its n sequences
        self.eos_token_ids = tuple(self.tokenizer.eos_token_ids)
        self.vocab_size = int(hf.vocab_size)
        # Guided decoding: specs compile on the compiler's own threads; the step only fills and
        # applies masks, and only when some row of the batch is guided.
        self.guide_compiler = GuideCompiler(self.tokenizer, self.vocab_size)
        self._eos_set = frozenset(self.eos_token_ids)
        self._bitmask: torch.Tensor | None = None
        proposer = None
        if config.speculative_method == "draft":
            proposer = DraftModelProposer.load(
                config.draft_model, config=config, device=self.device, num_blocks=num_blocks,
                tokenizer=self.tokenizer, vocab_size=self.vocab_size,
                bitmask_words=self.guide_compiler.bitmask_words)
        self.spec = Speculator(config, self.sampler, self.eos_token_ids, self.guide_compiler.bitmask_words, proposer,
                               query_limit=self.runner.fast_path_max_queries())
        self._calibrate_speculation()

    def _calibrate_speculation(self) -> None:
        """Adaptive k's step costs, measured before the first request (`Speculator.calibrate`) on
        a scratch sequence: its KV blocks are borrowed from the pool and given back, and nothing
        of it reaches the prefix cache."""
        rows = self.spec.calibration_rows
        context = min(CALIBRATION_CONTEXT, self.max_model_len - rows)
        if not rows or context < 1 or not self.kv.allocate(CALIBRATION_ID, context + rows):
            return
        greedy = SamplingParams(temperature=0, max_tokens=1)

        def step(n: int) -> float:   # a verify step's work: the model, then each row's argmax
            t0 = time.perf_counter()
            out = self.runner.run([SeqInput(CALIBRATION_ID, [0] * n, context, n)])
            self.sampler(out.logits, [SampleRequest(greedy, (), ())] * n)
            return time.perf_counter() - t0

        try:
            self.runner.run([SeqInput(CALIBRATION_ID, [0] * context, 0, 1)])   # what the rows attend to
            table = self.spec.calibrate(step)
            log.info("speculation: step ms by rows %s", {r: round(1000 * s, 2) for r, s in table.items()})
        finally:
            self.kv.free(CALIBRATION_ID)

    # ---- requests in -------------------------------------------------------------------------

    def validate(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """Check a request without adding it; returns the prompt's token ids."""
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidArgumentError("prompt", "must not be empty")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            if any(not isinstance(t, int) or t < 0 or t >= self.vocab_size for t in ids):
                raise InvalidArgumentError("prompt_token_ids", f"every id must be an int in [0, {self.vocab_size})")
        if not ids:
            raise InvalidArgumentError("prompt", "must not be empty")
        if len(ids) >= self.max_model_len:
            raise InvalidArgumentError(
                "prompt", f"is {len(ids)} tokens; the model's context is {self.max_model_len} (prompt must be shorter)"
            )
        params.validate(self.vocab_size)
        return ids

    def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams, cache_salt: str | None = None,
        guide: CompiledGrammar | None = None, lora: str | None = None,
    ) -> int:
        """Queue a request (n sequences). Returns the prompt length. Raises InvalidArgumentError.

        `guide` is `params.guided` compiled (callers compile off this thread: AsyncEngine awaits
        the compiler); when it is missing for a guided request it is compiled here, blocking.
        Each of the n sequences gets its own guide from it. `lora` names a loaded adapter."""
        if request_id in self.requests:
            raise InvalidArgumentError("request_id", f"{request_id!r} is already running")
        ids = self.validate(prompt, params)
        if lora is not None and self.lora is None:
            raise InvalidArgumentError("model", f"{lora!r}: LoRA adapters are not enabled on this server "
                                       "(start it with --enable-lora or --lora NAME=PATH)")
        if guide is None and params.guided is not None:
            guide = self.guide_compiler.compile_sync(params.guided)
        # Generation never runs past the context: cap max_tokens so the stop checker says "length".
        room = self.max_model_len - len(ids)
        if params.max_tokens > room:
            params = dataclasses.replace(params, max_tokens=room)
        children = []
        refs = [self.lora.hold(lora) for _ in range(params.n)] if lora is not None and self.lora is not None else []
        for i in range(params.n):
            seed = None if params.seed is None else params.seed + i
            child_params = dataclasses.replace(params, n=1, seed=seed)
            ref = refs[i] if refs else None
            # No KV is shared across adapters: the adapter's load joins the prefix-cache key.
            salt = (cache_salt or "") + (f"\x00lora:{ref.uid}" if ref is not None else "")
            req = Request(
                request_id=request_id if params.n == 1 else f"{request_id}#{i}",
                parent_id=request_id,
                index=i,
                prompt_ids=ids,
                params=child_params,
                stop_checker=StopChecker(child_params, self.tokenizer, ids, self.eos_token_ids),
                generator=None if seed is None else Sampler.make_generator(seed),
                cache_salt=salt,
                guide=None if guide is None else guide.new_guide(child_params),
                lora=ref,
            )
            req.num_speculative_tokens = self.spec.k_for(params.num_speculative_tokens)
            children.append(req)
        try:
            _check_guided_fits(children[0], params)
        except InvalidArgumentError:
            for ref in refs:
                self.lora.release(ref)   # type: ignore[union-attr]
            raise
        for req in children:
            self.scheduler.add(req)
        self.requests[request_id] = children
        return len(ids)

    def add_embedding(self, request_id: str, prompts: list[list[int]], pooling: str) -> None:
        """Queue an embedding request: one prefill-only sequence per prompt, each finishing with its
        pooled final hidden states ("last" token or "mean" over the prompt) in RequestOutput.embedding."""
        if request_id in self.requests:
            raise InvalidArgumentError("request_id", f"{request_id!r} is already running")
        if pooling not in ("last", "mean"):
            raise InvalidArgumentError("pooling", f"must be last or mean, got {pooling!r}")
        if not prompts:
            raise InvalidArgumentError("inputs", "must hold at least one input")
        for i, ids in enumerate(prompts):
            if not ids or len(ids) > self.max_model_len:
                raise InvalidArgumentError(f"inputs[{i}]", f"must hold 1 to {self.max_model_len} tokens, got {len(ids)}")
            if any(not isinstance(t, int) or t < 0 or t >= self.vocab_size for t in ids):
                raise InvalidArgumentError(f"inputs[{i}]", f"every id must be an int in [0, {self.vocab_size})")
        children = [Request(request_id=request_id if len(prompts) == 1 else f"{request_id}#{i}", parent_id=request_id,
                            index=i, prompt_ids=list(ids), params=SamplingParams(max_tokens=1), stop_checker=None,
                            pooling=pooling)
                    for i, ids in enumerate(prompts)]
        for req in children:
            self.scheduler.add(req)
        self.requests[request_id] = children

    def abort(self, request_id: str) -> list[RequestOutput]:
        """Stop a request now and free its blocks. Unknown or finished ids are ignored."""
        outs = []
        for req in self.requests.pop(request_id, []):
            if not req.finished:
                self.scheduler.finish(req, "cancelled")
                if req.pooling is None:
                    outs.append(self._output(req))
        return outs

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    def heartbeat(self) -> None:
        """Check, while idle, that every tensor-parallel rank is still there (UnavailableError if not)."""
        if self.tp is not None:
            self.tp.heartbeat()

    def close(self) -> None:
        """Stop the tensor-parallel ranks (the rest goes with the object)."""
        if self.tp is not None:
            self.tp.close()
            self.tp = None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    def pool_is_whole(self) -> bool:
        """Every KV block is free again (the draft model's too, when one runs), and no request
        holds a LoRA adapter."""
        draft_whole = getattr(self.spec.proposer, "pool_is_whole", None)
        return (self.kv.num_free_blocks == self.num_blocks and (draft_whole is None or draft_whole())
                and (self.lora is None or self.lora.is_idle()))

    # ---- LoRA adapters -------------------------------------------------------------------------

    def read_adapter(self, name: str, path: str) -> tuple[LoRAWeights, float]:
        """Read and check an adapter's files (any thread: it touches no engine state); returns
        the weights and the seconds it took. Raises AdapterLoadError."""
        if self.lora is None:
            raise InvalidArgumentError("name", "LoRA adapters are not enabled on this server (start it with "
                                       "--enable-lora or --lora NAME=PATH)")
        if not name or name == self.model_name:
            raise InvalidArgumentError("name", f"an adapter needs a name of its own, got {name!r}")
        t0 = time.perf_counter()
        weights = load_lora(name, path, self.lora.stacks.shapes, self.lora.stacks.max_rank,
                            self.lora.stacks.stacks[0]["o"][0].dtype)
        return weights, time.perf_counter() - t0

    def add_adapter(self, weights: LoRAWeights, load_s: float = 0.0) -> AdapterInfo:
        """Serve read weights (engine thread)."""
        assert self.lora is not None
        return self.lora.register(weights, load_s)

    def remove_adapter(self, name: str) -> bool:
        """Stop serving an adapter; requests already holding it finish with it (engine thread)."""
        return self.lora is not None and self.lora.unregister(name)

    def reset_prefix_cache(self) -> None:
        self.kv.reset_prefix_cache()

    def stats(self) -> EngineStats:
        """The engine's counters now. Call it on the thread that steps the engine."""
        tracker = self.spec.tracker
        agg = tracker.aggregate
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_blocks=self.num_blocks,
            num_free_blocks=self.kv.num_free_blocks,
            prefix_queried_tokens=self.kv.stats.queries,
            prefix_hit_tokens=self.kv.stats.hits,
            num_preemptions=self.scheduler.num_preemptions,
            spec=dataclasses.replace(agg, drafted_per_position=list(agg.drafted_per_position),
                                     accepted_per_position=list(agg.accepted_per_position)),
            spec_num_disabled=tracker.num_disabled,
            spec_memory=self.spec.proposer.memory(),
            lora_resident=self.lora.num_resident if self.lora is not None else 0,
            lora_loaded=len(self.lora.infos()) if self.lora is not None else 0,
        )

    # ---- one step: schedule -> execute -> sample / verify -> commit ----------------------------

    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        for req in batch.preempted:
            self.spec.preempted(req)
            req.pool_sum = None   # recomputed from the start, like its KV
        if not batch.requests:
            return []
        t0 = time.perf_counter()
        try:
            out = self._execute(batch)
        except UnavailableError:   # a lost tensor-parallel rank: no batch can run any more
            raise
        except Exception as exc:  # a failing batch must not take the engine down with it
            log.exception("model step failed")
            return self._fail(batch.requests, f"model step failed: {exc}")
        # The requests that reach the end of their tokens, by batch index: one logits row each,
        # or 1 + k for a request verifying a draft of k.
        plain = [(i, r) for i, r in enumerate(batch.requests) if out.layout.count[i] and r.spec_draft is None]
        verifying = [(i, r) for i, r in enumerate(batch.requests) if out.layout.count[i] and r.spec_draft is not None]
        self._apply_logit_bias(out, plain + verifying)
        self._apply_guides(out, plain + verifying)
        outputs = self._pool(out, batch) + self._verify(out, verifying) + self._sample(out, plain)
        # The step's cost for adaptive k: the model, and the masks, verification or sampling of its rows.
        self.spec.observe_step(batch.total_tokens, time.perf_counter() - t0)
        # Drafts for the next step, for every request that just got its tokens and goes on.
        self.spec.propose([r for _, r in plain + verifying if not r.finished])
        return outputs

    def _execute(self, batch: ScheduledBatch) -> StepOutput:
        """Run the model over the batch; the real tokens' KV counts as computed from here on
        (draft positions only once accepted, in `_verify`)."""
        out = self.runner.run(batch.seq_inputs())
        for req, n, spec in zip(batch.requests, batch.num_tokens, batch.spec_tokens):
            req.num_computed_tokens += n - len(spec)
            if not spec and req.pooling is None:
                self._register_blocks(req)
        return out

    def _pool(self, out: StepOutput, batch: ScheduledBatch) -> list[RequestOutput]:
        """Embedding requests: fold this step's hidden rows into the pooled vector; a request whose
        prompt is now all computed finishes with its vector, and its KV blocks go back to the pool."""
        outputs = []
        for i, req in enumerate(batch.requests):
            rows = out.hidden.get(i)
            if req.pooling is None or rows is None:
                continue
            done = req.num_computed_tokens == req.num_tokens
            if req.pooling == "mean":
                part = rows.float().sum(0)
                req.pool_sum = part if req.pool_sum is None else req.pool_sum + part
            if not done:
                continue
            if req.pooling == "mean":
                vector = req.pool_sum / req.num_tokens
            else:
                vector = rows[-1].float()
            self.scheduler.finish(req, "stop")
            outputs.append(RequestOutput(
                request_id=req.parent_id, index=req.index, text="", token_ids=[], logprobs=None, finished=True,
                finish_reason="stop", num_prompt_tokens=req.num_prompt_tokens, embedding=vector.cpu()))
            req.pool_sum = None
            self.spec.finished(req)
            self._forget(req)
        return outputs

    def _sample(self, out: StepOutput, rows: list[tuple[int, Request]]) -> list[RequestOutput]:
        """One token per plain request, from its logits row."""
        def sample(reqs: list[Request], logits: torch.Tensor) -> list[tuple[int, TokenLogprobs | None]]:
            tokens, logprobs = self.sampler(logits, [SampleRequest(r.params, r.prompt_ids, r.output_ids, r.generator)
                                                     for r in reqs])
            return list(zip(tokens, logprobs))
        reqs, results, outputs = self._rows_or_fail(out, rows, sample)
        for req, (tok, lp) in zip(reqs, results):
            outputs += self._commit(req, [tok], [lp])
        return outputs

    def _verify(self, out: StepOutput, rows: list[tuple[int, Request]]) -> list[RequestOutput]:
        """Verify each request's draft on its 1 + k rows: keep the accepted tokens' KV and commit
        the emitted tokens (accepted drafts and one more)."""
        if not rows:
            return []
        reqs, results, outputs = self._rows_or_fail(out, rows, self.spec.verify)
        for req, res in zip(reqs, results):
            draft, accepted = req.spec_draft, res.num_accepted
            req.spec_draft = None
            req.num_computed_tokens += accepted     # the accepted drafts' KV was computed this step
            self.spec.record(req, len(draft.tokens), accepted, draft.confidence)
            outputs += self._commit(req, res.token_ids, res.logprobs)
            if not req.finished:
                self._register_blocks(req)   # after the commit: hashes cover committed tokens only
        return outputs

    def _rows_or_fail(self, out: StepOutput, rows: list[tuple[int, Request]], run):
        """`run(reqs, logits)` on the rows of `rows`' requests. Requests with nothing to sample
        (NaN logits, a mask that allows nothing) fail alone; the others run again without them.
        Returns (the requests run, their results, the failed ones' outputs)."""
        index, reqs = [i for i, _ in rows], [r for _, r in rows]
        try:
            return reqs, run(reqs, out.gather(index)), []
        except NoValidTokenError as exc:
            bad = set(exc.rows)
            failed = self._fail([reqs[j] for j in sorted(bad)], "no valid token to sample")
            keep = [j for j in range(len(reqs)) if j not in bad]
            reqs, index = [reqs[j] for j in keep], [index[j] for j in keep]
            return reqs, (run(reqs, out.gather(index)) if reqs else []), failed

    def _commit(self, req: Request, tokens: list[int], logprobs: list | None) -> list[RequestOutput]:
        """Append a request's new tokens (tokens after a stop — EOS, a stop string, max_tokens —
        are dropped) and return its delta; a guided request whose grammar cannot go on fails."""
        last = len(tokens) - 1
        for j, tok in enumerate(tokens):
            lp = logprobs[j] if logprobs else None
            if req.guide is None:
                self._append(req, tok, lp)
            else:
                # Verified drafts are appended one by one; only the last may jump forward.
                error = self._append_guided(req, tok, lp, jump_forward=j == last)
                if error is not None:
                    return self._fail([req], error)
            if req.finished:
                break
        return [self._output(req)]

    def _register_blocks(self, req: Request) -> None:
        req.num_registered_blocks = self.kv.cache_full_blocks(
            req.request_id, req.token_ids, req.num_computed_tokens, req.block_hashes,
            req.num_registered_blocks, req.cache_salt,
        )

    # ---- logit bias and guided decoding --------------------------------------------------------

    def _apply_logit_bias(self, out: StepOutput, rows: list[tuple[int, Request]]) -> None:
        """Add each request's logit_bias to every logits row it has this step (1, or 1 + k when
        verifying a draft, so that speculation stays lossless against the biased distribution),
        in one scatter. Runs before the guide masks: a bias can never re-allow a masked token."""
        cells_r: list[int] = []
        cells_t: list[int] = []
        values: list[float] = []
        for i, req in rows:
            bias = req.params.logit_bias
            if not bias:
                continue
            first = out.layout.first[i]
            tokens, vals = list(bias.keys()), list(bias.values())
            for row in range(first, first + out.layout.count[i]):
                cells_r.extend([row] * len(tokens))
                cells_t.extend(tokens)
                values.extend(vals)
        if not cells_r:
            return
        with torch.inference_mode():   # logits come out of the runner as inference tensors
            apply_logit_bias_(out.logits, torch.tensor(cells_r), torch.tensor(cells_t), torch.tensor(values))

    def _apply_guides(self, out: StepOutput, rows: list[tuple[int, Request]]) -> None:
        """Mask every guided row of the step with one bitmask and one kernel call: a plain row by
        its guide's state now, a verifying request's 1 + k rows by the masks its draft recorded
        for each position."""
        guided = [(i, r) for i, r in rows if r.guide is not None]
        if not guided:
            return
        logits = out.logits
        buf = self._mask_buffer(logits.shape[0], logits.is_cuda)
        index: list[int] = []
        for i, req in guided:
            first = out.layout.first[i]
            if req.spec_draft is None:
                req.guide.fill_bitmask(buf[first])
                index.append(first)
            else:
                bm = req.spec_draft.bitmask
                buf[first: first + bm.shape[0]] = bm
                index.extend(range(first, first + bm.shape[0]))
        mask = buf[: logits.shape[0]]
        rows_t = torch.tensor(index, dtype=torch.long)
        if logits.is_cuda:
            mask = mask.to(logits.device, non_blocking=True)
            rows_t = rows_t.to(logits.device, non_blocking=True)
        with torch.inference_mode():   # logits come out of the runner as inference tensors
            apply_token_bitmask_(logits, mask, rows_t)

    def _mask_buffer(self, rows: int, pin: bool) -> torch.Tensor:
        """A reused [rows, words] int32 bitmask (pinned for a CUDA copy)."""
        words = self.guide_compiler.bitmask_words
        buf = self._bitmask
        if buf is None or buf.shape[0] < rows or buf.shape[1] != words:
            buf = torch.empty((max(rows, self.config.max_num_seqs), words), dtype=torch.int32, pin_memory=pin)
            self._bitmask = buf
        return buf

    def _append_guided(self, req: Request, token: int, logprob, jump_forward: bool = True) -> str | None:
        """Append a sampled token to a guided sequence, then any tokens the grammar forces
        (jump-forward: they are appended without a forward pass each; the next step computes
        their KV as one chunk). Returns an error message if the guide cannot go on."""
        guide = req.guide
        if token in self._eos_set:
            # The mask allows EOS only once the output is complete.
            self._append(req, token, logprob)
            if not req.finished:     # ignore_eos: the output is complete all the same
                self._finish_guided(req)
            return None
        if not guide.advance(token):
            return f"guided decoding rejected token {token}: {guide.error() or 'not allowed'}"
        self._append(req, token, logprob)
        # Forced tokens carry no logprobs: jump-forward only for requests that asked for none.
        while not req.finished:
            if guide.is_terminated():
                self._finish_guided(req)
                break
            if req.params.logprobs is not None or not jump_forward or not self.config.guided_jump_forward:
                break
            forced = guide.forced_tokens()
            if not forced:
                break
            for t in forced:
                if not guide.advance(t):
                    return f"guided decoding rejected forced token {t}: {guide.error() or 'not allowed'}"
                self._append(req, t, None)
                if req.finished:     # max_tokens, a stop string or stop id among the forced tokens
                    break
        return None

    def _finish_guided(self, req: Request) -> None:
        """The grammar is complete and allows nothing more: finish with "stop", emitting any text
        the stop checker still holds (a possible stop-string prefix, an incomplete character)."""
        req.pending_text += req.stop_checker.finish_complete()
        self.scheduler.finish(req, "stop")

    def _append(self, req: Request, token: int, logprob) -> None:
        req.token_ids.append(token)
        req.pending_ids.append(token)
        if logprob is not None:
            req.pending_logprobs.append(logprob)
        text, reason = req.stop_checker.append(token)
        req.pending_text += text
        if reason is not None:
            self.scheduler.finish(req, reason)

    def _fail(self, reqs: list[Request], message: str) -> list[RequestOutput]:
        outs = []
        for req in reqs:
            self.scheduler.finish(req, "error")
            out = self._output(req)
            out.error = message
            outs.append(out)
        return outs

    def _output(self, req: Request) -> RequestOutput:
        out = RequestOutput(
            request_id=req.parent_id,
            index=req.index,
            text=req.pending_text,
            token_ids=req.pending_ids,
            logprobs=req.pending_logprobs if req.params.logprobs is not None else None,
            finished=req.finished,
            finish_reason=req.finish_reason,
            stop_reason=req.stop_checker.stop_reason if req.stop_checker is not None else None,
            num_prompt_tokens=req.num_prompt_tokens,
            num_output_tokens=req.num_output_tokens,
            num_cached_tokens=req.num_cached_tokens,
        )
        req.pending_text, req.pending_ids, req.pending_logprobs = "", [], []
        if req.finished:
            out.spec = self.spec.finished(req)
            self._forget(req)
        return out

    def _forget(self, req: Request) -> None:
        family = self.requests.get(req.parent_id)
        if family is not None and all(r.finished for r in family):
            del self.requests[req.parent_id]


def _check_guided_fits(req: Request, params: SamplingParams) -> None:
    """A guided output that cannot be complete within max_tokens is refused up front: the client
    would get cut, invalid JSON after paying for every token. (The plan is the guide's first,
    kept for its first step, so requests that fit pay nothing extra.)"""
    shortfall = getattr(req.guide, "shortfall", None)
    need = shortfall() if shortfall is not None else None
    if need is not None:
        raise InvalidArgumentError(
            "max_tokens", f"{params.max_tokens} is too small for this guided output: the shortest complete "
            f"output Weft finds is {need} tokens (raise max_tokens, or set close_before_max_tokens to false "
            "to accept an output cut at max_tokens)")
