"""make bench BENCH=qmatmul: the GGUF-block GEMV (kernels/csrc/cpu_qmatmul.c) against BLAS sgemm
on the same weights, over the rows a step can have — where the crossover lies on this machine.

The weights are the default model's own (its 30 layers' four projections and the tied Q8_0
lm_head), packed as the engine packs them. `kernels/quant.py`'s PACKED_MAX_ROWS and
LOGITS_PACKED_MAX_ROWS come from this table (kernels/NOTES.md, "Quantised GEMV").

Usage: python -m bench qmatmul [--model PATH] [--rows 1,8,16,24,32,48,64,96] [--repeats 7]
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from bench.common import median, print_table, write_results
from kernels import cpu_native, quant


def _time_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: first-touch of the outputs, the thread pool
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * median(times)


def main(argv: list[str]) -> int:
    from service.models.build import build_model
    from service.loader import default_model_path, load_model

    ap = argparse.ArgumentParser(prog="bench qmatmul")
    ap.add_argument("--model", default=None, help="a GGUF file (default: the embedded SmolLM2)")
    ap.add_argument("--rows", default="1,8,16,24,32,48,64,96")
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args(argv)
    if not (cpu_native.enabled() and cpu_native.lib()):
        print("the native CPU kernels are off or could not be built (WEFT_NATIVE, a C compiler)")
        return 1
    path = a.model or default_model_path()
    model, _ = build_model(load_model(path, progress=False), torch.device("cpu"), torch.float32)
    projections = [m for layer in model.layers for m in layer.projections()]
    if any(m.packed is None for m in projections) or model.lm_head_packed is None:
        print(f"{path}: not every projection carries GGUF blocks (Q4_1/Q8_0) to time")
        return 1
    lm_packed, lm_weight = model.lm_head_packed, model.lm_head_weight
    rows = []
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for m in [int(r) for r in a.rows.split(",")]:
            xs = {k: torch.randn(m, k, generator=gen) for k in {p.weight.shape[1] for p in projections}}
            packed = _time_ms(lambda: [quant.qmatmul(xs[p.packed.k], p.packed) for p in projections], a.repeats)
            dense = _time_ms(lambda: [torch.matmul(xs[p.weight.shape[1]], p.weight.T) for p in projections], a.repeats)
            x = xs[lm_packed.k]
            lm_p = _time_ms(lambda: quant.qmatmul(x, lm_packed), a.repeats)
            lm_d = _time_ms(lambda: torch.matmul(x, lm_weight.T), a.repeats)
            rows.append({"rows": m, "projections_packed_ms": packed, "projections_float32_ms": dense,
                         "lm_head_packed_ms": lm_p, "lm_head_float32_ms": lm_d})
            print_table(rows[-1:])

    def crossover(packed_key: str, dense_key: str) -> int:
        """The most rows up to which packed is faster at every measured size (0: never)."""
        best = 0
        for r in rows:
            if r[packed_key] >= r[dense_key]:
                break
            best = r["rows"]
        return best

    ratios = {f"projections_float32_over_packed_r{r['rows']}": r["projections_float32_ms"] / r["projections_packed_ms"]
              for r in rows}
    ratios |= {f"lm_head_float32_over_packed_r{r['rows']}": r["lm_head_float32_ms"] / r["lm_head_packed_ms"]
               for r in rows}
    ratios["projections_packed_faster_up_to_rows"] = crossover("projections_packed_ms", "projections_float32_ms")
    ratios["lm_head_packed_faster_up_to_rows"] = crossover("lm_head_packed_ms", "lm_head_float32_ms")
    print()
    print_table(rows)
    print(ratios)
    workload = {"model": str(path), "what": f"{len(projections)} projections / the lm_head, packed vs torch.matmul "
                "on the de-quantised float32", "repeats": a.repeats,
                "in_use": {"PACKED_MAX_ROWS": quant.PACKED_MAX_ROWS,
                           "LOGITS_PACKED_MAX_ROWS": quant.LOGITS_PACKED_MAX_ROWS}}
    cmd = "make bench BENCH=qmatmul" + (f" ARGS='{' '.join(argv)}'" if argv else "")
    print(f"wrote {write_results('qmatmul', workload, rows, ratios, cmd)}")
    return 0
