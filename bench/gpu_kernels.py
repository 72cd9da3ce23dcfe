"""python -m bench gpu_kernels: the Triton kernels on a CUDA GPU — full-size checks against the
torch references, then timings against the hardware floors measured in the same run.

- Device-to-device copy bandwidth (bytes read + written) and a bf16 matmul rate: the ceilings.
- Paged-attention decode (bf16, 32 query heads / 8 KV heads, head_dim 128, block size 16) at
  128-256 sequences x 1024-4096 context: median time (triton.testing.do_bench) against the
  bandwidth floor = bytes of K and V read / measured copy bandwidth. Ratio
  `attention_time_vs_bandwidth_floor` is the worst of these configurations (target <= 2).
- A small sweep of decode launch settings (BLOCK_N, warps, stages) so NOTES.md can record them.
- Prefill attention, KV store, bitmask and sampler timings (informational).

Writes bench/results/gpu_kernels.json. Usage: python -m bench gpu_kernels [--quick] [--no-checks]
(`TRITON_INTERPRET=1 python -m bench gpu_kernels --cpu-smoke` walks every code path on the CPU
at toy sizes, writing nothing: a check of this script before spending device time.)
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from bench.common import print_table, write_results

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DECODE_CONFIGS = [(128, 1024), (256, 1024), (128, 2048), (256, 2048), (128, 4096), (256, 4096)]
DEV = "cuda"
SMOKE = False   # --cpu-smoke: toy sizes on the CPU under the Triton interpreter


def _bench(fn, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds."""
    if SMOKE:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing

    try:
        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    except TypeError:  # older triton: quantiles only
        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5])[0])


