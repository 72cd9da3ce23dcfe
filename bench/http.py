"""make bench BENCH=http: the engine-core workload through the REST shim (the official `openai`
client, streaming completions) vs straight gRPC (AsyncWeftClient), one server, one run.

The server is a real `weft serve` subprocess with its HTTP port on (gRPC and HTTP in one process,
as deployed). Both sides send the same prompts as token ids, greedy, EOS ignored, so every
request produces exactly max_tokens tokens; the HTTP side counts them with vLLM's
`return_token_ids` extension. Each level's requests are split in two halves run A-B-B-A (gRPC,
HTTP, HTTP, gRPC) so that load drifting on a shared machine hits both alike, and each side
has its own prefix-cache salt so that neither finds the other's prompts cached. A row sums both
halves; http_vs_grpc_c<N> = HTTP tok/s ÷ gRPC tok/s (target >= 0.9), and
ttft_p50_http_over_grpc_c<N> = HTTP TTFT p50 ÷ gRPC TTFT p50 (the shim's latency cost).

Usage: python -m bench http [--model PATH] [--dtype auto|float32|bfloat16] [--levels 1,8,32]
                            [--requests-per-level K]
"""
from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator

from bench.common import print_table, write_results
from common.net import free_port
from bench.load import Result, ServerProcess, Stream, level_row, run_level
from bench.workload import Item, make_workload


def _grpc(client, salt: str) -> Stream:  # client: AsyncWeftClient
    async def stream(item: Item) -> AsyncIterator[int]:
        async for msg in client.generate_stream(item.prompt_ids, temperature=0, max_tokens=item.max_tokens,
                                                ignore_eos=True, cache_salt=salt):
            yield len(msg.choice.token_ids)
    return stream


def _http(client, model: str, salt: str) -> Stream:  # client: openai.AsyncOpenAI
    async def stream(item: Item) -> AsyncIterator[int]:
        chunks = await client.completions.create(
            model=model, prompt=item.prompt_ids, max_tokens=item.max_tokens, temperature=0, stream=True,
            extra_body={"ignore_eos": True, "return_token_ids": True, "cache_salt": salt})
        async for chunk in chunks:
            for choice in chunk.choices:
                yield len((choice.model_extra or {}).get("token_ids") or ())
    return stream


class HttpServerProcess(ServerProcess):
    """`weft serve` with its REST shim on a second free port."""

    def __init__(self, model: str | None, dtype: str, kv_cache_gb: float) -> None:
        self.http_port = free_port()
        super().__init__(model, dtype, kv_cache_gb, ["--http-port", str(self.http_port)])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


class _RemoteTokenizer:
    """make_workload's tokenizer, through the server's Tokenize call."""

    def __init__(self, client) -> None:
        self.client = client

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.client.tokenize(text, add_special_tokens=add_special_tokens).token_ids)


async def _run(server: HttpServerProcess, workloads: dict[int, list[Item]]) -> list[dict]:
    import openai

    from clients.client import AsyncWeftClient

    rows: list[dict] = []
    async with AsyncWeftClient(server.target, timeout=3600) as grpc_client, openai.AsyncOpenAI(
            base_url=f"{server.url}/v1", api_key="bench", max_retries=0, timeout=3600) as oa:
        await grpc_client.wait_ready(120)
        model = (await oa.models.list()).data[0].id
        # One prefix-cache salt per system: neither reuses the other's prompt blocks, so both see
        # the same (cold) prefills whatever the order they run in.
        systems: dict[str, Stream] = {"grpc": _grpc(grpc_client, "grpc"), "http": _http(oa, model, "http")}
        warm = workloads[min(workloads)][:1]
        # First-call costs (connections, allocations) out of the timings; another salt, so that the
        # measured run of this prompt is cold too.
        for s in (_grpc(grpc_client, "warmup-grpc"), _http(oa, model, "warmup-http")):
            await run_level(s, warm, 1)
        for conc, items in workloads.items():
            half = (len(items) + 1) // 2
            a, b = items[:half], items[half:]
            results: dict[str, list[Result]] = {"grpc": [], "http": []}
            for system, part in (("grpc", a), ("http", a), ("http", b), ("grpc", b)):
                if part:
                    results[system].append(await run_level(systems[system], part, conc))
            for system in ("grpc", "http"):
                rows.append(level_row(system, conc, items, results[system]))
            print_table(rows[-2:])
    return rows


def main(argv: list[str]) -> int:
    from clients.client import WeftClient

    ap = argparse.ArgumentParser(prog="bench http")
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                    help="auto: what weft serve runs (float32 on CPU)")
    ap.add_argument("--levels", default="1,8,32")
    ap.add_argument("--requests-per-level", type=int, default=0, help="default: max(4, 2*concurrency)")
    ap.add_argument("--kv-cache-gb", type=float, default=2.0)
    a = ap.parse_args(argv)
    levels = [int(x) for x in a.levels.split(",")]

    server = HttpServerProcess(a.model, a.dtype, a.kv_cache_gb)
    try:
        with WeftClient(server.target, timeout=60) as c:
            tok = _RemoteTokenizer(c)
            workloads = {lvl: make_workload(tok, a.requests_per_level or max(4, 2 * lvl), seed=lvl) for lvl in levels}
            model_name = c.models()[0].name
        rows = asyncio.run(_run(server, workloads))
    finally:
        server.stop()

    by = {(r["system"], r["concurrency"]): r for r in rows}
    ratios = {f"http_vs_grpc_c{c}": by[("http", c)]["tok_per_s"] / by[("grpc", c)]["tok_per_s"] for c in levels}
    for c in levels:
        ratios[f"ttft_p50_http_over_grpc_c{c}"] = by[("http", c)]["ttft_p50_ms"] / by[("grpc", c)]["ttft_p50_ms"]
    print()
    print_table(rows)
    print(ratios)
    workload = {"prompt_tokens": 100, "output_tokens": "16-256 spread", "greedy": True, "dtype": a.dtype,
                "levels": levels, "model": a.model or model_name,
                "server": "weft serve subprocess (gRPC + HTTP shim in one process) on loopback",
                "clients": "grpc: AsyncWeftClient streaming; http: openai.AsyncOpenAI completions stream=True "
                           "(prompt as token ids, ignore_eos and return_token_ids in extra_body)"}
    path = write_results("http", workload, rows, ratios, "make bench BENCH=http")
    print(f"wrote {path}")
    return 0
