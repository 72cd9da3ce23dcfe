"""The Llama family (Llama 2/3, SmolLM, Mistral, Qwen2) reading and writing a paged KV cache.

One flat batch of tokens from many sequences goes through each layer at once; only attention
needs to know which token belongs to which sequence, and it learns that from AttentionMetadata.
Q/K/V and gate/up projections are fused into one matmul each (service/models/layers/): fewer,
larger GEMMs and fewer Python-level op launches, which is what bounds small-batch speed on a CPU.
This family keeps its own forward loop (residual added in place by the fused add+norm) and its
one-C-call native path (llama_native.py); the other families build on layers/causal_lm.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from kernels import cpu_native, quant
from kernels.attention import AttentionMetadata
from kernels.rope import StepRope
from service.models.layers.attention import Attention
from service.models.layers.linear import AMX_MIN_ROWS, BF16_GEMM_MIN_ROWS, amx_min_rows
from service.models.layers.mlp import GatedMLP
from service.models.layers.norms import RMSNorm
from service.models.layers.rotary import rope_cos_sin
from service.models.layers.windows import window_everywhere, windows_by_layer_type
from service.models.llama_native import NativeLayers
from service.models.lora import BaseShapes, LoRAStep


def _attention(config: PretrainedConfig, head_dim: int, window: int | None) -> Attention:
    heads = config.num_attention_heads
    attention_bias = bool(getattr(config, "attention_bias", False))
    return Attention(config.hidden_size, heads, getattr(config, "num_key_value_heads", None) or heads, head_dim,
                     qkv_bias=attention_bias or config.model_type == "qwen2", o_bias=attention_bias, window=window)


def _windows(config: PretrainedConfig) -> list[int | None]:
    """Mistral windows every layer; Qwen2 the layers its layer_types mark; Llama none."""
    if config.model_type == "mistral":
        return [window_everywhere(config)] * config.num_hidden_layers
    if config.model_type == "qwen2":
        return windows_by_layer_type(config)
    return [None] * config.num_hidden_layers


class DecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, head_dim: int, window: int | None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = _attention(config, head_dim, window)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, "silu")

    def projections(self) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
        """qkv, o, gate_up, down: the order the GGUF packing and the native layer table use."""
        return self.self_attn.qkv_proj, self.self_attn.o_proj, self.mlp.gate_up_proj, self.mlp.down_proj


class LlamaForCausalLM(nn.Module):
    """Forward over a flat batch: input_ids [T], positions [T] -> hidden states [T, hidden]."""

    kv_planes = 2   # a K and a V cache per layer (the runner's KV layout)

    def __init__(self, config: PretrainedConfig, max_positions: int) -> None:
        super().__init__()
        self.config = config
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported (only 'silu')")
        if getattr(config, "mlp_bias", False):
            raise ValueError("mlp_bias is not supported (the native loop has no MLP biases)")
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        windows = _windows(config)
        self.layers = nn.ModuleList(DecoderLayer(config, self.head_dim, w) for w in windows)
        # The native loop attends to the whole context: only steps that fit in every window take it.
        self.min_window = min((w for w in windows if w), default=None)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = None if self.tied else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # The lm_head's GGUF blocks when built from a GGUF (service/models/gguf_packed.py).
        self.lm_head_packed: quant.PackedWeight | None = None
        # bf16 on CPU: steps of many rows multiply by bf16 GEMM (service/models/bf16_packed.py), the
        # logits too where that GEMM's output is float32 (a bf16 copy of the lm_head, else None).
        self.bf16_gemm = False
        self.lm_head_bf16: torch.Tensor | None = None
        # The rows from which the current step multiplies on AMX tiles (bf16 mode; set by forward).
        self.step_tile_rows = AMX_MIN_ROWS
        cos, sin = rope_cos_sin(config, self.head_dim, max_positions)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.native = NativeLayers()   # the one-C-call path for steps of short rows (CPU float32)

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]], slot_mapping: torch.Tensor, meta: AttentionMetadata,
        lora: LoRAStep | None = None,
    ) -> torch.Tensor:
        h = self.embed_tokens.forward(input_ids)   # a vocabulary share under tensor parallelism
        # bf16 mode on AMX: whether this step's products are bf16 on tiles depends on its rows and
        # sequences; its logits (compute_logits, next) follow the same rule.
        self.step_tile_rows = amx_min_rows(len(meta.seq_lens))
        if self.native is not None and (self.min_window is None or max(meta.seq_lens) <= self.min_window):
            # The native loop knows no windows; it adds LoRA adapters itself (kernels/csrc/cpu_lora.c).
            out = self.native(self, h, positions, kv_caches, slot_mapping, meta, lora)
            if out is not None:
                return out
        rope = StepRope(self.rope_cos, self.rope_sin, positions)
        # The residual stream h is updated in place by each norm (h += delta). Sub-modules are
        # called through .forward: nn.Module.__call__ costs ~4 us, ~1 ms a step on 30 layers,
        # and no hooks are ever registered here.
        delta = None
        for i, (layer, (k_cache, v_cache)) in enumerate(zip(self.layers, kv_caches)):
            x = layer.input_layernorm.add_forward(h, delta)
            delta = layer.self_attn.forward(x, rope, k_cache, v_cache, slot_mapping, meta, lora, i, self.step_tile_rows)
            x = layer.post_attention_layernorm.add_forward(h, delta)
            delta = layer.mlp.forward(x, lora, i, self.step_tile_rows)
        return self.norm.add_forward(h, delta)

    def lora_shapes(self) -> BaseShapes:
        """The projection shapes a LoRA adapter of this model must fit."""
        attn = self.layers[0].self_attn
        return BaseShapes(len(self.layers), self.config.hidden_size, attn.q_size, attn.kv_size, self.layers[0].mlp.inter,
                          attn.num_heads, attn.num_kv_heads, self.config.model_type)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """[vocab, hidden]: the embedding when tied, else the lm_head's own."""
        return self.embed_tokens.weight if self.tied else self.lm_head.weight

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.bf16_gemm and hidden.shape[0] >= self.step_tile_rows and quant.amx_usable(hidden, self.lm_head_packed):
            return quant.qmatmul_amx(hidden, self.lm_head_packed)   # a GGUF's blocks on AMX tiles, as the layers
        if self.lm_head_bf16 is not None and hidden.shape[0] >= BF16_GEMM_MIN_ROWS:
            return cpu_native.bf16_linear(hidden, self.lm_head_bf16)
        if quant.usable(hidden, self.lm_head_packed, quant.LOGITS_PACKED_MAX_ROWS):
            return quant.qmatmul(hidden, self.lm_head_packed)
        return F.linear(hidden, self.lm_head_weight).float()

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Take HF-named weights, fusing q/k/v and gate/up."""
        own = dict(self.named_parameters())
        used: set[str] = set()

        def take(name: str) -> torch.Tensor:
            used.add(name)
            return weights[name]

        def put(name: str, tensor: torch.Tensor) -> None:
            param = own[name]
            if param.shape != tensor.shape:
                raise ValueError(f"weight {name}: shape {tuple(tensor.shape)} != expected {tuple(param.shape)}")
            param.data.copy_(tensor)

        put("embed_tokens.weight", take("model.embed_tokens.weight"))
        put("norm.weight", take("model.norm.weight"))
        if not self.tied:
            put("lm_head.weight", take("lm_head.weight"))
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            attn = p + "self_attn."
            put(f"layers.{i}.self_attn.qkv_proj.weight",
                torch.cat([take(attn + f"{n}_proj.weight") for n in "qkv"]))
            if layer.self_attn.qkv_proj.bias is not None:
                put(f"layers.{i}.self_attn.qkv_proj.bias", torch.cat([take(attn + f"{n}_proj.bias") for n in "qkv"]))
            put(f"layers.{i}.self_attn.o_proj.weight", take(attn + "o_proj.weight"))
            if layer.self_attn.o_proj.bias is not None:
                put(f"layers.{i}.self_attn.o_proj.bias", take(attn + "o_proj.bias"))
            put(f"layers.{i}.mlp.gate_up_proj.weight",
                torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")]))
            put(f"layers.{i}.mlp.down_proj.weight", take(p + "mlp.down_proj.weight"))
            put(f"layers.{i}.input_layernorm.weight", take(p + "input_layernorm.weight"))
            put(f"layers.{i}.post_attention_layernorm.weight", take(p + "post_attention_layernorm.weight"))
