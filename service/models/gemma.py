"""Gemma 1, 2 and 3 (text): GeGLU MLPs, embeddings scaled by sqrt(hidden), RMSNorms whose scale
is (1 + weight). Gemma 2 and 3 norm each branch on the way in and out, scale attention by
query_pre_attn_scalar and alternate sliding-window and global layers (config.layer_types).
Gemma 2 soft-caps attention scores and final logits; Gemma 3 norms each head of q and k, keeps a
separate RoPE base for its sliding layers, and soft-caps only the final logits (transformers
ignores its attn_logit_softcapping, and so do we)."""
from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from service.models.architectures import TEXT_OF_MULTIMODAL
from service.models.layers.attention import Attention
from service.models.layers.causal_lm import CausalLM
from service.models.layers.decoder import PreNormLayer, SandwichNormLayer
from service.models.layers.mlp import GatedMLP
from service.models.layers.norms import OffsetRMSNorm
from service.models.layers.rotary import rope_cos_sin
from service.models.layers.weights import CheckpointWeights
from service.models.layers.windows import windows_by_layer_type

_SANDWICH_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                   "post_feedforward_layernorm")


class _Gemma(CausalLM):
    norm_names: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")

    def __init__(self, config: PretrainedConfig, max_positions: int) -> None:
        super().__init__(config, max_positions)
        self.embed_scale = config.hidden_size ** 0.5
        self.norm = OffsetRMSNorm(config.hidden_size, config.rms_norm_eps)

    def _attention(self, window: int | None = None, **kw) -> Attention:
        c = self.config
        bias = bool(getattr(c, "attention_bias", False))
        return Attention(c.hidden_size, c.num_attention_heads, self.num_kv_heads, self.head_dim,
                         qkv_bias=bias, o_bias=bias, window=window, **kw)

    def _norms(self, count: int) -> list[OffsetRMSNorm]:
        return [OffsetRMSNorm(self.config.hidden_size, self.config.rms_norm_eps) for _ in range(count)]

    def load_layer(self, w: CheckpointWeights, prefix: str, layer: nn.Module) -> None:
        layer.self_attn.load_weights(w, prefix + "self_attn.")
        layer.mlp.load_weights(w, prefix + "mlp.")
        for name in self.norm_names:
            w.put_named(getattr(layer, name).weight, prefix + name + ".weight")


class GemmaForCausalLM(_Gemma):
    def __init__(self, config: PretrainedConfig, max_positions: int) -> None:
        super().__init__(config, max_positions)
        c = config
        self.add_rope("default", *rope_cos_sin(c, self.head_dim, max_positions))
        self.layers = nn.ModuleList(
            PreNormLayer(self._attention(), GatedMLP(c.hidden_size, c.intermediate_size, c.hidden_act), *self._norms(2))
            for _ in range(c.num_hidden_layers))


class Gemma2ForCausalLM(_Gemma):
    norm_names = _SANDWICH_NORMS

    def __init__(self, config: PretrainedConfig, max_positions: int) -> None:
        super().__init__(config, max_positions)
        c = config
        self.final_softcap = c.final_logit_softcapping
        self.add_rope("default", *rope_cos_sin(c, self.head_dim, max_positions))
        self.layers = nn.ModuleList(
            SandwichNormLayer(
                self._attention(window, scale=c.query_pre_attn_scalar ** -0.5, softcap=c.attn_logit_softcapping),
                GatedMLP(c.hidden_size, c.intermediate_size, c.hidden_activation), *self._norms(4))
            for window in windows_by_layer_type(c))


class Gemma3ForCausalLM(_Gemma):
    norm_names = _SANDWICH_NORMS

    def __init__(self, config: PretrainedConfig, max_positions: int) -> None:
        super().__init__(config, max_positions)
        c = config
        if getattr(c, "use_bidirectional_attention", False):
            raise ValueError("use_bidirectional_attention is not supported (Weft's attention is causal)")
        self.final_softcap = c.final_logit_softcapping
        for layer_type in sorted(set(c.layer_types)):   # one RoPE table per layer type (local / global base)
            self.add_rope(layer_type, *rope_cos_sin(c, self.head_dim, max_positions, layer_type))
        eps = c.rms_norm_eps
        self.layers = nn.ModuleList(
            SandwichNormLayer(
                self._attention(window, scale=c.query_pre_attn_scalar ** -0.5, rope_key=layer_type,
                                q_norm=OffsetRMSNorm(self.head_dim, eps), k_norm=OffsetRMSNorm(self.head_dim, eps)),
                GatedMLP(c.hidden_size, c.intermediate_size, c.hidden_activation), *self._norms(4))
            for window, layer_type in zip(windows_by_layer_type(c), c.layer_types))


class Gemma3ForConditionalGeneration(Gemma3ForCausalLM):
    """The language model of a multimodal Gemma 3 checkpoint (the loader gives it the text_config);
    the vision tower and projector tensors are left unread. Hub checkpoints name the decoder
    language_model.model.* (older) or model.language_model.* (newer)."""

    def checkpoint_names(self, weights: dict[str, torch.Tensor]) -> tuple[str, str]:
        if any(name.startswith("model.language_model.") for name in weights):
            return "model.language_model.", "lm_head.weight"
        return "language_model.model.", "language_model.lm_head.weight"

    def ignored_prefixes(self) -> tuple[str, ...]:
        return TEXT_OF_MULTIMODAL["Gemma3ForConditionalGeneration"]   # the loader does not even read them
