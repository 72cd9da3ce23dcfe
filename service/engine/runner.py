"""Flattens a step's sequences into tensors (input ids, positions, slot mapping, block tables),
owns the KV cache tensors, and runs the model."""
from __future__ import annotations

import torch

from kernels import cpu_native, host_memory
from kernels.attention import NATIVE_MAX_QUERIES, AttentionMetadata
from kernels.lora import make_plan
from service.engine.kv_cache import KVCacheManager
from service.engine.step import RowLayout, SeqInput, StepOutput
from service.engine.tensor_parallel import TPGroup
from service.models.lora import LoRAStacks, LoRAStep


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv: KVCacheManager | None, num_blocks: int, block_size: int,
                 kv_dtype: torch.dtype, device: torch.device, lora_stacks: LoRAStacks | None = None,
                 tp: TPGroup | None = None) -> None:
        self.model = model
        self.kv = kv   # None on tensor-parallel ranks other than 0: rank 0 sends the block tables
        self.tp = tp
        self.vocab_size = int(model.config.vocab_size)
        self.lora_stacks = lora_stacks
        self.block_size = block_size
        self.device = device
        n_layers = model.config.num_hidden_layers
        # kv_planes 2: a K and a V tensor per layer; 1: one tensor passed as both (MLA's latent rows).
        planes = model.kv_planes
        shape = (n_layers, planes, num_blocks, block_size, model.num_kv_heads, model.head_dim)
        # On the CPU on huge pages: a step reads its blocks from all over the cache (host_memory.py).
        self.kv_tensor = (host_memory.zeros(shape, kv_dtype) if device.type == "cpu"
                          else torch.zeros(shape, dtype=kv_dtype, device=device))
        self.kv_caches = [(self.kv_tensor[i, 0], self.kv_tensor[i, planes - 1]) for i in range(n_layers)]
        if self.kv_tensor.device.type == "cpu" and kv_dtype in cpu_native.KV_DTYPES:
            cpu_native.lib()   # build the native kernels now (~12 s on 2 cores, once per machine), not on the first request

    def fast_path_max_queries(self) -> int | None:
        """The most query rows one sequence may bring to a step for the step to stay on the
        model's one-call native path (CPU float32 Llama family); None where there is no such
        path. Past it the *whole* step runs the torch loop, several times dearer per row at
        decode sizes: a cliff that speculation must not push a request over."""
        if getattr(self.model, "native", None) is None or not cpu_native.kv_usable(self.kv_tensor, self.kv_tensor):
            return None
        return NATIVE_MAX_QUERIES if cpu_native.has_sgemm() else None

    @staticmethod
    def kv_bytes_per_block(model: torch.nn.Module, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return model.config.num_hidden_layers * model.kv_planes * block_size * model.num_kv_heads * model.head_dim * elem

    def run(self, seqs: list[SeqInput]) -> StepOutput:
        """Run one step over `seqs`. Returns float32 logits for the sequences that asked for
        rows (`num_logits`: their last positions), with the layout of those rows."""
        # Single-query rows first: the attention reference batches them in one matmul.
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].token_ids) != 1)
        num_decodes = sum(1 for s in seqs if len(s.token_ids) == 1)
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts = [0]
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        sample_rows: list[int] = []
        token_slots: list[int] = []   # each token's LoRA slot (-1: none)
        first = [0] * len(seqs)
        count = [0] * len(seqs)
        spans: dict[int, tuple[int, int]] = {}   # want_hidden sequences: their rows in the flat batch
        bs = self.block_size
        for i in order:
            seq = seqs[i]
            start, end = seq.start, seq.start + len(seq.token_ids)
            blocks = self.kv.block_ids(seq.request_id)
            ids.extend(seq.token_ids)
            token_slots.extend([seq.lora_slot] * len(seq.token_ids))
            positions.extend(range(start, end))
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, end))
            starts.append(starts[-1] + len(seq.token_ids))
            seq_lens.append(end)
            tables.append(blocks)
            if seq.want_hidden:
                spans[i] = (starts[-2], starts[-1])
            if seq.num_logits:
                first[i], count[i] = len(sample_rows), seq.num_logits
                sample_rows.extend(range(starts[-1] - seq.num_logits, starts[-1]))
        # Every integer input in one tensor (one allocation, one host-to-device copy), then views.
        width = max(len(t) for t in tables)
        flat_tables: list[int] = []
        for t in tables:
            flat_tables.extend(t)
            flat_tables.extend([0] * (width - len(t)))
        dims = [len(ids), len(tables), width, len(sample_rows), num_decodes]
        packed = torch.tensor(ids + positions + slots + seq_lens + flat_tables + sample_rows + starts, dtype=torch.long)
        if self.tp is not None:   # the other ranks run the same step on their shards
            self.tp.send_step(dims, packed)
        lora = None
        if self.lora_stacks is not None:
            plan = make_plan(token_slots, self.lora_stacks.num_slots, self.device)
            lora = None if plan is None else LoRAStep(self.lora_stacks, plan)
        hidden, logits = self._forward(packed.to(self.device), dims, starts, seq_lens, lora)
        rows = {i: hidden[a:b] for i, (a, b) in spans.items()}
        if logits is None:
            logits = hidden.new_empty((0, 0), dtype=torch.float32)
        return StepOutput(logits, RowLayout(first, count), rows)

    def run_remote(self, dims: list[int], packed: torch.Tensor) -> None:
        """A tensor-parallel rank's share of the step rank 0 described (its `run` above)."""
        num_t, num_b, width, num_sample, _ = dims
        starts = packed[-(num_b + 1):].tolist()
        seq_lens = packed[3 * num_t:3 * num_t + num_b].tolist()
        self._forward(packed.to(self.device), dims, starts, seq_lens, None)

    def _forward(self, packed: torch.Tensor, dims: list[int], starts: list[int], seq_lens: list[int],
                 lora: LoRAStep | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Hidden states [T, hidden] and the float32 logits of the sampled rows (None when none
        are, and on ranks other than 0)."""
        num_t, num_b, width, num_sample, num_decodes = dims
        ids_t, positions_t, slots_t, seq_lens_t, tables_t, sample_t, _ = packed.split(
            [num_t, num_t, num_t, num_b, num_b * width, num_sample, num_b + 1])
        meta = AttentionMetadata(
            query_start_loc=starts,
            seq_lens=seq_lens,
            block_tables=tables_t.view(num_b, width),
            seq_lens_t=seq_lens_t,
            num_decodes=num_decodes,
            block_size=self.block_size,
        )
        hidden = self.model(ids_t, positions_t, self.kv_caches, slots_t, meta, lora)
        if not num_sample:
            return hidden, None
        # A single decode samples its only row: no gather.
        logits = self.model.compute_logits(hidden if num_sample == num_t else hidden[sample_t])
        if self.tp is not None:   # each rank computed its vocabulary share
            logits = self.tp.gather_logits(logits, self.vocab_size)
        return hidden, logits
