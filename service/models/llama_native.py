"""The decoder layers of one step in a single native call (float32 on CPU, kernels/csrc/cpu_llama.c).

Used when every row of the step is short (decodes, speculative verification, chunks of at most
NATIVE_MAX_QUERIES tokens): those are the steps where Python's per-op dispatch, not arithmetic,
is what the CPU spends its time on besides streaming the weights. Anything else (long prefill
rows, other dtypes, no compiler, WEFT_NATIVE=0) returns None and the model runs its torch loop.
Projections that carry a GGUF's blocks (service/models/gguf_packed.py) multiply from those in
steps of at most quant.PACKED_MAX_ROWS rows, from the float32 weights above. In bf16 mode (dtype
bfloat16 on CPU, service/models/bf16_packed.py) projections of steps of many rows multiply in
bf16: a GGUF's blocks on AMX tiles where the CPU has AMX (from the model's step_tile_rows,
layers/linear.py's amx_min_rows; no bf16 copy then), else the bf16 copy by bf16 GEMM in steps of
at least BF16_GEMM_MIN_ROWS rows, as the torch loop does (layers/linear.py).

Steps with LoRA adapters stay native: the C loop adds each token's adapter after every base
product (kernels/csrc/cpu_lora.c) from the stacks of service/models/lora.py's LoRAStacks.

Qwen3 (service/models/qwen3.py) runs here too: its per-head q/k RMSNorm weights go in the layer
table (zero for Llama), the C loop normalises q and k before RoPE when they are there.
"""
from __future__ import annotations

import torch
from torch import nn

from kernels import cpu_native, quant
from kernels.attention import AttentionMetadata, native_plan
from service.models.layers.linear import BF16_GEMM_MIN_ROWS, bf16_weight
from service.models.layers.norms import RMSNorm
from service.models.lora import PROJECTIONS, LoRAStacks, LoRAStep

# amx_min_rows for a model not in bf16 mode: no step has that many rows (the C loop keys AMX on it).
NO_AMX = 1 << 62


def _qk_norms(attn: nn.Module, eps: float) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
    """The per-head q/k norm weights the C loop applies (None, None: the layer has none); None when
    the layer's norms are of a kind the loop does not compute (all heads together, float32 scaling,
    Gemma's 1 + w, another eps)."""
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    if q_norm is None:
        return None, None
    plain = all(type(n) is RMSNorm and not n.scale_in_float32 and n.eps == eps for n in (q_norm, k_norm))
    # The loop normalises each token's k heads in a scratch row of q_size floats.
    return (q_norm.weight, k_norm.weight) if plain and attn.qk_norm_per_head and attn.num_kv_heads <= attn.num_heads \
        else None


def _packed(module: torch.nn.Module, use: bool) -> list[int]:
    """(address, format) of a projection's GGUF blocks (service/models/gguf_packed.py), or zeros."""
    p: quant.PackedWeight | None = getattr(module, "packed", None)
    return [p.data.data_ptr(), p.fmt] if use and p is not None else [0, 0]


