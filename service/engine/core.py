"""EngineCore: owns the model, the KV cache and the scheduler; `step()` advances every running
request by one scheduled chunk. Single-threaded by design: the async engine calls it from one
thread, the offline LLM from the caller's."""
from __future__ import annotations

import dataclasses
import logging

import torch

from decoding.guided import CompiledGrammar, GuideCompiler
from decoding.sampling import NoValidTokenError, Sampler, SampleRequest, SamplingParams
from decoding.stopping import StopChecker
from kernels.mask import apply_token_bitmask_
from service.config import EngineConfig
from service.engine.kv_cache import KVCacheManager
from service.engine.request import Request, RequestOutput, RequestStatus
from service.engine.runner import ModelRunner
from service.engine.scheduler import Scheduler, SchedulerConfig
from service.engine.speculation import Speculator
from common.errors import InvalidArgumentError, ModelLoadError
from service.loader import LoadedModel, gguf_source, load_model
from service.models import MODEL_CLASSES

log = logging.getLogger("weft.engine")


def build_model(loaded: LoadedModel, device: torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, int]:
    """Our forward pass for a loaded checkpoint, on `device`; returns it and its usable context."""
    hf = loaded.config
    arch = (getattr(hf, "architectures", None) or ["?"])[0]
    if arch not in MODEL_CLASSES:
        raise ModelLoadError(f"unsupported architecture {arch!r}; supported: {sorted(MODEL_CLASSES)}")
    context = int(getattr(hf, "max_position_embeddings", 2048))
    window = getattr(hf, "sliding_window", None)
    if window and getattr(hf, "use_sliding_window", True):
        # Sliding-window attention is not implemented: stay within the window, where it is exact.
        context = min(context, int(window))
    model = MODEL_CLASSES[arch](hf, max_positions=context)
    model.load_weights(loaded.weights)
    model.to(device=device, dtype=dtype).eval()
    loaded.weights.clear()  # the model holds its own (fused) copies now
    gguf = gguf_source(loaded) if device.type == "cpu" and dtype == torch.float32 else None
    if gguf is not None:
        # Few-row steps read the GGUF's blocks instead of the float32 weights (kernels/quant.py).
        from service.models.gguf_packed import attach_packed

        try:
            count = attach_packed(model, gguf)
            log.info("packed %d weight tensors from %s for few-row steps", count, gguf.name)
        except Exception as exc:   # an optimisation only: the float32 path is always whole
            log.warning("could not read the GGUF blocks of %s (%s): float32 weights only", gguf, exc)
    return model, context


