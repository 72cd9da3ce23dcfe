"""make bench BENCH=grpc: the engine-core workload through gRPC vs in-process AsyncEngine, one run.

The server is a real `weft serve` subprocess on a loopback port (as a deployment would run it);
the in-process side drives an AsyncEngine on the same model and settings in this process. Each
level's requests are split in two halves run A-B-B-A (in-process, gRPC, gRPC, in-process), so
load that drifts on a shared machine hits both sides alike. A row sums both halves; the ratio
grpc_vs_inprocess_c<N> = gRPC tok/s ÷ in-process tok/s (target >= 0.95).

Usage: python -m bench grpc [--model PATH] [--dtype auto|float32|bfloat16] [--levels 1,8,32]
                            [--requests-per-level K]
"""
from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator

from bench.common import print_table, write_results
from bench.load import Result, ServerProcess, Stream, level_row, run_level
from bench.workload import Item, make_workload
from decoding.sampling import SamplingParams
from service.config import EngineConfig
from service.engine.async_engine import AsyncEngine
from service.engine.core import EngineCore


def _inprocess(engine: AsyncEngine) -> Stream:
    async def stream(item: Item) -> AsyncIterator[int]:
        params = SamplingParams(temperature=0, max_tokens=item.max_tokens, ignore_eos=True)
        async for out in engine.generate(item.prompt_ids, params):
            yield len(out.token_ids)
    return stream


def _grpc(client) -> Stream:  # client: AsyncWeftClient
    async def stream(item: Item) -> AsyncIterator[int]:
        async for msg in client.generate_stream(item.prompt_ids, temperature=0, max_tokens=item.max_tokens,
                                                ignore_eos=True):
            yield len(msg.choice.token_ids)
    return stream


async def _run(core: EngineCore, server: ServerProcess, workloads: dict[int, list[Item]]) -> list[dict]:
    from clients.client import AsyncWeftClient

    engine = AsyncEngine(core)
    rows: list[dict] = []
    try:
        async with AsyncWeftClient(server.target, timeout=3600) as client:
            await client.wait_ready(120)
            local, remote = _inprocess(engine), _grpc(client)
            warm = workloads[min(workloads)][:1]
            await run_level(local, warm, 1)    # first-call costs (allocations, connection) out of the timings
            await run_level(remote, warm, 1)
            for conc, items in workloads.items():
                half = (len(items) + 1) // 2
                a, b = items[:half], items[half:]
                results: dict[str, list[Result]] = {"in-process": [], "grpc": []}
                for system, part in (("in-process", a), ("grpc", a), ("grpc", b), ("in-process", b)):
                    if part:
                        results[system].append(await run_level(local if system == "in-process" else remote, part, conc))
                for system in ("in-process", "grpc"):
                    rows.append(level_row(system, conc, items, results[system]))
                print_table(rows[-2:])
    finally:
        await engine.shutdown()
    return rows


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench grpc")
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                    help="auto: what weft serve runs (float32 on CPU)")
    ap.add_argument("--levels", default="1,8,32")
    ap.add_argument("--requests-per-level", type=int, default=0, help="default: max(4, 2*concurrency)")
    ap.add_argument("--kv-cache-gb", type=float, default=2.0)
    a = ap.parse_args(argv)
    levels = [int(x) for x in a.levels.split(",")]

    core = EngineCore(EngineConfig(model=a.model, dtype=a.dtype, kv_cache_gb=a.kv_cache_gb))
    workloads = {c: make_workload(core.tokenizer, a.requests_per_level or max(4, 2 * c), seed=c) for c in levels}
    server = ServerProcess(a.model, a.dtype, a.kv_cache_gb)
    try:
        rows = asyncio.run(_run(core, server, workloads))
    finally:
        server.stop()

    by = {(r["system"], r["concurrency"]): r for r in rows}
    ratios = {f"grpc_vs_inprocess_c{c}": by[("grpc", c)]["tok_per_s"] / by[("in-process", c)]["tok_per_s"]
              for c in levels}
    print()
    print_table(rows)
    print(ratios)
    workload = {"prompt_tokens": 100, "output_tokens": "16-256 spread", "greedy": True, "dtype": a.dtype,
                "levels": levels, "model": str(core.loaded.source),
                "server": "weft serve subprocess on loopback; client AsyncWeftClient streaming"}
    path = write_results("grpc", workload, rows, ratios, "make bench BENCH=grpc")
    print(f"wrote {path}")
    return 0
