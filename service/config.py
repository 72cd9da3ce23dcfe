"""Engine settings: one dataclass the CLI, server and tests fill in."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from decoding.sampling import MAX_SPECULATIVE_TOKENS
from common.errors import InvalidArgumentError

SPECULATIVE_METHODS = (None, "ngram", "draft")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(slots=True)
class EngineConfig:
    model: str | None = None            # HF directory or GGUF file; None = the embedded default model
    dtype: str = "auto"                 # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "cpu"
    block_size: int = 16                # tokens per KV block
    kv_cache_gb: float = 2.0            # KV pool budget
    num_blocks: int | None = None       # exact pool size (overrides kv_cache_gb; tests use tiny pools)
    max_num_batched_tokens: int = 1024  # per-step token budget (decodes + prefill chunks)
    max_num_seqs: int = 256
    max_model_len: int | None = None    # default: the model's context, capped by the pool
    max_queue_len: int = 1024           # waiting requests beyond this are refused
    enable_prefix_caching: bool = True  # reuse KV of full blocks shared with earlier requests
    progress: bool = True               # show loading progress
    # Speculative decoding (decoding/speculative/): None = off unless a request asks (then n-gram),
    # "ngram" = prompt lookup, "draft" = a smaller model with the same tokenizer (`draft_model`).
    speculative_method: str | None = None
    num_speculative_tokens: int = 4     # k: draft tokens verified per step (requests may lower it)
    draft_model: str | None = None      # HF directory or GGUF file for speculative_method="draft"
    ngram_min_n: int = 2
    ngram_max_n: int = 4
    spec_disable_window: int = 8        # drafts looked at before switching a request's speculation off
    spec_min_acceptance: float = 0.2    # ... when fewer than this fraction of draft tokens were accepted

    def validate_speculative(self) -> None:
        if self.speculative_method not in SPECULATIVE_METHODS:
            raise InvalidArgumentError("speculative_method", f"must be one of ngram, draft; got {self.speculative_method!r}")
        if self.speculative_method == "draft" and not self.draft_model:
            raise InvalidArgumentError("draft_model", "speculative_method 'draft' needs a draft model (directory or GGUF)")
        if not 1 <= self.num_speculative_tokens <= MAX_SPECULATIVE_TOKENS:
            raise InvalidArgumentError("num_speculative_tokens",
                                       f"must be in [1, {MAX_SPECULATIVE_TOKENS}], got {self.num_speculative_tokens}")

    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {self.dtype!r}")
        return DTYPES[self.dtype]
