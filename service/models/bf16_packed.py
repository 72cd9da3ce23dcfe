"""dtype bfloat16 on CPU, Llama family: bf16 weights, float32 activations.

torch's bf16 GEMV on a CPU is several times slower than float32, so running the layer loop in
bf16 made `--dtype bfloat16` ~4x slower than float32 at batch 1. Instead the model runs in
float32 (activations, attention, norms, KV cache) on weights rounded to bf16, and each projection
and the lm_head carries a FMT_BF16 copy (kernels/quant.py) that few-row steps stream: half the
bytes of float32, widened exactly in registers: float32 arithmetic on the bf16 values
(transformers in float32 on bf16-rounded weights is their exact reference). Steps of many rows
(prefill chunks, batches of layers/linear.py's BF16_GEMM_MIN_ROWS rows or more: 16 with AMX, 33
without) multiply the same bits by bf16 GEMM where the CPU has AVX512-BF16 or AMX (MKL's: bf16
products, float32 sums and output; about twice sgemm's rate, three or more times with AMX), else
sgemm on the float32 weights (WEFT_BF16_GEMM=0 too). The logits of such steps too, where that
GEMM is MKL's: its float32 outputs do not tie as bf16-rounded logits would. Other families and
CUDA keep plain bf16.

From a quantised GGUF the float32 weights stay the exact de-quantisation of its blocks, and
few-row steps stream those blocks (4-8 bits a weight) as in float32: bf16 copies of the
weights serve only the bf16 GEMM of steps of many rows (`attach_bf16_gemm`). Decoding at low
concurrency (and a request's speculative verify steps) is then float32's, bit for bit, and
prefill and large batches get bf16's rate. On a CPU with AMX the blocks themselves multiply in
bf16 on the tiles (no bf16 copies) in steps of AMX_MIN_ROWS rows or more from several sequences,
and in a sequence's own steps from LONE_AMX_MIN_ROWS (layers/linear.py's amx_min_rows): several
times faster than float32 at many rows, from ~5 rows on; below that the float32 kernel is faster
(one row: 3.6 ms against 6.3 for the default model's projections), and a request decoding alone
keeps float32's products in its plain and its verify steps alike.
"""
from __future__ import annotations

import logging

import torch

from common import env
from kernels import cpu_native, quant
from kernels.quant import equals_weight, from_bf16
from service.models.gguf_packed import packed_targets
from service.models.layers.linear import (AMX_MIN_ROWS, BF16_GEMM_MIN_ROWS, bf16_gemm_available, gemm_gflops,
                                          set_bf16_gemm)
from service.models.llama import LlamaForCausalLM

log = logging.getLogger("weft.models")


def applies(cls: type, device: torch.device, dtype: torch.dtype, sharded: bool) -> bool:
    """Whether a model of class `cls` asked for in `dtype` on `device` runs this way: the
    Llama-family class (its native loop reads the packed copies), CPU, one whole model."""
    return dtype == torch.bfloat16 and device.type == "cpu" and not sharded and issubclass(cls, LlamaForCausalLM)


# `--dtype auto` on a CPU: the rows of the step it times bf16 GEMM against sgemm at (a prefill
# chunk's, a large batch's: the steps bf16 GEMM serves), and how much faster bf16 must measure to
# be chosen (below that the two are within what a busy machine's timings move by).
AUTO_PROBE_ROWS = 128
AUTO_MIN_GAIN = 1.2


# Why steps of many rows do not use bf16 GEMM, where they do not (for the log).
NO_BF16_GEMM = "this CPU has no AVX512-BF16 or AMX, or WEFT_BF16_GEMM=0"


def bf16_gemm_on() -> bool:
    """Whether steps of many rows multiply by bf16 GEMM: the CPU has it and WEFT_BF16_GEMM allows it."""
    return env.bf16_gemm_enabled() and bf16_gemm_available()


