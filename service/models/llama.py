"""The Llama family (Llama 2/3, SmolLM, Mistral, Qwen2) reading and writing a paged KV cache.

One flat batch of tokens from many sequences goes through each layer at once; only attention
needs to know which token belongs to which sequence, and it learns that from AttentionMetadata.
Q/K/V and gate/up projections are fused into one matmul each: fewer, larger GEMMs and fewer
Python-level op launches, which is what bounds small-batch speed on a CPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from kernels import quant
from kernels.attention import AttentionMetadata, paged_attention
from kernels.norm import add_rms_norm, rms_norm_ref
from kernels.rope import StepRope, rope_store
from service.models.llama_native import NativeLayers
from service.models.lora import BaseShapes, LoRAStep


def _rope_parameters(config: PretrainedConfig) -> dict:
    """transformers 5 keeps RoPE settings in `rope_parameters`; older configs in rope_theta/rope_scaling."""
    params = getattr(config, "rope_parameters", None)
    if params:
        return dict(params)
    params = dict(getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_type", params.pop("type", "default"))
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return params


def rope_cos_sin(config: PretrainedConfig, head_dim: int, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_positions, head_dim] in float32, computed the way transformers does."""
    params = _rope_parameters(config)
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = params["rope_theta"]
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        scaling = 1.0
    else:
        if rope_type == "dynamic":
            # Dynamic NTK rescales with the sequence length at run time; a static table would be wrong.
            raise ValueError("rope_type 'dynamic' is not supported")
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None)
    pos = torch.arange(max_positions, dtype=torch.float)
    freqs = pos[:, None] * inv_freq.float()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scaling, emb.sin() * scaling


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_ref(x, self.weight, self.eps)

    def add_forward(self, h: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
        """h += delta (the residual, in place), then the norm of h: one native call on CPU."""
        return add_rms_norm(h, delta, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, config: PretrainedConfig, head_dim: int) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = head_dim
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        bias = bool(getattr(config, "attention_bias", False)) or config.model_type == "qwen2"
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=bool(getattr(config, "attention_bias", False)))
        self.scale = head_dim ** -0.5

    def forward(
        self, x: torch.Tensor, rope: StepRope,
        k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor, meta: AttentionMetadata,
        lora: LoRAStep | None = None, layer: int = 0,
    ) -> torch.Tensor:
        t = x.shape[0]
        qkv = F.linear(x, self.qkv_proj.weight, self.qkv_proj.bias)
        if lora is not None:
            lora.add_(qkv, x, layer, "qkv")
        q = rope_store(qkv, rope, k_cache, v_cache, slot_mapping, self.num_heads, self.num_kv_heads, self.head_dim)
        o = paged_attention(q, k_cache, v_cache, meta, self.scale).reshape(t, self.q_size)
        out = F.linear(o, self.o_proj.weight, self.o_proj.bias)
        if lora is not None:
            lora.add_(out, o, layer, "o")
        return out


class MLP(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.inter = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * self.inter, bias=False)
        self.down_proj = nn.Linear(self.inter, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, lora: LoRAStep | None = None, layer: int = 0) -> torch.Tensor:
        gate_up = F.linear(x, self.gate_up_proj.weight)
        if lora is not None:
            lora.add_(gate_up, x, layer, "gate_up")
        gate, up = gate_up.split(self.inter, dim=-1)
        act = F.silu(gate) * up
        out = F.linear(act, self.down_proj.weight)
        if lora is not None:
            lora.add_(out, act, layer, "down")
        return out


class DecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, head_dim: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, head_dim)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def projections(self) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
        """qkv, o, gate_up, down: the order the GGUF packing and the native layer table use."""
        return self.self_attn.qkv_proj, self.self_attn.o_proj, self.mlp.gate_up_proj, self.mlp.down_proj


class LlamaForCausalLM(nn.Module):
    """Forward over a flat batch: input_ids [T], positions [T] -> hidden states [T, hidden]."""

    def __init__(self, config: PretrainedConfig, max_positions: int) -> None:
        super().__init__()
        self.config = config
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported (only 'silu')")
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, self.head_dim) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = None if self.tied else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # The lm_head's GGUF blocks when built from a GGUF (service/models/gguf_packed.py).
        self.lm_head_packed: quant.PackedWeight | None = None
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
        h = F.embedding(input_ids, self.embed_tokens.weight)
        if lora is None:   # the native loop knows no adapters
            out = self.native(self, h, positions, kv_caches, slot_mapping, meta)
            if out is not None:
                return out
        rope = StepRope(self.rope_cos, self.rope_sin, positions)
        # The residual stream h is updated in place by each norm (h += delta). Sub-modules are
        # called through .forward: nn.Module.__call__ costs ~4 us, ~1 ms a step on 30 layers,
        # and no hooks are ever registered here.
        delta = None
        for i, (layer, (k_cache, v_cache)) in enumerate(zip(self.layers, kv_caches)):
            x = layer.input_layernorm.add_forward(h, delta)
            delta = layer.self_attn.forward(x, rope, k_cache, v_cache, slot_mapping, meta, lora, i)
            x = layer.post_attention_layernorm.add_forward(h, delta)
            delta = layer.mlp.forward(x, lora, i)
        return self.norm.add_forward(h, delta)

    def lora_shapes(self) -> BaseShapes:
        """The projection shapes a LoRA adapter of this model must fit."""
        attn = self.layers[0].self_attn
        return BaseShapes(len(self.layers), self.config.hidden_size, attn.q_size, attn.kv_size, self.layers[0].mlp.inter)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """[vocab, hidden]: the embedding when tied, else the lm_head's own."""
        return self.embed_tokens.weight if self.tied else self.lm_head.weight

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
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
