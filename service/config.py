"""Engine settings: one dataclass the CLI, server, `LLM` and tests fill in.

The fields stay flat (`config.max_num_seqs`, as vLLM's engine args read) but each carries its
section and help in its metadata; `service/config_cli.py` generates the command-line flags from
them, so a default or a help text lives here once. Environment knobs are in `common/env.py`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch

from common.errors import InvalidArgumentError
from decoding.sampling import MAX_SPECULATIVE_TOKENS
from kernels import cpu_native

SPECULATIVE_METHODS = (None, "ngram", "suffix", "draft")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# What --kv-cache-dtype may name: the cache dtypes the native CPU kernels read and write.
KV_DTYPES = {str(d).removeprefix("torch."): d for d in cpu_native.KV_DTYPES}
SECTIONS = ("model", "cache", "scheduler", "speculative", "lora", "parallel", "output")


def _opt(section: str, help: str, default: Any, *, choices: tuple | None = None, metavar: str | None = None) -> Any:
    """A field with its section, help and (for the flag) choices and metavar."""
    assert section in SECTIONS, section
    meta = {"section": section, "help": help, "choices": choices, "metavar": metavar}
    return field(default=default, metadata=meta)


@dataclass(slots=True)
class EngineConfig:
    # ---- model
    model: str | None = _opt("model", "HF model directory or GGUF file (default: the embedded SmolLM2-135M-Instruct)",
                             None)
    dtype: str = _opt("model", "weights and activations: auto = bfloat16 on CUDA; on CPU the faster for batched "
                      "work of float32 and bfloat16 (measured at start-up, said in the log)", "auto",
                      choices=("auto", *DTYPES))
    device: str = _opt("model", "cpu, or cuda[:N]", "cpu")
    # ---- KV cache
    block_size: int = _opt("cache", "tokens per KV block", 16)
    kv_cache_gb: float = _opt("cache", "KV pool budget in GiB", 2.0)
    num_blocks: int | None = _opt("cache", "exact KV pool size in blocks (overrides --kv-cache-gb)", None)
    enable_prefix_caching: bool = _opt("cache", "reuse the KV of full blocks shared with earlier requests", True)
    kv_cache_dtype: str = _opt("cache", "what the KV cache stores: auto = the model's dtype (bfloat16 under --dtype "
                               "bfloat16, whose CPU arithmetic stays float32); float32 or bfloat16 on CPU", "auto",
                               choices=("auto", *KV_DTYPES))
    # ---- scheduler
    max_num_batched_tokens: int = _opt("scheduler", "token budget of one step (decodes + prefill chunks)", 1024)
    max_num_seqs: int = _opt("scheduler", "sequences running at once", 256)
    max_model_len: int | None = _opt("scheduler", "context length (default: the model's, capped by the KV pool)",
                                     None)
    max_queue_len: int = _opt("scheduler", "waiting requests beyond this are refused (RESOURCE_EXHAUSTED / 429)",
                              1024)
    # ---- speculative decoding (decoding/speculative/)
    speculative_method: str | None = _opt(
        "speculative", "speculative decoding for every request: ngram (prompt lookup), suffix (suffix decoding over "
        "the request's text and earlier outputs) or draft (--draft-model); off by default, though a request may "
        "still ask for n-gram", None, choices=("ngram", "suffix", "draft"))
    num_speculative_tokens: int = _opt("speculative", "k: draft tokens verified per step (requests may lower it)", 4)
    draft_model: str | None = _opt("speculative", "HF directory or GGUF of a draft model with the same tokenizer "
                                   "(implies --speculative-method draft)", None)
    ngram_min_n: int = _opt("speculative", "shortest n-gram the prompt-lookup proposer matches", 2)
    ngram_max_n: int = _opt("speculative", "longest n-gram the prompt-lookup proposer matches", 4)
    suffix_max_tokens: int = _opt("speculative", "suffix decoding: tokens of finished outputs kept to draft from "
                                  "(all salts together; oldest out first)", 16384)
    spec_disable_window: int = _opt("speculative", "drafts looked at before a request's speculation may be "
                                    "switched off", 8)
    spec_min_acceptance: float = _opt("speculative", "... switched off when fewer than this fraction of its draft "
                                      "tokens were accepted", 0.2)
    spec_adaptive_k: bool = _opt("speculative", "pick each request's draft length per step from its acceptance and "
                                 "the measured cost of a step per row count (k is then the most it may take)", True)
    guided_jump_forward: bool = _opt("speculative", "append the tokens a grammar forces (guided decoding, tool calls) "
                                     "without a forward pass each: drafts that need no proposer and no verify row; "
                                     "off: one token per forward, as vLLM decodes", True)
    # ---- LoRA adapters (service/engine/lora_manager.py)
    lora: tuple[str, ...] = _opt("lora", "serve the LoRA adapter at PATH (a PEFT directory or a llama.cpp LoRA "
                                 ".gguf) as model NAME (repeatable)", (),
                                 metavar="NAME=PATH")
    enable_lora: bool = _opt("lora", "accept adapters at run time (LoadAdapter, /v1/load_lora_adapter); implied by "
                             "--lora", False)
    max_loras: int = _opt("lora", "adapters resident in a batch at once (more may be loaded: the least recently "
                          "used idle one makes room)", 4)
    max_lora_rank: int = _opt("lora", "the largest adapter rank accepted", 16)
    # ---- tensor parallelism (service/engine/tensor_parallel.py)
    tensor_parallel_size: int = _opt("parallel", "ranks the model is sharded over (Megatron-style, torch.distributed: "
                                     "gloo on CPU, NCCL on CUDA); without RANK in the environment the ranks run as "
                                     "local processes with cores split between them", 1)
    # ---- output
    progress: bool = _opt("output", "show loading progress", True)

    def __post_init__(self) -> None:
        # A draft model means draft speculation (vLLM's --speculative-model did the same).
        if self.draft_model and self.speculative_method is None:
            self.speculative_method = "draft"
        self.lora = tuple(self.lora or ())
        if self.lora:
            self.enable_lora = True

    def lora_modules(self) -> list[tuple[str, str]]:
        """--lora NAME=PATH values as (name, path)."""
        out = []
        for item in self.lora:
            name, sep, path = item.partition("=")
            if not sep or not name.strip() or not path.strip():
                raise InvalidArgumentError("lora", f"expected NAME=PATH, got {item!r}")
            out.append((name.strip(), path.strip()))
        if not 1 <= self.max_loras <= 256:
            raise InvalidArgumentError("max_loras", f"must be in [1, 256], got {self.max_loras}")
        if not 1 <= self.max_lora_rank <= 512:
            raise InvalidArgumentError("max_lora_rank", f"must be in [1, 512], got {self.max_lora_rank}")
        return out

    def validate_speculative(self) -> None:
        if self.speculative_method not in SPECULATIVE_METHODS:
            raise InvalidArgumentError("speculative_method",
                                       f"must be one of ngram, suffix, draft; got {self.speculative_method!r}")
        if self.speculative_method == "draft" and not self.draft_model:
            raise InvalidArgumentError("draft_model", "speculative_method 'draft' needs a draft model (directory or GGUF)")
        if not 1 <= self.num_speculative_tokens <= MAX_SPECULATIVE_TOKENS:
            raise InvalidArgumentError("num_speculative_tokens",
                                       f"must be in [1, {MAX_SPECULATIVE_TOKENS}], got {self.num_speculative_tokens}")

    def validate_parallel(self) -> None:
        if not 1 <= self.tensor_parallel_size <= 64:
            raise InvalidArgumentError("tensor_parallel_size", f"must be in [1, 64], got {self.tensor_parallel_size}")
        if self.tensor_parallel_size > 1 and self.enable_lora:
            raise InvalidArgumentError("tensor_parallel_size", "LoRA adapters are not supported with tensor parallelism")

    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {self.dtype!r}")
        return DTYPES[self.dtype]

    def kv_torch_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The KV cache's dtype for a model configured (resolved) as `model_dtype`. Only CPU caches
        take another dtype than the model's: the native kernels read float32 and bf16 blocks into
        float32 arithmetic (kernels/csrc/cpu_attention.c), the torch paths convert as they gather."""
        if self.kv_cache_dtype == "auto":
            return model_dtype
        if self.kv_cache_dtype not in KV_DTYPES:
            raise InvalidArgumentError("kv_cache_dtype", f"must be one of auto, {', '.join(KV_DTYPES)}; "
                                       f"got {self.kv_cache_dtype!r}")
        if not self.device.startswith("cpu") and KV_DTYPES[self.kv_cache_dtype] != model_dtype:
            raise InvalidArgumentError("kv_cache_dtype", f"{self.kv_cache_dtype} differs from the model's dtype "
                                       f"({str(model_dtype).removeprefix('torch.')}): only CPU caches may; use auto")
        return KV_DTYPES[self.kv_cache_dtype]

    def section(self, name: str) -> dict[str, Any]:
        """The fields of one section and their values."""
        if name not in SECTIONS:
            raise KeyError(f"no section {name!r}; sections: {', '.join(SECTIONS)}")
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["section"] == name}
