"""Attach a GGUF's quantised blocks to a float32 CPU model built from that GGUF (kernels/quant.py).

The model's float32 weights are transformers' de-quantisation of the GGUF tensors; the blocks,
read raw (memory-mapped, no de-quantisation), let few-row steps stream ~4-6x fewer bytes.
Every packed tensor is checked at load: de-quantising it must give the float32 weight exactly
(torch.equal), else that tensor keeps only its float32 path. Fused tensors (qkv, gate_up) are
the GGUF rows concatenated in the order `LlamaForCausalLM.load_weights` fuses them.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from kernels.quant import BLOCK, FMT_Q4_1, FMT_Q8_0, PackedWeight, dequantize, from_gguf_blocks

if TYPE_CHECKING:
    from service.models.llama import LlamaForCausalLM

log = logging.getLogger("weft.models")

_FORMATS = {"Q8_0": FMT_Q8_0, "Q4_1": FMT_Q4_1}


def _rope_row_order(rows: int, n_head: int) -> torch.Tensor:
    """Which GGUF row each HF row of attn_q / attn_k is. The GGUF converter interleaved each
    head's rotary halves; transformers' loader undoes that by reshaping rows to
    (head, dim, 2) and swapping the last two axes. Rows are whole blocks, so the packed
    tensor takes the same row permutation."""
    dim = rows // n_head // 2
    return torch.arange(rows).reshape(n_head, dim, 2).transpose(1, 2).reshape(rows)


class _Reader:
    """Raw quantised rows of one GGUF, by tensor name."""

    def __init__(self, path: Path) -> None:
        from gguf import GGUFReader

        self.tensors = {t.name: t for t in GGUFReader(str(path)).tensors}

    def rows(self, name: str, order: torch.Tensor | None = None) -> tuple[torch.Tensor, int, int] | None:
        """(uint8 [n, bytes per row], format, k), rows in HF order; None if absent / not packable."""
        t = self.tensors.get(name)
        if t is None or t.tensor_type.name not in _FORMATS:
            return None
        k = int(t.shape[0])   # GGUF shapes are [k, n]: the contiguous dimension first
        with warnings.catch_warnings():
            # Read-only memory map: never written, only copied from (repacking copies it).
            warnings.simplefilter("ignore", UserWarning)
            data = torch.from_numpy(t.data)
        if k % BLOCK or data.dim() != 2:
            return None
        if order is not None:
            data = data[order]
        return data, _FORMATS[t.tensor_type.name], k


def _pack(parts: list[tuple[torch.Tensor, int, int] | None], weight: torch.Tensor, what: str) -> PackedWeight | None:
    """Concatenated rows of `parts` if they share one format and de-quantise to `weight` exactly."""
    if any(p is None for p in parts) or len({(p[1], p[2]) for p in parts}) != 1:
        return None
    packed = from_gguf_blocks([p[0] for p in parts], parts[0][1], parts[0][2])
    if tuple(weight.shape) != (packed.n, packed.k) or not torch.equal(dequantize(packed), weight):
        log.warning("GGUF blocks of %s do not de-quantise to its float32 weight: not packed", what)
        return None
    return packed


def attach_packed(model: LlamaForCausalLM, gguf: Path) -> int:
    """Give `model` its packed weights (attributes `packed` on the projections' modules and
    `lm_head_packed` on the model). Returns how many tensors were packed."""
    cfg = model.config
    if getattr(cfg, "model_type", None) not in ("llama", "mistral", "qwen2"):
        return 0
    reader = _Reader(gguf)
    heads, kv_heads = cfg.num_attention_heads, model.num_kv_heads
    count = 0
    for i, layer in enumerate(model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        b = f"blk.{i}."
        q_order = _rope_row_order(attn.q_size, heads) if cfg.model_type != "qwen2" else None
        k_order = _rope_row_order(attn.kv_size, kv_heads) if cfg.model_type != "qwen2" else None
        specs = [
            (attn.qkv_proj, [reader.rows(b + "attn_q.weight", q_order), reader.rows(b + "attn_k.weight", k_order),
                             reader.rows(b + "attn_v.weight")]),
            (attn.o_proj, [reader.rows(b + "attn_output.weight")]),
            (mlp.gate_up_proj, [reader.rows(b + "ffn_gate.weight"), reader.rows(b + "ffn_up.weight")]),
            (mlp.down_proj, [reader.rows(b + "ffn_down.weight")]),
        ]
        for module, parts in specs:
            module.packed = _pack(parts, module.weight.data, f"layer {i} {type(module).__name__}")
            count += module.packed is not None
    head = model.embed_tokens.weight if model.tied else model.lm_head.weight
    model.lm_head_packed = _pack([reader.rows("token_embd.weight" if model.tied else "output.weight")],
                                 head.data, "lm_head")
    count += model.lm_head_packed is not None
    return count
