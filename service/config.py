"""Engine settings: one dataclass the CLI, server and tests fill in."""
from __future__ import annotations

from dataclasses import dataclass

import torch

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

    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {self.dtype!r}")
        return DTYPES[self.dtype]
