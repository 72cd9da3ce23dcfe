"""Offline use: `LLM(...).generate(prompts, SamplingParams)` runs the step loop in the caller's thread."""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from decoding.sampling import SamplingParams, TokenLogprobs
from service.config import EngineConfig
from service.engine.core import EngineCore
from service.engine.request import RequestOutput


@dataclass(slots=True)
class Completion:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    spec: dict | None = None       # speculative decoding counters (SpecStats.as_dict), when it could speculate


@dataclass(slots=True)
class GenerateResult:
    request_id: str
    num_prompt_tokens: int
    num_cached_tokens: int
    outputs: list[Completion]


def accumulate(completions: list[Completion], out: RequestOutput) -> None:
    """Fold one delta into the running completion for its sample."""
    c = completions[out.index]
    c.text += out.text
    c.token_ids.extend(out.token_ids)
    if out.logprobs is not None:
        c.logprobs = (c.logprobs or []) + list(out.logprobs)
    if out.finished:
        c.finish_reason, c.stop_reason, c.spec = out.finish_reason, out.stop_reason, out.spec


class LLM:
    def __init__(self, model: str | None = None, **engine_args) -> None:
        self.engine = EngineCore(EngineConfig(model=model, **engine_args))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def close(self) -> None:
        """Stop the tensor-parallel ranks, if any (they also stop when this process exits)."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        lora: str | None | Sequence[str | None] = None,
        cache_salt: str | None = None,
    ) -> list[GenerateResult]:
        """Run the prompts together to completion. `lora` names a loaded adapter for every
        prompt, or one per prompt (None: the base model). `cache_salt` keeps the prompts' cached
        blocks and suffix decoding's store of outputs apart from other salts' (a tenant's)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # one prompt, as text or as ids
        params = params or SamplingParams()
        plist = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        loras = [lora] * len(prompts) if lora is None or isinstance(lora, str) else list(lora)
        if len(plist) != len(prompts) or len(loras) != len(prompts):
            raise ValueError("params, lora: need one per prompt")
        results: dict[str, GenerateResult] = {}
        order = []
        for prompt, p, adapter in zip(prompts, plist, loras):
            rid = f"offline-{next(self._ids)}"
            # Guided specs compile here, synchronously (cached: a repeated spec compiles once).
            grammar = self.engine.guide_compiler.compile_sync(p.guided) if p.guided is not None else None
            n_prompt = self.engine.add_request(
                rid, list(prompt) if not isinstance(prompt, str) else prompt, p, cache_salt=cache_salt, guide=grammar,
                lora=adapter)
            results[rid] = GenerateResult(rid, n_prompt, 0, [Completion(i) for i in range(p.n)])
            order.append(rid)
        while self.engine.has_unfinished():
            for out in self.engine.step():
                res = results[out.request_id]
                accumulate(res.outputs, out)
                res.num_cached_tokens = out.num_cached_tokens
        return [results[rid] for rid in order]

    def load_lora(self, name: str, path: str) -> None:
        """Serve the LoRA adapter at `path` (a PEFT directory or a LoRA .gguf) as `name` (needs
        enable_lora=True or lora=[...])."""
        self.engine.add_adapter(*self.engine.read_adapter(name, path))

    def chat(self, messages: list[dict[str, str]], params: SamplingParams | None = None) -> GenerateResult:
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.generate(self.tokenizer.encode(prompt, add_special_tokens=False), params)[0]
