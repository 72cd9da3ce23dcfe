"""Attach a GGUF's quantised blocks to a float32 CPU model built from that GGUF (kernels/quant.py).

The model's float32 weights are transformers' de-quantisation of the GGUF tensors; the blocks,
read raw (memory-mapped, no de-quantisation) and repacked (Q8_0, Q4_0/1, Q5_0/1, Q4_K, Q5_K,
Q6_K: kernels/gguf_blocks.py), let few-row steps stream ~3-5x fewer bytes. A fused tensor whose
parts have different types (Q4_K_M's Q4_K attn_q/attn_k beside a Q6_K attn_v) packs as segments.
Every packed tensor is checked at load: de-quantising it must give the float32 weight exactly
(`quant.equals_weight`), else that tensor keeps only its float32 path. Fused tensors (qkv, gate_up) are
the GGUF rows concatenated in the order `LlamaForCausalLM.load_weights` fuses them.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from kernels.gguf_blocks import LAYOUT
from kernels.quant import PackedWeight, equals_weight, from_gguf_blocks

if TYPE_CHECKING:
    from service.models.llama import LlamaForCausalLM

log = logging.getLogger("weft.models")


def rope_row_order(rows: int, n_head: int) -> torch.Tensor:
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

    def rows(self, name: str, order: torch.Tensor | None = None) -> tuple[torch.Tensor, str, int] | None:
        """(uint8 [n, bytes per row], GGUF type, k), rows in HF order; None if absent / not packable."""
        t = self.tensors.get(name)
        if t is None or t.tensor_type.name not in LAYOUT:
            return None
        k = int(t.shape[0])   # GGUF shapes are [k, n]: the contiguous dimension first
        with warnings.catch_warnings():
            # Read-only memory map: never written, only copied from (repacking copies it).
            warnings.simplefilter("ignore", UserWarning)
            data = torch.from_numpy(t.data)
        if data.dim() != 2:
            return None
        if order is not None:
            data = data[order]
        return data, t.tensor_type.name, k


def _pack(parts: list[tuple[torch.Tensor, str, int] | None]) -> PackedWeight | None:
    """Concatenated rows of `parts` if they all exist and share one k (their types may differ)."""
    if any(p is None for p in parts) or len({p[2] for p in parts}) != 1:
        return None
    return from_gguf_blocks([p[0] for p in parts], [p[1] for p in parts], parts[0][2])


def _packed_tensors(model: LlamaForCausalLM, gguf: Path) -> list[PackedWeight | None]:
    """The packed tensors in `packed_targets` order, read and repacked once per GGUF and model shape in
    a process (engines are built many times over in tests and benches; the tensors are read-only
    and shared)."""
    global _cache
    cfg = model.config
    st = gguf.stat()
    key = (str(gguf), st.st_size, st.st_mtime_ns, cfg.model_type, len(model.layers), cfg.num_attention_heads,
           model.num_kv_heads, model.tied)
    if _cache is not None and _cache[0] == key:
        return _cache[1]
    reader = _Reader(gguf)
    rope_rows = cfg.model_type != "qwen2"   # only the llama converter interleaves q/k rows
    packs: list[PackedWeight | None] = []
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        b = f"blk.{i}."
        q_order = rope_row_order(attn.q_size, cfg.num_attention_heads) if rope_rows else None
        k_order = rope_row_order(attn.kv_size, model.num_kv_heads) if rope_rows else None
        packs += [
            _pack([reader.rows(b + "attn_q.weight", q_order), reader.rows(b + "attn_k.weight", k_order),
                   reader.rows(b + "attn_v.weight")]),
            _pack([reader.rows(b + "attn_output.weight")]),
            _pack([reader.rows(b + "ffn_gate.weight"), reader.rows(b + "ffn_up.weight")]),
            _pack([reader.rows(b + "ffn_down.weight")]),
        ]
    packs.append(_pack([reader.rows("token_embd.weight" if model.tied else "output.weight")]))
    _cache = (key, packs)
    return packs


_cache: tuple[tuple, list[PackedWeight | None]] | None = None


def packed_targets(model: LlamaForCausalLM) -> list[tuple[torch.nn.Module, str, torch.Tensor]]:
    """(owner, attribute, float32 weight) for each packable tensor, in `_packed_tensors` order."""
    out = []
    for layer in model.layers:
        for mod in layer.projections():
            out.append((mod, "packed", mod.weight.data))
    out.append((model, "lm_head_packed", model.lm_head_weight.data))
    return out


def attach_packed(model: LlamaForCausalLM, gguf: Path) -> int:
    """Give `model` its packed weights (attributes `packed` on the projections' modules and
    `lm_head_packed` on the model), each only if it de-quantises to the model's float32 weight
    exactly. Returns how many tensors were packed."""
    if getattr(model.config, "model_type", None) not in ("llama", "mistral", "qwen2"):
        return 0
    count = 0
    for (owner, attr, weight), packed in zip(packed_targets(model), _packed_tensors(model, gguf)):
        if packed is not None and not equals_weight(packed, weight):
            log.warning("GGUF blocks of %s.%s do not de-quantise to its float32 weight: not packed",
                        type(owner).__name__, attr)
            packed = None
        setattr(owner, attr, packed)
        count += packed is not None
    return count
