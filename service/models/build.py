"""From a loaded checkpoint to our forward pass: the family's class, its weights, its device."""
from __future__ import annotations

import logging

import torch

from common.errors import ModelLoadError
from service.loader import LoadedModel, gguf_source
from service.models import bf16_packed
from service.models.gguf_packed import attach_packed
from service.models.parallel import Parallel, shard_model
from service.models.registry import MODEL_CLASSES

log = logging.getLogger("weft.engine")


def _architecture(hf: object) -> str:
    """The checkpoint's architecture name (its config's first), "?" when it names none."""
    return (getattr(hf, "architectures", None) or ["?"])[0]


def auto_dtype(loaded: LoadedModel, device: torch.device, sharded: bool) -> torch.dtype:
    """What `--dtype auto` runs: bfloat16 on CUDA; on a CPU, the faster for batched work of float32
    and the bf16 CPU path (service/models/bf16_packed.py: measured here, said in the log)."""
    if device.type != "cpu":
        return torch.bfloat16
    hf = loaded.config
    cls = MODEL_CLASSES.get(_architecture(hf))
    if cls is None:
        return torch.float32   # build_model says why it cannot build it
    lossless = gguf_source(loaded) is not None or str(getattr(hf, "torch_dtype", "")).endswith("bfloat16")
    dtype, why = bf16_packed.auto_dtype(cls, device, sharded, lossless, int(hf.hidden_size),
                                        int(getattr(hf, "intermediate_size", 4 * hf.hidden_size)))
    log.info("dtype auto on CPU: %s", why)
    return dtype


def build_model(loaded: LoadedModel, device: torch.device, dtype: torch.dtype,
                parallel: Parallel | None = None) -> tuple[torch.nn.Module, int]:
    """Our forward pass for a loaded checkpoint, on `device`; returns it and its usable context.
    With `parallel` (a tensor-parallel rank), only that rank's shard of the weights is kept.
    bfloat16 on CPU for the Llama family builds a float32 model on bf16 weights, or, from a GGUF,
    on its de-quantised weights with bf16 copies for steps of many rows
    (service/models/bf16_packed.py; `bf16_packed.run_dtype` tells the engine)."""
    hf = loaded.config
    arch = _architecture(hf)
    if arch not in MODEL_CLASSES:
        raise ModelLoadError(f"unsupported architecture {arch!r}; supported: {sorted(MODEL_CLASSES)}")
    cls = MODEL_CLASSES[arch]
    context = int(getattr(hf, "max_position_embeddings", 2048))   # sliding windows are run, not a cap
    try:
        model = cls(hf, max_positions=context)
    except ValueError as exc:   # a config feature the family does not compute
        raise ModelLoadError(f"{loaded.source}: {arch}: {exc}") from exc
    loaded_f32 = all(t.dtype == torch.float32 for t in loaded.weights.values())
    try:
        model.load_weights(loaded.weights)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{loaded.source}: {exc}") from exc
    loaded.weights.clear()  # the model holds its own (fused) copies now
    sharded = parallel is not None and parallel.world > 1
    if sharded:
        try:
            shard_model(model, parallel)
        except ModelLoadError as exc:
            raise ModelLoadError(f"{loaded.source}: {arch}: {exc}") from exc
    bf16_weights = bf16_packed.applies(cls, device, dtype, sharded)
    model.to(device=device, dtype=torch.float32 if bf16_weights else dtype).eval()
    # The GGUF blocks are whole matrices: a shard reads its float weights only. bfloat16 on a GGUF
    # keeps them too (its float32 weights are their exact de-quantisation, when loaded in float32).
    blocks = dtype == torch.float32 or (bf16_weights and loaded_f32)
    gguf = gguf_source(loaded) if device.type == "cpu" and blocks and not sharded else None
    if bf16_weights and gguf is None:
        bf16_packed.attach_bf16(model)
    if gguf is not None:
        # Few-row steps read the GGUF's blocks instead of the float32 weights (kernels/quant.py).
        try:
            count = attach_packed(model, gguf)
            log.info("packed %d weight tensors from %s for few-row steps", count, gguf.name)
        except Exception as exc:   # an optimisation only: the float32 path is always whole
            log.warning("could not read the GGUF blocks of %s (%s): float32 weights only", gguf, exc)
        if bf16_weights:
            bf16_packed.attach_bf16_gemm(model)
    return model, context
