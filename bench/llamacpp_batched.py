"""llama.cpp as llama-server runs it: continuous batching through llama-cpp-python's low-level API.

`llama_cpp.Llama` decodes one sequence at a time, which is not how Ollama or `llama-server -np N`
serve concurrent requests. Here N slots share one context (a unified KV cache, as llama-server's
default); every decode call carries one `llama_batch` holding each busy slot's next token plus
prompt chunks of newly arrived requests (at most n_batch tokens, as the server splits prompts),
and a slot whose request is done takes the next one at once: the closed loop Weft's clients run.
Greedy, as every row of the engine bench; the argmax over each output row runs in numpy (a few
microseconds a row, also what llama-server's greedy sampler costs).
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.common import print_table, throughput_row
from bench.workload import Item


@dataclass(slots=True)
class _Slot:
    seq: int
    item: Item | None = None
    fed: int = 0               # prompt tokens already in the KV cache
    made: int = 0              # tokens generated
    last: int = 0              # the token to feed next, once the prompt is in
    t0: float = 0.0
    first: float | None = None


_QUIET: list[object] = []   # the log callback, made once and kept alive for ctypes


def _silence(lc) -> None:
    """Drop llama.cpp's log: its per-tensor load log would bury the bench's tables."""
    if not _QUIET:
        _QUIET.append(lc.llama_log_callback(lambda level, text, user_data: None))
    lc.llama_log_set(_QUIET[0], None)


class LlamaCppBatched:
    """One llama.cpp context with `slots` sequences; run() serves a list of requests through it."""

    def __init__(self, gguf: Path, slots: int, ctx_per_slot: int, threads: int, n_batch: int = 2048) -> None:
        import llama_cpp as lc

        self.lc = lc
        lc.llama_backend_init()
        _silence(lc)
        mp = lc.llama_model_default_params()
        # ggml's AMX/extra buffer repacking crashes on some VMs; off keeps every run comparable.
        mp.use_extra_bufts = False
        self.model = lc.llama_model_load_from_file(str(gguf).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        cp = lc.llama_context_default_params()
        cp.n_ctx = slots * ctx_per_slot
        cp.n_batch = cp.n_ubatch = n_batch
        cp.n_seq_max = slots
        cp.kv_unified = True
        cp.n_threads = cp.n_threads_batch = threads
        self.ctx = lc.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.slots = slots
        self.n_batch = n_batch
        self.batch = lc.llama_batch_init(n_batch, 0, 1)
        self.settings = {"slots": slots, "n_ctx": cp.n_ctx, "n_batch": n_batch, "kv_unified": True,
                         "use_extra_bufts": False, "threads": threads}

    def close(self) -> None:
        self.lc.llama_batch_free(self.batch)
        self.lc.llama_free(self.ctx)
        self.lc.llama_model_free(self.model)

    def run(self, items: list[Item], concurrency: int) -> tuple[float, list[tuple[float, float]]]:
        """Serve `items` with at most `concurrency` in flight: (wall seconds, [(TTFT, TPOT)] each)."""
        assert concurrency <= self.slots
        lc, mem = self.lc, self.lc.llama_get_memory(self.ctx)
        lc.llama_memory_clear(mem, True)
        waiting = deque(items)
        slots = [_Slot(s) for s in range(concurrency)]
        finished: list[tuple[float, float]] = []
        start = time.perf_counter()
        while waiting or any(s.item for s in slots):
            for s in slots:
                if s.item is None and waiting:
                    s.item, s.fed, s.made, s.first, s.t0 = waiting.popleft(), 0, 0, None, time.perf_counter()
            outputs = self._fill(slots)
            if lc.llama_decode(self.ctx, self.batch) != 0:
                raise RuntimeError("llama_decode failed (KV cache full?)")
            now = time.perf_counter()
            for row, s in outputs:
                logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(self.ctx, row), shape=(self.vocab,))
                s.last = int(logits.argmax())
                s.made += 1
                if s.first is None:
                    s.first = now
                if s.made == s.item.max_tokens:
                    finished.append((s.first - s.t0, (now - s.first) / max(1, s.made - 1)))
                    lc.llama_memory_seq_rm(mem, s.seq, -1, -1)
                    s.item = None
        return time.perf_counter() - start, finished

    def _fill(self, slots: list[_Slot]) -> list[tuple[int, _Slot]]:
        """This decode's batch: each decoding slot's token first, then prompt chunks while room is
        left. Returns the rows whose logits are read, with their slot."""
        b, n, outputs = self.batch, 0, []
        for s in slots:
            if s.item is not None and s.fed == len(s.item.prompt_ids):
                self._put(n, s.last, s.fed + s.made - 1, s.seq, True)
                outputs.append((n, s))
                n += 1
        for s in slots:
            if s.item is None or s.fed == len(s.item.prompt_ids) or n == self.n_batch:
                continue
            prompt = s.item.prompt_ids
            take = min(len(prompt) - s.fed, self.n_batch - n)
            for k in range(take):
                last = s.fed + k == len(prompt) - 1
                self._put(n, prompt[s.fed + k], s.fed + k, s.seq, last)
                if last:
                    outputs.append((n, s))
                n += 1
            s.fed += take
        b.n_tokens = n
        return outputs

    def _put(self, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        b = self.batch
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq
        b.logits[i] = logits





def bench_llamacpp_batched(gguf: Path, workloads: dict[int, list[Item]], label: str,
                           threads: int) -> tuple[list[dict], dict]:
    """Each level's row through one batched context with as many slots as the highest level;
    and the context's settings, for the results file."""
    items = [i for level in workloads.values() for i in level]
    runner = LlamaCppBatched(gguf, max(workloads), max(len(i.prompt_ids) + i.max_tokens for i in items), threads)
    rows = []
    try:
        runner.run(items[:1], 1)   # warm-up
        for conc, level in workloads.items():
            wall, done = runner.run(level, conc)
            rows.append(throughput_row(f"llama.cpp ({label})", conc, level, wall, [d[0] for d in done],
                                       [d[1] for d in done]))
            print_table(rows[-1:])
    finally:
        runner.close()
    return rows, runner.settings
