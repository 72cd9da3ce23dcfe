"""The shell every non-Llama family shares: token embedding (optionally scaled), decoder layers
over the paged KV cache, final norm, lm_head (or the tied embedding) and the logits'
post-processing (soft-capping, scaling). A family subclasses it, builds `layers` and `norm`,
registers its rotary tables and maps its checkpoint names in `load_layer`."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from common.errors import ModelLoadError
from kernels.attention import AttentionMetadata
from kernels.rope import StepRope
from service.models.layers.decoder import Step
from service.models.layers.weights import CheckpointWeights
from service.models.lora import BaseShapes, LoRAStep


class CausalLM(nn.Module):
    """Forward over a flat batch: input_ids [T], positions [T] -> hidden states [T, hidden].

    The KV cache the runner allocates per layer: `kv_planes` tensors (2: K and V; 1: one tensor
    passed as both) of [blocks, block_size, num_kv_heads, head_dim]."""

    kv_planes = 2
    # Checkpoint tensors that may be present without being used: name suffixes, name prefixes.
    ignored_suffixes: tuple[str, ...] = ("rotary_emb.inv_freq",)

    def __init__(self, config: PretrainedConfig, max_positions: int) -> None:
        super().__init__()
        self.config = config
        self.max_positions = max_positions
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = None if self.tied else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.embed_scale: float | None = None      # embeddings times this, rounded to their dtype (Gemma)
        self.embed_multiplier: float | None = None  # embeddings times this Python scalar (Granite)
        self.final_softcap: float | None = None    # logits -> cap * tanh(logits / cap)
        self.logit_scale: float | None = None      # logits times this (Cohere)
        self.logit_divisor: float | None = None    # logits divided by this (Granite)
        self.layers = nn.ModuleList()
        self.norm: nn.Module = nn.Identity()
        self.rope_keys: list[str] = []

    def add_rope(self, key: str, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """A rotary table layers name by `key` (their Attention's rope_key)."""
        self.register_buffer(f"rope_cos_{key}", cos, persistent=False)
        self.register_buffer(f"rope_sin_{key}", sin, persistent=False)
        self.rope_keys.append(key)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens.forward(input_ids)   # a vocabulary share under tensor parallelism
        if self.embed_scale is not None:
            # As transformers does: the scale rounded to the weights' dtype first.
            h = h * torch.tensor(self.embed_scale, dtype=torch.float32).to(h.dtype)
        if self.embed_multiplier is not None:
            h = h * self.embed_multiplier
        return h

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]], slot_mapping: torch.Tensor, meta: AttentionMetadata,
        lora: LoRAStep | None = None,
    ) -> torch.Tensor:
        if lora is not None:
            raise ValueError(f"LoRA adapters are not supported for {type(self).__name__}")
        h = self.embed(input_ids)
        out = self.native_layers(h, positions, kv_caches, slot_mapping, meta)
        if out is not None:
            return out
        ropes = {key: StepRope(getattr(self, f"rope_cos_{key}"), getattr(self, f"rope_sin_{key}"), positions)
                 for key in self.rope_keys}
        step = Step(ropes, slot_mapping, meta)
        for layer, kv in zip(self.layers, kv_caches):
            h = layer.forward(h, step, kv)
        return self.norm.forward(h)

    def native_layers(
        self, h: torch.Tensor, positions: torch.Tensor, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        slot_mapping: torch.Tensor, meta: AttentionMetadata,
    ) -> torch.Tensor | None:
        """Every layer and the final norm in one native call, for families that have one (Qwen3);
        None: the layer loop below runs."""
        return None

    def lora_shapes(self) -> BaseShapes:
        raise ModelLoadError(f"LoRA adapters are supported for the Llama family only, not {type(self).__name__}")

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """[vocab, hidden]: the embedding when tied, else the lm_head's own."""
        return self.embed_tokens.weight if self.tied else self.lm_head.weight

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.lm_head_weight)
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.logit_divisor is not None:
            logits = logits / self.logit_divisor
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits.float()

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Take HF-named weights; raises ModelLoadError naming any missing, misshapen or unused one."""
        prefix, lm_head = self.checkpoint_names(weights)
        # A tied checkpoint may still store lm_head; old ones store rotary inv_freq buffers.
        w = CheckpointWeights(weights, ignorable=self.ignored_suffixes + ((lm_head,) if self.tied else ()),
                              ignorable_prefixes=self.ignored_prefixes())
        w.put_named(self.embed_tokens.weight, prefix + "embed_tokens.weight")
        w.put_norm(self.norm, prefix + "norm")
        if not self.tied:
            w.put_named(self.lm_head.weight, lm_head)
        for i, layer in enumerate(self.layers):
            self.load_layer(w, f"{prefix}layers.{i}.", layer)
        w.finish()

    def checkpoint_names(self, weights: dict[str, torch.Tensor]) -> tuple[str, str]:
        """(prefix of the decoder's tensors, name of the lm_head) in the checkpoint."""
        return "model.", "lm_head.weight"

    def ignored_prefixes(self) -> tuple[str, ...]:
        return ()

    def load_layer(self, w: CheckpointWeights, prefix: str, layer: nn.Module) -> None:
        raise NotImplementedError
