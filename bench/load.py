"""Driving a workload at a fixed concurrency through any streaming interface (gRPC, HTTP, in-process)."""
from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence

from bench.common import throughput_row
from bench.workload import Item

# One request: yields the number of new tokens in each delta.
Stream = Callable[[Item], AsyncIterator[int]]


Result = tuple[float, list[float], list[float]]   # wall seconds, TTFTs, TPOTs


async def run_level(stream: Stream, items: list[Item], conc: int) -> Result:
    sem = asyncio.Semaphore(conc)
    ttfts: list[float] = []
    tpots: list[float] = []

    async def one(item: Item) -> None:
        async with sem:
            t0 = time.perf_counter()
            first = None
            n = 0
            async for k in stream(item):
                if k and first is None:
                    first = time.perf_counter()
                n += k
            end = time.perf_counter()
            if n != item.max_tokens or first is None:
                raise RuntimeError(f"expected {item.max_tokens} tokens, got {n}")
            ttfts.append(first - t0)
            tpots.append((end - first) / max(1, n - 1))

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in items))
    return time.perf_counter() - t0, ttfts, tpots


def level_row(system: str, conc: int, items: list[Item], results: list[Result]) -> dict:
    return throughput_row(system, conc, items, sum(r[0] for r in results), [t for r in results for t in r[1]],
                          [t for r in results for t in r[2]])


class ServerProcess:
    """`weft serve` in a subprocess, gRPC on a free loopback port; ready once it logs "serving"."""

    def __init__(self, model: str | None, dtype: str, kv_cache_gb: float, extra_args: Sequence[str] = ()) -> None:
        cmd = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", "0",
               "--dtype", dtype, "--kv-cache-gb", str(kv_cache_gb), *extra_args]
        if model:
            cmd += ["--model", model]
        env = {**os.environ, "WEFT_API_KEY": ""}
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        assert self.proc.stderr is not None
        self._stderr = self.proc.stderr
        self.log: list[str] = []
        self.port = self._wait_serving()
        # Keep draining its log so the pipe never fills and blocks the server.
        threading.Thread(target=lambda: self.log.extend(self._stderr), daemon=True).start()

    def _wait_serving(self) -> int:
        port = None
        for line in self._stderr:
            self.log.append(line)
            if m := re.search(r"listening on 127\.0\.0\.1:(\d+)", line):
                port = int(m.group(1))
            if "serving " in line and port:
                return port
        raise RuntimeError("weft serve exited before serving:\n" + "".join(self.log))

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
