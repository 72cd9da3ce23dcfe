"""make bench BENCH=qmatmul: the GGUF-block GEMV (kernels/csrc/cpu_qmatmul.c) against BLAS sgemm
on the same weights, over the rows a step can have — where the crossover lies on this machine.

The weights are the default model's own (its 30 layers' four projections and the tied Q8_0
lm_head), packed as the engine packs them. `kernels/quant.py`'s PACKED_MAX_ROWS and
LOGITS_PACKED_MAX_ROWS come from this table (kernels/NOTES.md, "Quantised GEMV").

Then each GGUF block type on its own (`--types`; the K-quants among them) at the shape of the
default model's 30 ffn_down ([576, 1536]: its only rows that are whole K-quant super-blocks),
from random valid blocks (the kernel's cost does not depend on the values): packed vs
torch.matmul on their de-quantised float32, at `--type-rows` rows.

Usage: python -m bench qmatmul [--model PATH] [--rows 1,8,16,24,32,48,64,96] [--repeats 7]
       [--types Q8_0,Q4_0,...] [--type-rows 1,4]
"""
from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch

from bench.common import median, print_table, write_results
from kernels import cpu_native, gguf_blocks, quant


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
    ap.add_argument("--types", default=",".join(gguf_blocks.LAYOUT), help="GGUF types timed one by one")
    ap.add_argument("--type-rows", default="1,4")
    a = ap.parse_args(argv)
    if not (cpu_native.enabled() and cpu_native.lib()):
        print("the native CPU kernels are off or could not be built (WEFT_NATIVE, a C compiler)")
        return 1
    load_start = os.getloadavg()[0]   # other jobs on the machine: the figures are only as good as it is idle
    path = a.model or default_model_path()
    model, _ = build_model(load_model(path, progress=False), torch.device("cpu"), torch.float32)
    projections = [m for layer in model.layers for m in layer.projections()]
    if any(m.packed is None for m in projections) or model.lm_head_packed is None:
        print(f"{path}: not every projection carries GGUF blocks the fast path reads (kernels/gguf_blocks.py) to time")
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
    type_rows = _by_type(a.types.split(","), [int(r) for r in a.type_rows.split(",")], a.repeats)
    ratios |= {f"{r['gguf_type']}_float32_over_packed_t{r['threads']}_r{r['rows']}": r["float32_over_packed"]
               for r in type_rows}
    print()
    print_table(rows)
    print_table(type_rows)
    print(ratios)
    rows = rows + type_rows
    workload = {"load_average_1m": {"start": load_start, "end": os.getloadavg()[0]}, "model": str(path), "what": f"{len(projections)} projections / the lm_head, packed vs torch.matmul "
                "on the de-quantised float32; then per GGUF type (rows with gguf_type), "
                f"{_DOWN_COUNT} x {list(_DOWN_SHAPE)} random valid blocks", "repeats": a.repeats,
                "in_use": {"PACKED_MAX_ROWS": quant.PACKED_MAX_ROWS,
                           "LOGITS_PACKED_MAX_ROWS": quant.LOGITS_PACKED_MAX_ROWS}}
    cmd = "make bench BENCH=qmatmul" + (f" ARGS='{' '.join(argv)}'" if argv else "")
    print(f"wrote {write_results('qmatmul', workload, rows, ratios, cmd)}")
    return 0


# The default model's ffn_down: 30 of [576, 1536].
_DOWN_COUNT, _DOWN_SHAPE = 30, (576, 1536)


def _paired_ms(packed: Callable[[], object], dense: Callable[[], object], repeats: int) -> tuple[float, float, float]:
    """Median ms of each and the median of the per-pair ratios dense / packed, timed in
    alternation: on a machine shared with other jobs both sides of a pair see the same load."""
    packed(), dense()
    a, b = [], []
    for _ in range(repeats):
        for fn, times in ((packed, a), (dense, b)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return 1000 * median(a), 1000 * median(b), median([y / x for x, y in zip(a, b)])


def _by_type(types: list[str], row_counts: list[int], repeats: int) -> list[dict]:
    """Per GGUF type: its packed layout's GEMV over _DOWN_COUNT tensors of _DOWN_SHAPE against
    torch.matmul on the same weights de-quantised (3x the repeats: each is a few ms), on one
    thread and on the configured threads: on a machine whose cores other jobs keep busy, a
    parallel call of tens of microseconds waits on a descheduled thread, and the one-thread row
    is the kernel's own cost."""
    repeats *= 3
    gen = torch.Generator().manual_seed(1)
    n, k = _DOWN_SHAPE
    threads = torch.get_num_threads()
    out = []
    with torch.inference_mode():
        for t in types:
            packs = [quant.from_gguf_blocks(gguf_blocks.random_rows(t, n, k, gen), t, k) for _ in range(_DOWN_COUNT)]
            dense = [quant.dequantize(p) for p in packs]
            for th in sorted({1, threads}):
                torch.set_num_threads(th)
                for m in row_counts:
                    x = torch.randn(m, k, generator=gen)
                    packed_ms, float32_ms, ratio = _paired_ms(lambda: [quant.qmatmul(x, p) for p in packs],
                                                              lambda: [torch.matmul(x, w.T) for w in dense], repeats)
                    out.append({"gguf_type": t, "layout": gguf_blocks.LAYOUT[t], "threads": th, "rows": m,
                                "packed_bytes_per_weight": packs[0].data.numel() / (n * k),
                                "packed_ms": packed_ms, "float32_ms": float32_ms, "float32_over_packed": ratio})
                    print_table(out[-1:])
            torch.set_num_threads(threads)
    return out
