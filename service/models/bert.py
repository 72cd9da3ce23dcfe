"""The BERT family as an encoder (BertModel: all-MiniLM, bge, e5, ...), over padding-free batches.

Sequences arrive as one flat token list with their boundaries (cu_seqlens): embeddings,
projections, GELU MLP and LayerNorms run on all tokens at once, and only attention looks at the
boundaries (bidirectional within each sequence, service/models/varlen_attention.py). There is no
KV cache and no padding, so a batch costs what its tokens cost. Q/K/V are fused into one matmul.
Post-LayerNorm residuals, as the original BERT: h = LN(h + sublayer(h)).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from service.models.varlen_attention import varlen_attention

# config.hidden_act -> the activation (transformers' names).
_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}
# Checkpoints of BertForMaskedLM / BertForPreTraining keep the encoder under "bert.".
_PREFIXES = ("", "bert.", "model.")


class EncoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        h, inter = config.hidden_size, config.intermediate_size
        self.num_heads = config.num_attention_heads
        self.head_dim = h // self.num_heads
        self.qkv = nn.Linear(h, 3 * h)
        self.attn_out = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.up = nn.Linear(h, inter)
        self.down = nn.Linear(inter, h)
        self.mlp_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)


class BertEncoder(nn.Module):
    """input_ids [T], positions [T] (restarting at 0 in each sequence), cu_seqlens -> hidden [T, hidden]."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.config = config
        act = getattr(config, "hidden_act", "gelu")
        if act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {act!r} is not supported ({', '.join(_ACTIVATIONS)})")
        if getattr(config, "position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"position_embedding_type {config.position_embedding_type!r} is not supported (absolute)")
        self.act = _ACTIVATIONS[act]
        h = config.hidden_size
        self.hidden_size = h
        self.max_positions = int(config.max_position_embeddings)
        self.word_embeddings = nn.Embedding(config.vocab_size, h)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, h)
        self.token_type_embeddings = nn.Embedding(max(1, getattr(config, "type_vocab_size", 1)), h)
        self.embed_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_hidden_layers))

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cu_seqlens: list[int]) -> torch.Tensor:
        # Token type 0 for every token: a single-segment input, as sentence-transformers encodes text.
        x = F.embedding(input_ids, self.word_embeddings.weight) + F.embedding(positions, self.position_embeddings.weight)
        x = x + self.token_type_embeddings.weight[0]
        h = F.layer_norm(x, (self.hidden_size,), self.embed_norm.weight, self.embed_norm.bias, self.embed_norm.eps)
        t = h.shape[0]
        for layer in self.layers:
            heads, dim = layer.num_heads, layer.head_dim
            q, k, v = F.linear(h, layer.qkv.weight, layer.qkv.bias).view(t, 3, heads, dim).unbind(1)
            o = varlen_attention(q, k, v, cu_seqlens, dim ** -0.5).reshape(t, heads * dim)
            h = F.layer_norm(h + F.linear(o, layer.attn_out.weight, layer.attn_out.bias), (self.hidden_size,),
                             layer.attn_norm.weight, layer.attn_norm.bias, layer.attn_norm.eps)
            m = F.linear(self.act(F.linear(h, layer.up.weight, layer.up.bias)), layer.down.weight, layer.down.bias)
            h = F.layer_norm(h + m, (self.hidden_size,), layer.mlp_norm.weight, layer.mlp_norm.bias,
                             layer.mlp_norm.eps)
        return h

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Take HF BertModel names (with or without a "bert." prefix), fusing query/key/value."""
        prefix = next((p for p in _PREFIXES if f"{p}embeddings.word_embeddings.weight" in weights), None)
        if prefix is None:
            raise ValueError("not a BERT checkpoint: no embeddings.word_embeddings.weight")
        own = dict(self.named_parameters())

        def take(name: str) -> torch.Tensor:
            full = prefix + name
            if full not in weights:
                raise ValueError(f"weight {full} is missing")
            return weights[full]

        def put(name: str, tensor: torch.Tensor) -> None:
            param = own[name]
            if param.shape != tensor.shape:
                raise ValueError(f"weight {name}: shape {tuple(tensor.shape)} != expected {tuple(param.shape)}")
            param.data.copy_(tensor)

        e = "embeddings."
        put("word_embeddings.weight", take(e + "word_embeddings.weight"))
        put("position_embeddings.weight", take(e + "position_embeddings.weight"))
        put("token_type_embeddings.weight", take(e + "token_type_embeddings.weight"))
        put("embed_norm.weight", take(e + "LayerNorm.weight"))
        put("embed_norm.bias", take(e + "LayerNorm.bias"))
        for i in range(len(self.layers)):
            p, o = f"encoder.layer.{i}.", f"layers.{i}."
            a = p + "attention."
            for kind in ("weight", "bias"):
                put(o + f"qkv.{kind}", torch.cat([take(a + f"self.{n}.{kind}") for n in ("query", "key", "value")]))
                put(o + f"attn_out.{kind}", take(a + f"output.dense.{kind}"))
                put(o + f"attn_norm.{kind}", take(a + f"output.LayerNorm.{kind}"))
                put(o + f"up.{kind}", take(p + f"intermediate.dense.{kind}"))
                put(o + f"down.{kind}", take(p + f"output.dense.{kind}"))
                put(o + f"mlp_norm.{kind}", take(p + f"output.LayerNorm.{kind}"))


ENCODER_CLASSES = {"BertModel": BertEncoder, "BertForMaskedLM": BertEncoder, "BertForPreTraining": BertEncoder}