def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy, counting bytes read and written."""
    n = 1 << (20 if SMOKE else 30)  # 1 GiB each way
    src = torch.empty(n, dtype=torch.uint8, device=DEV).random_()
    dst = torch.empty_like(src)
    ms = _bench(lambda: dst.copy_(src))
    return 2 * n / (ms * 1e-3)


def matmul_rate() -> float:
    """bf16 FLOP/s of an 8192^3 matmul on random data."""
    n = 256 if SMOKE else 8192
    a = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    ms = _bench(lambda: a @ b)
    return 2 * n**3 / (ms * 1e-3)


def decode_batch(batch: int, ctx: int, block_size: int = BLOCK_SIZE):
    """Fixed-length decode rows over randomly scattered cache blocks (random bf16 data)."""
    from kernels.attention import AttentionMetadata

    nb = -(-ctx // block_size)
    total = batch * nb + 8
    tables = torch.randperm(total, device=DEV)[: batch * nb].view(batch, nb)
    k_cache = torch.randn(total, block_size, KV_HEADS, HEAD_DIM, device=DEV, dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(batch, HEADS, HEAD_DIM, device=DEV, dtype=torch.bfloat16)
    seq_lens = [ctx] * batch
    meta = AttentionMetadata(list(range(batch + 1)), seq_lens, tables,
                             torch.tensor(seq_lens, device=DEV), batch, block_size)
    return q, k_cache, v_cache, meta


def kv_bytes(batch: int, ctx: int) -> int:
    return batch * ctx * KV_HEADS * HEAD_DIM * 2 * 2  # K and V, bf16


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench gpu_kernels")
    ap.add_argument("--quick", action="store_true", help="fewer configurations, no sweep")
    ap.add_argument("--no-checks", action="store_true", help="skip the full-size correctness checks")
    ap.add_argument("--cpu-smoke", action="store_true", help="toy sizes on the CPU (needs TRITON_INTERPRET=1)")
    args = ap.parse_args(argv)
    try:
        import triton  # noqa: F401
    except ImportError:
        print("gpu_kernels: triton is not installed", file=sys.stderr)
        return 2
    if args.cpu_smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("gpu_kernels --cpu-smoke needs TRITON_INTERPRET=1 in the environment", file=sys.stderr)
            return 2
        global DEV, SMOKE, HEADS, KV_HEADS, HEAD_DIM, DECODE_CONFIGS
        DEV, SMOKE = "cpu", True
        HEADS, KV_HEADS, HEAD_DIM, DECODE_CONFIGS = 8, 2, 32, [(3, 40), (2, 70)]
    elif not torch.cuda.is_available():
        print("gpu_kernels: no CUDA device here; this suite needs an NVIDIA GPU "
              "(the CPU checks are tests/test_kernels.py under TRITON_INTERPRET=1).", file=sys.stderr)
        return 2
    return _run(args, argv)


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    import triton

    from kernels import triton_attention as ta
    from kernels.attention import paged_attention_ref
    from kernels.mask import apply_token_bitmask_triton_
    from kernels.sampling import sample_tokens_ref
    from kernels.triton_kv_store import store_kv_triton
    from kernels.triton_sampling import sample_tokens_triton
    from tests.test_kernels import CASES, make_attention_batch, run_cases

    torch.manual_seed(int(time.time()))
    if SMOKE:
        dev_name, sms = "cpu (interpreter smoke run)", 4
    else:
        props = torch.cuda.get_device_properties(0)
        dev_name, sms = props.name, props.multi_processor_count
    print(f"device {dev_name}, {sms} SMs, torch {torch.__version__}, triton {triton.__version__}")
    failures: list[str] = []

    def free() -> None:
        if not SMOKE:
            torch.cuda.empty_cache()

    # ---- full-size checks ------------------------------------------------------------------
    checks: dict[str, str] = {}
    if not args.no_checks:
        names = list(CASES) if not SMOKE else ["attention-g3-bs16-bfloat16", "sampling"]
        res = run_cases(names, DEV, full=not SMOKE)
        for name, err in res.items():
            checks[name] = "ok" if err is None else "FAIL"
            if err is not None:
                failures.append(name)
                print(f"--- {name} FAILED\n{err}")
        print(f"checks: {sum(e is None for e in res.values())}/{len(res)} passed")
        # The timed decode shape itself, against the float64 reference.
        b, c = DECODE_CONFIGS[0]
        q, kc, vc, meta = decode_batch(b, c)
        ref = paged_attention_ref(q.double(), kc.double(), vc.double(), meta, HEAD_DIM ** -0.5)
        err = _rel(ta.paged_attention_triton(q, kc, vc, meta, HEAD_DIM ** -0.5), ref)
        err_bf16 = _rel(paged_attention_ref(q, kc, vc, meta, HEAD_DIM ** -0.5), ref)
        checks[f"decode-B{b}-ctx{c}-vs-fp64"] = f"{err:.2e} (torch bf16 ref {err_bf16:.2e})"
        if not err < max(1e-2, 3 * err_bf16):
            failures.append(f"decode-B{b}-ctx{c}-vs-fp64")
        del q, kc, vc, meta, ref
        free()

    bw = copy_bandwidth()
    flops = matmul_rate()
    print(f"copy bandwidth {bw / 1e12:.3f} TB/s (read+write), bf16 matmul {flops / 1e12:.1f} TFLOP/s")

    rows: list[dict] = []

    def row(kernel: str, config: str, ms: float, floor_ms: float, note: str = "") -> None:
        rows.append({"kernel": kernel, "config": config, "time_us": ms * 1e3, "floor_us": floor_ms * 1e3,
                     "vs_floor": ms / floor_ms if floor_ms else float("nan"), "note": note})

    # ---- decode attention --------------------------------------------------------------------
    scale = HEAD_DIM ** -0.5
    configs = DECODE_CONFIGS[:2] if args.quick else DECODE_CONFIGS
    sweep_at = {configs[0], configs[-1]} if not (args.quick or SMOKE) else ({configs[0]} if SMOKE else set())
    decode_ratios = []
    sweep: list[dict] = []
    for batch, ctx in configs:
        q, kc, vc, meta = decode_batch(batch, ctx)
        out = torch.empty_like(q)
        floor = kv_bytes(batch, ctx) / bw * 1e3
        ms = _bench(lambda: ta.paged_attention_triton(q, kc, vc, meta, scale, out=out))
        decode_ratios.append(ms / floor)
        row("attention-decode", f"B{batch} ctx{ctx} bs{BLOCK_SIZE}", ms, floor, "default launch")
        if (batch, ctx) in sweep_at:
            for block_n in (32, 64, 128):
                for warps in (2, 4, 8):
                    for stages in (2, 3, 4):
                        try:
                            t = _bench(lambda: ta.paged_attention_triton(
                                q, kc, vc, meta, scale, out=out, decode_block_n=block_n,
                                decode_warps=warps, decode_stages=stages), warmup=10, rep=40)
                        except Exception as e:  # noqa: BLE001 - out of resources etc.
                            t = float("nan")
                            print(f"sweep {block_n}/{warps}/{stages}: {type(e).__name__}: {e}")
                        sweep.append({"config": f"B{batch} ctx{ctx}", "block_n": block_n, "warps": warps,
                                      "stages": stages, "time_us": t * 1e3, "vs_floor": t / floor})
                        if SMOKE:
                            break
        if (batch, ctx) == configs[0]:
            ref_ms = _bench(lambda: paged_attention_ref(q, kc, vc, meta, scale), warmup=5, rep=20)
            row("attention-decode-torch-ref", f"B{batch} ctx{ctx} bs{BLOCK_SIZE}", ref_ms, floor, "reference")
        del q, kc, vc, meta, out
        free()
    # Block size 32, and small batches (split-K).
    extra = ((128, 2048, 32), (8, 4096, 16), (1, 4096, 16)) if not SMOKE else ((2, 50, 32), (1, 300, 16))
    for batch, ctx, bs in extra:
        q, kc, vc, meta = decode_batch(batch, ctx, bs)
        ms = _bench(lambda: ta.paged_attention_triton(q, kc, vc, meta, scale))
        row("attention-decode", f"B{batch} ctx{ctx} bs{bs}", ms, kv_bytes(batch, ctx) / bw * 1e3,
            "split-K" if batch * KV_HEADS < 2 * sms else "")
        del q, kc, vc, meta
    free()

    # ---- prefill attention: 8 rows of 512 new tokens over a 1536-token cached prefix ----------
    n_rows, ctx, new = (8, 1536, 512) if not SMOKE else (2, 20, 30)
    q, kc, vc, meta = make_attention_batch([], [(ctx, new)] * n_rows, HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE,
                                           torch.bfloat16, DEV)
    ms = _bench(lambda: ta.paged_attention_triton(q, kc, vc, meta, scale))
    # Causal work: query i of a row sees ctx + i + 1 keys; 4 flops per (query, key, head, dim).
    pairs = n_rows * sum(ctx + i + 1 for i in range(new))
    row("attention-prefill", f"{n_rows} x ({ctx} ctx + {new} new)", ms, 4 * pairs * HEADS * HEAD_DIM / flops * 1e3,
        "floor = flops / matmul rate")
    del q, kc, vc, meta
    free()

    # ---- KV store ----------------------------------------------------------------------------
    for tokens in ((256, 8192) if not SMOKE else (7,)):
        nblk = tokens // BLOCK_SIZE + 64
        kc = torch.randn(nblk, BLOCK_SIZE, KV_HEADS, HEAD_DIM, device=DEV, dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        k = torch.randn(tokens, KV_HEADS, HEAD_DIM, device=DEV, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        slots = torch.randperm(nblk * BLOCK_SIZE, device=DEV)[:tokens]
        ms = _bench(lambda: store_kv_triton(k, v, kc, vc, slots))
        row("store_kv", f"T{tokens}", ms, 2 * 2 * k.numel() * 2 / bw * 1e3, "bytes: read + write K,V")

    # ---- bitmask and sampler (B=256, V=128256) ------------------------------------------------
    vocab, batch = (128_256, 256) if not SMOKE else (1000, 4)
    logits = torch.randn(batch, vocab, device=DEV) * 4
    bitmask = torch.randint(-2**31, 2**31 - 1, (batch, -(-vocab // 32)), dtype=torch.int32, device=DEV)
    work = logits.clone()
    ms = _bench(lambda: apply_token_bitmask_triton_(work, bitmask))
    row("bitmask", f"B{batch} V{vocab}", ms, (logits.numel() * 4 * 2 + bitmask.numel() * 4) / bw * 1e3,
        "floor counts a full rewrite")
    seeds = torch.randint(0, 2**62, (batch,), device=DEV)
    pos = torch.randint(0, 4096, (batch,), device=DEV)
    ones, zeros = torch.ones(batch, device=DEV), torch.zeros(batch, dtype=torch.long, device=DEV)
    floor = logits.numel() * 4 / bw * 1e3
    for name, temp, top_k, top_p in (
        ("greedy", zeros.float(), zeros, ones),
        ("T=0.8", ones * 0.8, zeros, ones),
        ("T=0.8 top_k=50", ones * 0.8, zeros + 50, ones),
        ("T=0.8 top_p=0.9", ones * 0.8, zeros, ones * 0.9),
        ("T=0.8 top_k=50 top_p=0.9", ones * 0.8, zeros + 50, ones * 0.9),
    ):
        ms = _bench(lambda: sample_tokens_triton(logits, temp, top_k, top_p, seeds, pos), warmup=5, rep=30)
        row("sample_tokens", f"B{batch} V{vocab} {name}", ms, floor, "floor: one read of the logits")
    ms = _bench(lambda: sample_tokens_ref(logits, ones * 0.8, zeros + 50, ones * 0.9, seeds, pos), warmup=1, rep=5)
    row("sample_tokens-torch-ref", f"B{batch} V{vocab} T=0.8 top_k=50 top_p=0.9", ms, floor, "reference")

    print_table(rows)
    if sweep:
        best: dict[str, dict] = {}
        for s in sweep:
            if s["time_us"] == s["time_us"] and (s["config"] not in best or s["time_us"] < best[s["config"]]["time_us"]):
                best[s["config"]] = s
        print("decode sweep, best per config:")
        print_table(list(best.values()))
    ratio = max(decode_ratios)
    print(f"attention_time_vs_bandwidth_floor = {ratio:.2f} (worst decode config; target <= 2)")
    if SMOKE:
        print("cpu smoke run: every path ran; nothing written")
        return 1 if failures else 0
    workload = {
        "attention": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "block_size": BLOCK_SIZE,
                      "dtype": "bfloat16", "decode_configs": [f"B{b} ctx{c}" for b, c in configs]},
        "copy_bandwidth_TBps": round(bw / 1e12, 3), "bf16_matmul_TFLOPs": round(flops / 1e12, 1),
        "device": dev_name, "triton": triton.__version__, "checks": checks, "decode_sweep": sweep,
    }
    path = write_results("gpu_kernels", workload, rows, {"attention_time_vs_bandwidth_floor": ratio},
                         "python -m bench gpu_kernels " + " ".join(argv))
    print(f"wrote {path}")
    if failures:
        print(f"FAILED checks: {failures}")
        return 1
    return 0