class EngineCore:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        self.config = config
        dtype = config.torch_dtype()
        self.device = torch.device(config.device)
        loaded = loaded or load_model(config.model, dtype=dtype, progress=config.progress)
        self.loaded = loaded
        self.model_name = loaded.name
        self.tokenizer = loaded.tokenizer
        hf = loaded.config
        model, context = build_model(loaded, self.device, dtype)
        self.model = model

        block_bytes = ModelRunner.kv_bytes_per_block(model, config.block_size, dtype)
        num_blocks = config.num_blocks or max(1, int(config.kv_cache_gb * 2**30) // block_bytes)
        self.num_blocks = num_blocks
        self.max_model_len = min(config.max_model_len or context, context, num_blocks * config.block_size)
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_batched_tokens, config.max_num_seqs, self.max_model_len), self.kv
        )
        self.runner = ModelRunner(model, self.kv, num_blocks, config.block_size, dtype, self.device)
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
            from service.engine.draft import DraftModelProposer   # loads a second model: only when asked
            proposer = DraftModelProposer.load(self, config.draft_model)
        self.spec = Speculator(config, self.sampler, self.eos_token_ids, self.guide_compiler.bitmask_words, proposer)

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
        guide: CompiledGrammar | None = None,
    ) -> int:
        """Queue a request (n sequences). Returns the prompt length. Raises InvalidArgumentError.

        `guide` is `params.guided` compiled (callers compile off this thread: AsyncEngine awaits
        the compiler); when it is missing for a guided request it is compiled here, blocking.
        Each of the n sequences gets its own guide from it."""
        if request_id in self.requests:
            raise InvalidArgumentError("request_id", f"{request_id!r} is already running")
        ids = self.validate(prompt, params)
        if guide is None and params.guided is not None:
            guide = self.guide_compiler.compile_sync(params.guided)
        # Generation never runs past the context: cap max_tokens so the stop checker says "length".
        room = self.max_model_len - len(ids)
        if params.max_tokens > room:
            params = dataclasses.replace(params, max_tokens=room)
        children = []
        for i in range(params.n):
            seed = None if params.seed is None else params.seed + i
            child_params = dataclasses.replace(params, n=1, seed=seed)
            req = Request(
                request_id=request_id if params.n == 1 else f"{request_id}#{i}",
                parent_id=request_id,
                index=i,
                prompt_ids=ids,
                params=child_params,
                stop_checker=StopChecker(child_params, self.tokenizer, ids, self.eos_token_ids),
                generator=None if seed is None else Sampler.make_generator(seed),
                cache_salt=cache_salt or "",
                guide=None if guide is None else guide.new_guide(child_params),
            )
            req.num_speculative_tokens = self.spec.k_for(params.num_speculative_tokens)
            children.append(req)
        _check_guided_fits(children[0], params)
        for req in children:
            self.scheduler.add(req)
        self.requests[request_id] = children
        return len(ids)

    def abort(self, request_id: str) -> list[RequestOutput]:
        """Stop a request now and free its blocks. Unknown or finished ids are ignored."""
        outs = []
        for req in self.requests.pop(request_id, []):
            if not req.finished:
                self.scheduler.finish(req, "cancelled")
                outs.append(self._output(req))
        return outs

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    def pool_is_whole(self) -> bool:
        """Every KV block is free again (the draft model's too, when one runs)."""
        draft_whole = getattr(self.spec.proposer, "pool_is_whole", None)
        return self.kv.num_free_blocks == self.num_blocks and (draft_whole is None or draft_whole())

    def reset_prefix_cache(self) -> None:
        self.kv.reset_prefix_cache()

    # ---- one step ----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        for req in batch.preempted:
            self.spec.preempted(req)
        if not batch.requests:
            return []
        try:
            sample_reqs, logits = self.runner.execute(batch)
        except Exception as exc:  # a failing batch must not take the engine down with it
            log.exception("model step failed")
            return self._fail(batch.requests, f"model step failed: {exc}")
        for req, n, spec in zip(batch.requests, batch.num_tokens, batch.spec_tokens):
            # Draft positions count as computed only once accepted (in _verify).
            req.num_computed_tokens += n - len(spec)
            if not spec:
                self._register_blocks(req)
        outputs: list[RequestOutput] = []
        sample_reqs, logits, spec_reqs, spec_logits = self._split_speculating(sample_reqs, logits)
        if spec_reqs:
            outputs += self._verify(spec_logits, spec_reqs)
        if sample_reqs:
            guided = [i for i, r in enumerate(sample_reqs) if r.guide is not None]
            if guided:
                self._apply_guides(logits, sample_reqs, guided)
            rows = [SampleRequest(r.params, r.prompt_ids, r.output_ids, r.generator) for r in sample_reqs]
            try:
                tokens, logprobs = self.sampler(logits, rows)
            except NoValidTokenError as exc:
                # Rows with nothing to sample (NaN logits, a mask that allows nothing) fail alone;
                # the rest of the batch is sampled again without them.
                bad = set(exc.rows)
                outputs += self._fail([sample_reqs[i] for i in sorted(bad)], "no valid token to sample")
                keep = [i for i in range(len(sample_reqs)) if i not in bad]
                sample_reqs = [sample_reqs[i] for i in keep]
                rows = [rows[i] for i in keep]
                tokens, logprobs = self.sampler(logits[keep], rows) if keep else ([], [])
            for req, tok, lp in zip(sample_reqs, tokens, logprobs):
                if req.guide is None:
                    self._append(req, tok, lp)
                else:
                    error = self._append_guided(req, tok, lp)
                    if error is not None:
                        outputs += self._fail([req], error)
                        continue
                outputs.append(self._output(req))
        # Drafts for the next step, for every request that just got its tokens and goes on.
        self.spec.propose([r for r in sample_reqs + spec_reqs if not r.finished])
        return outputs

    def _register_blocks(self, req: Request) -> None:
        req.num_registered_blocks = self.kv.cache_full_blocks(
            req.request_id, req.token_ids, req.num_computed_tokens, req.block_hashes,
            req.num_registered_blocks, req.cache_salt,
        )

    # ---- speculative decoding ----------------------------------------------------------------

    def _split_speculating(self, reqs: list[Request], logits: torch.Tensor
                           ) -> tuple[list[Request], torch.Tensor, list[Request], torch.Tensor]:
        """Separate the requests verifying a draft (k+1 logits rows each) from the others (one row)."""
        if not any(r.spec_draft is not None for r in reqs):
            return reqs, logits, [], logits[:0]
        plain, plain_rows, spec, spec_rows = [], [], [], []
        at = 0
        for r in reqs:
            k = len(r.spec_draft.tokens) if r.spec_draft is not None else 0
            if k:
                spec.append(r)
                spec_rows.extend(range(at, at + k + 1))
            else:
                plain.append(r)
                plain_rows.append(at)
            at += k + 1

        def take(rows: list[int]) -> torch.Tensor:
            return logits.index_select(0, torch.tensor(rows, dtype=torch.long, device=logits.device))
        return plain, take(plain_rows), spec, take(spec_rows)

    def _verify(self, logits: torch.Tensor, reqs: list[Request]) -> list[RequestOutput]:
        """Verify the drafts, keep the accepted tokens' KV, append the emitted tokens."""
        outputs: list[RequestOutput] = []
        self.spec.mask(logits, reqs)
        try:
            results = self.spec.verify(logits, reqs)
        except NoValidTokenError as exc:
            bad = set(exc.rows)
            outputs += self._fail([reqs[i] for i in sorted(bad)], "no valid token to sample")
            keep_rows = []
            at = 0
            for i, r in enumerate(reqs):
                k = len(r.spec_draft.tokens)
                if i not in bad:
                    keep_rows.extend(range(at, at + k + 1))
                at += k + 1
            reqs = [r for i, r in enumerate(reqs) if i not in bad]
            if not reqs:
                return outputs
            logits = logits.index_select(0, torch.tensor(keep_rows, dtype=torch.long, device=logits.device))
            results = self.spec.verify(logits, reqs)
        for req, res in zip(reqs, results):
            drafted, accepted = len(req.spec_draft.tokens), res.num_accepted
            req.spec_draft = None
            req.num_computed_tokens += accepted     # the accepted drafts' KV was computed this step
            self.spec.record(req, drafted, accepted)
            error = None
            last = len(res.token_ids) - 1
            for j, tok in enumerate(res.token_ids):
                lp = res.logprobs[j] if res.logprobs else None
                if req.guide is None:
                    self._append(req, tok, lp)
                else:
                    error = self._append_guided(req, tok, lp, jump_forward=j == last)
                if error is not None or req.finished:
                    break   # tokens after a stop (EOS, stop string, max_tokens) are dropped
            if error is not None:
                outputs += self._fail([req], error)
                continue
            if not req.finished:
                self._register_blocks(req)   # after the append: hashes cover committed tokens only
            outputs.append(self._output(req))
        return outputs

    # ---- guided decoding ---------------------------------------------------------------------

    def _apply_guides(self, logits: torch.Tensor, reqs: list[Request], guided: list[int]) -> None:
        """Mask every guided row of the batch with one bitmask and one kernel call."""
        words = self.guide_compiler.bitmask_words
        rows_n = logits.shape[0]
        buf = self._bitmask
        if buf is None or buf.shape[0] < rows_n or buf.shape[1] != words:
            pin = logits.is_cuda
            buf = torch.empty((max(rows_n, self.config.max_num_seqs), words), dtype=torch.int32, pin_memory=pin)
            self._bitmask = buf
        for i in guided:
            reqs[i].guide.fill_bitmask(buf[i])
        mask = buf[:rows_n]
        rows = torch.tensor(guided, dtype=torch.long)
        if logits.is_cuda:
            mask = mask.to(logits.device, non_blocking=True)
            rows = rows.to(logits.device, non_blocking=True)
        with torch.inference_mode():   # logits come out of the runner as inference tensors
            apply_token_bitmask_(logits, mask, rows)

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
        # (Verified drafts are appended one by one; only the last may jump forward.)
        while not req.finished:
            if guide.is_terminated():
                self._finish_guided(req)
                break
            if req.params.logprobs is not None or not jump_forward:
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
        checker = req.stop_checker
        text, _ = checker._finish("stop", None, checker._flush_all())
        req.pending_text += text
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
            stop_reason=req.stop_checker.stop_reason,
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
