"""Prometheus metrics of a Weft server, served on the HTTP port's `/metrics`.

Two kinds of numbers:
- Per request, recorded as it runs (the gRPC servicer calls `WeftMetrics.request_started` for each
  Generate/GenerateStream call and feeds the returned `RequestTrace` every engine delta): time to
  first token, time per output token, end-to-end latency, tokens in and out, how each completion
  ended (finish reason) and how each call ended (outcome).
- Engine state, read when Prometheus scrapes (a collector over the bound engine): running and
  waiting requests, KV-cache usage, prefix-cache queries and hits, preemptions, speculative
  decoding counters and guided-decoding compile times.

Embed calls are counted apart from generation (`weft_embedding_*`: calls by outcome, inputs, tokens
and latency), so that a burst of embeddings never shows up as prompt tokens or TTFT.

One registry per `WeftMetrics` (not the process-global one), so tests can run several servers in
one process. The HTTP shim adds its own request counter (`weft_http_requests_total`).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from service.engine.stats import EngineStats

if TYPE_CHECKING:
    from service.engine.async_engine import AsyncEngine
    from service.engine.request import RequestOutput

# Buckets: CPU steps are tens of ms, GPU steps a few ms; queues can add seconds.
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0, 160.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
               960.0, 1920.0)
EMBED_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
COMPILE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# Finish reasons as the engine names them (RequestOutput.finish_reason).
FINISH_REASONS = ("length", "stop", "eos", "cancelled", "error")


class WeftMetrics:
    """The metrics of one server. `bind(get_engine)` makes the engine's state scrapeable."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # First: a scrape collects in registration order, and this collector moves new guided
        # compile times into `guided_compile` before that histogram is read.
        self._engine_collector = _EngineCollector(self)
        r.register(self._engine_collector)
        self.ttft = Histogram("weft_time_to_first_token_seconds", "Time from a call's arrival to its first token.",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("weft_time_per_output_token_seconds",
                              "Mean time between output tokens of one completion (after its first).",
                              buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("weft_e2e_request_latency_seconds",
                             "Time from a call's arrival to its last token (successful calls).",
                             buckets=E2E_BUCKETS, registry=r)
        self.prompt_tokens = Counter("weft_prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter("weft_generation_tokens", "Tokens generated.", registry=r)
        self.finished = Counter("weft_request_finished", "Completions ended, by finish reason "
                                "(length, stop, eos, cancelled, error).", ["finish_reason"], registry=r)
        self.outcomes = Counter("weft_requests", "Generate/GenerateStream calls ended, by outcome (ok, cancelled, "
                                "deadline_exceeded, invalid_argument, resource_exhausted, unavailable, ...).",
                                ["outcome"], registry=r)
        self.http_requests = Counter("weft_http_requests", "HTTP requests answered by the REST shim, by route "
                                     "and status code.", ["route", "status"], registry=r)
        for reason in FINISH_REASONS:
            self.finished.labels(reason)   # present at 0 from the start
        self.embedding_requests = Counter("weft_embedding_requests", "Embed calls ended, by outcome (ok, "
                                          "invalid_argument, not_found, cancelled, ...).", ["outcome"], registry=r)
        self.embedding_requests.labels("ok")
        self.embedding_inputs = Counter("weft_embedding_inputs", "Inputs embedded (successful Embed calls).",
                                        registry=r)
        self.embedding_tokens = Counter("weft_embedding_tokens", "Tokens embedded (successful Embed calls); not "
                                        "in weft_prompt_tokens.", registry=r)
        self.embedding_latency = Histogram("weft_embedding_request_latency_seconds", "Time from an Embed call's "
                                           "arrival to its answer (successful calls).", buckets=EMBED_BUCKETS,
                                           registry=r)
        self.guided_compile = Histogram("weft_guided_compile_seconds", "Time to compile one guided-decoding spec "
                                        "(cache misses only).", buckets=COMPILE_BUCKETS, registry=r)

    def bind(self, get_engine: Callable[[], AsyncEngine | None]) -> None:
        """Scrapes read the state of `get_engine()` (None while the model loads)."""
        self._engine_collector.get_engine = get_engine

    # ---- the server hook --------------------------------------------------------------------

    def request_started(self, request_id: str) -> RequestTrace:
        return RequestTrace(self)

    def embedding_ended(self, outcome: str, inputs: int, tokens: int, seconds: float) -> None:
        """One Embed call has ended (the server calls it on its event loop)."""
        self.embedding_requests.labels(outcome).inc()
        if outcome == "ok":
            self.embedding_inputs.inc(inputs)
            self.embedding_tokens.inc(tokens)
            self.embedding_latency.observe(seconds)


class RequestTrace:
    """One Generate/GenerateStream call, from arrival to end. Fed on the server's event loop."""

    __slots__ = ("_m", "_t0", "_first", "_seq_first", "_seq_tokens", "_prompt_counted")

    def __init__(self, metrics: WeftMetrics) -> None:
        self._m = metrics
        self._t0 = time.perf_counter()
        self._first: float | None = None
        self._seq_first: dict[int, float] = {}     # completion index -> time of its first token
        self._seq_tokens: dict[int, int] = {}
        self._prompt_counted = False

    def output(self, out: RequestOutput) -> None:
        """One engine delta of one of the request's completions."""
        now = time.perf_counter()
        n = len(out.token_ids)
        if n:
            if self._first is None:
                self._first = now
                self._m.ttft.observe(now - self._t0)
            self._seq_first.setdefault(out.index, now)
            self._seq_tokens[out.index] = self._seq_tokens.get(out.index, 0) + n
            self._m.generation_tokens.inc(n)
        if out.finished:
            reason = out.finish_reason or "error"
            self._m.finished.labels(reason).inc()
            first = self._seq_first.get(out.index)
            tokens = self._seq_tokens.get(out.index, 0)
            if first is not None and tokens > 1:
                self._m.tpot.observe((now - first) / (tokens - 1))
            if not self._prompt_counted:
                self._prompt_counted = True
                self._m.prompt_tokens.inc(out.num_prompt_tokens)

    def ended(self, outcome: str) -> None:
        self._m.outcomes.labels(outcome).inc()
        if outcome == "ok" and self._first is not None:
            self._m.e2e.observe(time.perf_counter() - self._t0)


class _EngineCollector(Collector):
    """Engine state at scrape time, from the snapshot the engine thread publishes after each
    pass (`AsyncEngine.stats()`); nothing here touches the engine's own structures or blocks it."""

    def __init__(self, metrics: WeftMetrics) -> None:
        self.metrics = metrics
        self.get_engine: Callable[[], AsyncEngine | None] = lambda: None
        self._compiles_seen = 0

    def describe(self) -> Iterator[Metric]:
        return iter(())   # unchecked collector: the families depend on the engine

    def collect(self) -> Iterator[Metric]:
        engine = self.get_engine()
        stats = engine.stats() if engine is not None else EngineStats()
        if engine is not None:
            self._observe_compiles(engine.core.guide_compiler)
        running, waiting, usage = stats.num_running, stats.num_waiting, stats.kv_usage
        queries, hits, preemptions = stats.prefix_queried_tokens, stats.prefix_hit_tokens, stats.num_preemptions
        agg = stats.spec
        drafts, draft_tokens, accepted = agg.num_drafts, agg.num_draft_tokens, agg.num_accepted_tokens
        per_position, mean_len, disabled = agg.accepted_per_position, agg.mean_acceptance_length, stats.spec_num_disabled
        yield GaugeMetricFamily("weft_num_requests_running", "Sequences in the running batch.", value=running)
        yield GaugeMetricFamily("weft_num_requests_waiting", "Sequences waiting to be scheduled.", value=waiting)
        yield GaugeMetricFamily("weft_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use (0-1).", value=usage)
        yield CounterMetricFamily("weft_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                  value=queries)
        yield CounterMetricFamily("weft_prefix_cache_hits", "Prompt tokens found in the prefix cache.", value=hits)
        yield CounterMetricFamily("weft_num_preemptions", "Sequences preempted (recomputed later) for KV space.",
                                  value=preemptions)
        yield CounterMetricFamily("weft_spec_decode_num_drafts", "Speculative verifications with >= 1 draft token.",
                                  value=drafts)
        yield CounterMetricFamily("weft_spec_decode_num_draft_tokens", "Draft tokens proposed.", value=draft_tokens)
        yield CounterMetricFamily("weft_spec_decode_num_accepted_tokens", "Draft tokens accepted.", value=accepted)
        pos = CounterMetricFamily("weft_spec_decode_num_accepted_tokens_per_pos",
                                  "Draft tokens accepted at each draft position (0 = first).", labels=["position"])
        for j, v in enumerate(per_position):
            pos.add_metric([str(j)], v)
        yield pos
        yield GaugeMetricFamily("weft_spec_decode_mean_acceptance_length",
                                "1 + accepted / drafts since start-up: tokens per verification step.", value=mean_len)
        yield CounterMetricFamily("weft_spec_decode_num_disabled_requests",
                                  "Requests whose speculation switched itself off for poor acceptance.", value=disabled)
        memory = GaugeMetricFamily("weft_spec_decode_proposer_memory",
                                   "What the speculative proposer holds (suffix decoding: shared tokens, tree nodes).",
                                   labels=["kind"])
        for kind, value in sorted(stats.spec_memory.items()):
            memory.add_metric([kind], value)
        yield memory
        yield GaugeMetricFamily("weft_lora_adapters_loaded", "LoRA adapters served.", value=stats.lora_loaded)
        yield GaugeMetricFamily("weft_lora_adapters_resident", "LoRA adapters in the batch's stacks (<= --max-loras).",
                                value=stats.lora_resident)

    def _observe_compiles(self, compiler: Any) -> None:
        """Move compile times the guide compiler recorded since the last scrape into the histogram."""
        if compiler is None:
            return
        # GuideCompiler.compile_times_since: the count and the times, read under its own lock.
        total, times = compiler.compile_times_since(self._compiles_seen)
        if total <= self._compiles_seen:
            return
        self._compiles_seen = total
        for t in times:
            self.metrics.guided_compile.observe(t)