class NativeLayers:
    """The native path of a Llama-family model, owned by it: the C loop and the table of
    addresses it reads, rebuilt only when the weights or the KV caches move.

    It takes the model on each call (it reads `layers`, `norm`, `rope_cos/sin`, `config`) rather
    than holding it, so the model owns this object and not the other way round."""

    def __init__(self) -> None:
        self._table_key: tuple | None = None
        self._table: torch.Tensor | None = None
        self._lora_key: tuple | None = None
        self._lora_table: torch.Tensor | None = None
        self._scratch = torch.empty(0)
        # Steps (and those with adapters) this path ran: tests check the native path really ran.
        self.steps = 0
        self.lora_steps = 0

    def __call__(
        self, model: nn.Module, h: torch.Tensor, positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]], slot_mapping: torch.Tensor, meta: AttentionMetadata,
        lora: LoRAStep | None = None,
    ) -> torch.Tensor | None:
        """All layers and the final norm over embeddings h [T, hidden], each token with its LoRA
        adapter if `lora`; None when not applicable."""
        if not (cpu_native.usable(h, model.rope_cos) and cpu_native.has_sgemm()):
            return None
        plan = native_plan(meta)
        if plan.long_rows:
            return None
        if getattr(model, "bf16_gemm", False) and h.shape[0] >= BF16_GEMM_MIN_ROWS and not cpu_native.has_bf16_gemm():
            return None   # bf16 weights, many rows, no native bf16 GEMM: torch's, in the torch loop (layers/linear.py)
        table = self._layer_table(model, kv_caches)
        if table is None:
            return None
        lora_table, lora_slots, lora_num_slots, lora_rank = None, None, 0, 0
        if lora is not None:
            lora_table = self._lora_stack_table(lora.stacks)
            if lora_table is None:
                return None
            lora_slots = lora.plan.token_slots.contiguous()
            lora_num_slots, lora_rank = lora.stacks.num_slots, lora.stacks.max_rank
        cfg = model.config
        t, hidden = h.shape
        attn = model.layers[0].self_attn
        heads, kv_heads, head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        inter = model.layers[0].mlp.inter
        q_size = heads * head_dim
        x16 = (max(hidden, q_size, inter) + 1) // 2   # x in bf16 for bf16 GEMM
        scratch = self._scratch_for(t * (2 * hidden + q_size + 2 * kv_heads * head_dim + 2 * q_size + 3 * inter + x16))
        out = torch.empty_like(h)
        tables, seq_lens = meta.block_tables.contiguous(), meta.seq_lens_t.contiguous()
        positions, slot_mapping = positions.contiguous(), slot_mapping.contiguous()
        rc = cpu_native.lib().weft_llama_layers_f32(
            h.data_ptr(), out.data_ptr(), scratch.data_ptr(), t, hidden, inter, table.data_ptr(), len(model.layers),
            model.norm.weight.data_ptr(), cfg.rms_norm_eps, heads, kv_heads, head_dim,
            model.rope_cos.data_ptr(), model.rope_sin.data_ptr(), positions.data_ptr(), slot_mapping.data_ptr(),
            tables.data_ptr(), tables.shape[1], seq_lens.data_ptr(), plan.query_start_loc.data_ptr(),
            plan.rows.data_ptr(), plan.num_rows, meta.block_size, attn.scale, cpu_native.kv_bf16(kv_caches[0][0]),
            quant.PACKED_MAX_ROWS,
            BF16_GEMM_MIN_ROWS, model.step_tile_rows if getattr(model, "bf16_gemm", False) else NO_AMX,
            0 if lora_table is None else lora_table.data_ptr(), 0 if lora_slots is None else lora_slots.data_ptr(),
            lora_num_slots, lora_rank, torch.get_num_threads(),
        )
        if rc != 0:
            raise RuntimeError(f"native decoder layers failed (code {rc})")
        self.steps += 1
        if lora is not None:
            self.lora_steps += 1
        return out

    def _scratch_for(self, floats: int) -> torch.Tensor:
        """The loop's scratch, kept between steps: a fresh megabyte each step (32 rows) came from
        mmap and cost its page faults (~4% of a c32 step, measured with perf)."""
        if self._scratch.numel() < floats:
            self._scratch = torch.empty(floats)
        return self._scratch

    def _lora_stack_table(self, stacks: LoRAStacks) -> torch.Tensor | None:
        """Addresses of every layer's stacked A^T and B^T (order: cpu_llama.c's L_* enum), built
        once per LoRAStacks (adapters are written into the stacks in place); None if a stack is
        not a contiguous float32 CPU tensor (the torch path handles those)."""
        first = stacks.stacks[0][PROJECTIONS[0]][0]
        key = (id(stacks), first.data_ptr())
        if self._lora_key == key:
            return self._lora_table
        rows = []
        for layer in stacks.stacks:
            row = []
            for proj in PROJECTIONS:   # qkv, o, gate_up, down: the C enum's order
                for t in layer[proj]:
                    if t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous():
                        return None
                    row.append(t.data_ptr())
            rows.append(row)
        self._lora_key, self._lora_table = key, torch.tensor(rows, dtype=torch.long)
        return self._lora_table

    def _layer_table(self, model: nn.Module, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor | None:
        """Addresses the C loop reads per layer (order: cpu_llama.c's enum), cached while neither the
        weights nor the caches move; None if some tensor is not contiguous, a weight not float32,
        or the caches of another dtype than float32 or bf16."""
        use_packed = quant.enabled()
        key = (model.embed_tokens.weight.data_ptr(), kv_caches[0][0].data_ptr(), len(kv_caches), use_packed)
        if self._table_key == key:
            return self._table
        rows = []
        for layer, (k_cache, v_cache) in zip(model.layers, kv_caches):
            attn, mlp = layer.self_attn, layer.mlp
            norms = _qk_norms(attn, model.config.rms_norm_eps)
            if norms is None:
                return None
            tensors = [layer.input_layernorm.weight, attn.qkv_proj.weight, attn.qkv_proj.bias, attn.o_proj.weight,
                       attn.o_proj.bias, layer.post_attention_layernorm.weight, mlp.gate_up_proj.weight,
                       mlp.down_proj.weight]
            if any(t is not None and (t.dtype != torch.float32 or not t.is_contiguous()) for t in (*tensors, *norms)):
                return None
            if not (cpu_native.kv_usable(k_cache, v_cache) and k_cache.dtype == kv_caches[0][0].dtype
                    and k_cache.is_contiguous() and v_cache.is_contiguous()):
                return None
            tensors += [k_cache, v_cache]
            projections = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)   # the C enum's order
            w16 = [bf16_weight(m) for m in projections]
            if any(w is not None and not w.is_contiguous() for w in w16):
                return None
            rows.append([0 if t is None else t.data_ptr() for t in tensors]
                        + [v for m in projections for v in _packed(m, use_packed)]
                        + [0 if t is None else t.data_ptr() for t in norms]
                        + [0 if w is None else w.data_ptr() for w in w16])
        self._table_key, self._table = key, torch.tensor(rows, dtype=torch.long)
        return self._table