def auto_dtype(cls: type, device: torch.device, sharded: bool, lossless: bool, hidden: int,
               inter: int) -> tuple[torch.dtype, str]:
    """What `--dtype auto` runs on a CPU, and why (a line for the log): bfloat16 where this mode
    applies (`applies`), costs the checkpoint's few-row steps nothing (`lossless`: a GGUF's
    de-quantised weights, which this mode keeps, or weights that are bf16 already) and the CPU's
    bf16 GEMM measures faster than sgemm at the model's own shapes; else float32. Decoding at few
    rows is then float32's either way; only steps of many rows differ (bf16 products, float32
    accumulation)."""
    if not applies(cls, device, torch.bfloat16, sharded):
        return torch.float32, "float32 (the bf16 CPU path serves one whole Llama-family model)"
    if not lossless:
        return torch.float32, "float32 (the checkpoint's weights are not bf16: bf16 would round them)"
    if not bf16_gemm_on():
        return torch.float32, f"float32 ({NO_BF16_GEMM})"
    f32 = gemm_gflops(AUTO_PROBE_ROWS, hidden, inter, torch.float32)
    bf16 = gemm_gflops(AUTO_PROBE_ROWS, hidden, inter, torch.bfloat16)
    measured = f"bf16 GEMM {bf16:.0f} GFLOPS against float32 {f32:.0f} at [{AUTO_PROBE_ROWS}, {hidden}] x [{hidden}, {inter}]"
    if bf16 < AUTO_MIN_GAIN * f32:
        return torch.float32, f"float32 ({measured})"
    steps = (f"prefill and steps of {BF16_GEMM_MIN_ROWS} rows or more multiply in bf16, decoding below that "
             "stays float32's") if not cpu_native.has_amx() else \
        (f"prefill and steps of {AMX_MIN_ROWS} rows or more from several sequences multiply a GGUF's blocks in "
         "bf16 on AMX tiles, a request decoding alone stays float32's")
    return torch.bfloat16, f"bfloat16 ({measured}): {steps}; --dtype float32 keeps every step float32"


def load_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype to read a checkpoint in for a model that runs in `dtype` on `device`: bfloat16 on
    a CPU reads float32, so that the Llama family keeps a GGUF's exact de-quantisation (its blocks
    then serve few-row steps, `build_model`); the others round to bf16 as reading bf16 would."""
    return torch.float32 if device.type == "cpu" and dtype == torch.bfloat16 else dtype


def run_dtype(model: torch.nn.Module, dtype: torch.dtype) -> torch.dtype:
    """The dtype the engine's KV cache and adapters take for `model`: float32 for a model built
    this way (its activations are float32), else the configured one."""
    return torch.float32 if getattr(model, "bf16_weights", False) else dtype


def attach_bf16_gemm(model: LlamaForCausalLM) -> int:
    """Give each projection of the float32 `model` (weights untouched; a GGUF's blocks attached
    for few-row steps) a bf16 copy for the GEMM of steps of many rows, where this CPU has one.
    Returns how many projections got one."""
    gemm = bf16_gemm_on()
    count = 0
    for owner, attr, weight in packed_targets(model):
        if attr == "packed":
            # On AMX the blocks themselves multiply in bf16 on the tiles in steps of many rows: no copy
            # (2 bytes a weight, 212 MB for the default model) for the GEMM.
            tiles = gemm and cpu_native.has_amx() and quant.amx_shaped(owner.packed)
            set_bf16_gemm(owner, weight.to(torch.bfloat16).contiguous() if gemm and not tiles else None, tiles)
            count += gemm
    # float32 logits from bf16 products; on AMX the lm_head's blocks serve them (compute_logits),
    # so no bf16 copy is made there.
    if gemm and cpu_native.has_bf16_gemm() and not (cpu_native.has_amx() and model.lm_head_packed is not None):
        model.lm_head_bf16 = model.lm_head_weight.to(torch.bfloat16).contiguous()
    model.bf16_weights = True
    model.bf16_gemm = gemm
    log.info("dtype bfloat16 on CPU from a GGUF: float32 on its de-quantised weights, its blocks for steps of "
             "few rows, %s for steps of many rows", f"bf16 products ({count} projections)" if gemm else
             f"sgemm ({NO_BF16_GEMM})")
    return count


def attach_bf16(model: LlamaForCausalLM) -> int:
    """Round the float32 `model`'s parameters to bf16 in place (exact when loaded in bf16) and give
    each projection and the lm_head its FMT_BF16 copy; returns how many tensors were packed."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16())
    gemm = bf16_gemm_on()
    count = 0
    for owner, attr, weight in packed_targets(model):
        packed = from_bf16(weight) if weight.shape[1] % 32 == 0 else None   # the kernel's block
        if packed is not None and not equals_weight(packed, weight):
            packed = None   # cannot happen after the rounding above; the float32 path stays whole
        setattr(owner, attr, packed)
        count += packed is not None
        # The packed bits are the weight in bf16, row-major: the GEMM reads them, no second copy.
        w16 = packed.data.view(torch.bfloat16).view(packed.n, packed.k) if gemm and packed is not None else None
        if attr == "packed":
            set_bf16_gemm(owner, w16)
        elif cpu_native.has_bf16_gemm():   # the lm_head: float32 logits from bf16 products
            model.lm_head_bf16 = w16
    model.bf16_weights = True
    model.bf16_gemm = gemm
    log.info("dtype bfloat16 on CPU: bf16 weights, float32 activations (%d weight tensors stream as bf16 "
             "in steps of few rows; steps of many rows multiply by %s)", count,
             "bf16 GEMM" if gemm else f"sgemm on float32 weights ({NO_BF16_GEMM})")
    return count
