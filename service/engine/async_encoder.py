"""AsyncEncoder: an embedding model (EncoderCore) on a thread of its own, fed from asyncio.

Why its own thread rather than the generation engine's: an encoder shares nothing with the
generation model (no KV cache, no scheduler), so a batch of embeddings can run while the engine
thread keeps stepping; the OS interleaves the two and neither waits for the other's whole batch.
On the engine thread, each embedding batch would stall every running stream for its whole
forward (a few hundred ms for a full token budget on 2 cores). An encoder-only server has no
engine thread at all. The cost is a second OpenMP thread pool in the process, which makes libgomp
stop spinning and slows the engine's small steps (service/engine/openmp.py), so when a generation
engine shares the process the encoder thread frees its pool whenever its queue runs dry.

Requests that arrive while a forward runs are batched together into the next one (up to the
core's token budget): concurrent callers share one padding-free forward.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from service.engine.encoder import EncoderCore
from service.engine.openmp import release_thread_pool

log = logging.getLogger("weft.engine")


@dataclass(slots=True)
class _Job:
    seqs: Sequence[Sequence[int]]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.seqs)


class AsyncEncoder:
    """The Embedder of an encoder model (service/engine/embedder.py)."""

    def __init__(self, core: EncoderCore, release_pool: bool = False) -> None:
        self.core = core
        self.release_pool = release_pool      # free the OpenMP pool when idle (a generation engine shares the CPU)
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.batches = 0                      # forwards run (tests check that concurrent calls share them)
        # The Embedder surface.
        self.name, self.architecture = core.name, core.architecture
        self.dimension, self.vocab_size, self.max_input_tokens = core.dimension, core.vocab_size, core.max_input_tokens
        self.normalize, self.pooling, self.tokenizer = core.normalize, core.pooling, core.tokenizer
        self.device, self.dtype = core.device, core.dtype

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="weft-encoder", daemon=True)
            self._thread.start()

    async def shutdown(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    def tokenize(self, texts: Sequence[str], truncate: bool) -> list[list[int]]:
        return self.core.tokenize(texts, truncate)

    async def embed(self, seqs: Sequence[Sequence[int]], request_id: str = "") -> torch.Tensor:
        self.start()
        loop = asyncio.get_running_loop()
        job = _Job(seqs, loop.create_future(), loop)
        self._jobs.put(job)
        return await job.future

    # ---- the encoder thread --------------------------------------------------------------------

    def _run(self) -> None:
        budget = self.core.max_batch_tokens
        while True:
            first = self._jobs.get()
            if first is None:
                return
            jobs, tokens, stop = [first], first.tokens, False
            while tokens < budget:
                try:
                    nxt = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                jobs.append(nxt)
                tokens += nxt.tokens
            jobs = [j for j in jobs if not j.future.done()]   # callers that gave up (cancelled, deadline)
            if jobs:
                self._embed(jobs)
            if stop:
                return
            if self.release_pool and self._jobs.empty():
                release_thread_pool()

    def _embed(self, jobs: list[_Job]) -> None:
        seqs = [s for j in jobs for s in j.seqs]
        try:
            vectors = self.core.embed(seqs)
            self.batches += 1
        except Exception as exc:  # a failing batch fails its callers, never the thread
            log.exception("embedding batch failed")
            for j in jobs:
                j.loop.call_soon_threadsafe(_settle, j.future, None, RuntimeError(f"embedding failed: {exc}"))
            return
        start = 0
        for j in jobs:
            part = vectors[start:start + len(j.seqs)]
            start += len(j.seqs)
            j.loop.call_soon_threadsafe(_settle, j.future, part, None)


def _settle(future: asyncio.Future, value: torch.Tensor | None, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(value)
