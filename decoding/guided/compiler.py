"""GuideCompiler: compiles GuidedSpecs off the engine thread, with a cache and limits.

- Compilation runs on a small thread pool, so a request waiting for its grammar never holds up
  the batch. llguidance and outlines-core's index build release the GIL; the interegular DFA
  bound that precedes an outlines-core index is Python and shares it with the engine thread.
- Results are kept in an LRU cache keyed by the spec and the tokenizer's fingerprint; failures are
  cached too, so a bad schema sent in a loop is refused from the cache. Two requests for the same
  spec while it compiles share one compilation.
- A compilation that takes longer than `timeout_s` fails the request with INVALID_ARGUMENT (it is
  left to finish in the background and its result cached). Sizes are bounded before compiling
  (spec.py) and during it (llguidance's parser limits, the DFA bound for outlines-core).
- Every grammar handed out is a `budget.BudgetGrammar`: the backend's grammar plus the
  tokenizer's budget tables (built once per compiler) and the schema's string hints, so that
  `new_guide(params)` closes the output before max_tokens. Backends know nothing of budgets.

The normaliser (normalize/): a JSON Schema a backend refuses is rewritten into an equivalent one
it may enforce (`not`, `oneOf`, `if`/`then`/`else`, dependencies, unknown formats ...) and that
is compiled instead; a schema the backend takes as sent is compiled as sent.

Backend choice ("auto"): llguidance first for every kind, outlines-core as the fallback for the
kinds it handles when llguidance refuses a spec. Measured on jsonschemabench-dev (300 real
schemas, SmolLM2's 49k vocabulary; `python -m bench guided`, docs/guided.md): llguidance compiles
234 schemas (outlines-core, restricted to what it enforces faithfully: 111; auto: 235), in 1 ms
at the median and 26 ms at p99 (outlines-core: 97 ms and 7.5 s), accepts every valid instance
and no invalid one; masks cost ~5 µs (outlines-core ~3.5 µs, a table look-up).
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures as cf
import dataclasses
import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

from decoding.guided.base import CompiledGrammar
from decoding.guided.budget import BudgetGrammar, BudgetTables
from decoding.guided.hints import string_hints
from decoding.guided.duplicate_keys import refuse_counted_duplicates
from decoding.guided.normalize import normalize_schema
from decoding.guided.spec import GuidedSpec, schema_json
from common.errors import InvalidArgumentError

log = logging.getLogger("weft.guided")

# Order in which "auto" tries the backends, per kind (see the module docstring for why).
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "json_schema": ("llguidance", "outlines-core"),
    "json_object": ("llguidance", "outlines-core"),
    "regex": ("llguidance", "outlines-core"),
    "choice": ("llguidance", "outlines-core"),
    "grammar": ("llguidance",),
}


class GuideCompiler:
    def __init__(self, tokenizer: Any, vocab_size: int, max_workers: int = 2, timeout_s: float = 10.0,
                 cache_size: int = 256) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = int(vocab_size)
        self.timeout_s = timeout_s
        self.cache_size = cache_size
        self._pool = cf.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="weft-guided")
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict[tuple, CompiledGrammar | InvalidArgumentError] = collections.OrderedDict()
        self._inflight: dict[tuple, cf.Future] = {}
        self._backend_lock = threading.Lock()
        self._info = None
        self._tables_lock = threading.Lock()
        self._budget_tables: BudgetTables | None = None
        # The cache is this compiler's, i.e. one tokenizer's; the key still names the tokenizer.
        self._tokenizer_key = (type(getattr(tokenizer, "hf", tokenizer)).__name__, int(tokenizer.vocab_size),
                               tuple(tokenizer.eos_token_ids), self.vocab_size)
        self._backends: dict[str, Any] = {}
        # Counters for metrics and the bench.
        self.num_compiled = 0
        self.num_failed = 0
        self.num_cache_hits = 0
        self.compile_times_s: collections.deque[float] = collections.deque(maxlen=1024)

    # ---- public ---------------------------------------------------------------------------

    def compile_sync(self, spec: GuidedSpec) -> CompiledGrammar:
        """Compile (or fetch from the cache) in the caller's thread of control; blocks up to timeout_s."""
        key, hit = self._lookup(spec)
        if hit is not None:
            return _unwrap(hit)
        fut = self._submit(spec, key)
        try:
            return fut.result(timeout=self.timeout_s)
        except cf.TimeoutError:
            raise self._timeout_error(spec) from None

    async def compile(self, spec: GuidedSpec) -> CompiledGrammar:
        """Compile on the pool without blocking the event loop."""
        key, hit = self._lookup(spec)
        if hit is not None:
            return _unwrap(hit)
        fut = asyncio.wrap_future(self._submit(spec, key))
        try:
            # shield: a caller that gives up must not cancel a compilation others may share
            return await asyncio.wait_for(asyncio.shield(fut), self.timeout_s)
        except asyncio.TimeoutError:
            raise self._timeout_error(spec) from None

    def compile_uncached(self, spec: GuidedSpec, backend: str | None = None, normalize: bool = True) -> CompiledGrammar:
        """Compile now in this thread, bypassing cache and pool (benchmarks, tests). `backend`: that
        one alone instead of the spec's choice; `normalize=False`: the schema as it came, without
        the normaliser's rewrites (what the backend alone compiles)."""
        spec.validate()
        return self._build(spec, (backend,) if backend is not None else None, normalize)

    def backend(self, name: str) -> Any:
        """The backend object (built on first use: the tokenizer tables take ~0.3-1 s)."""
        with self._backend_lock:
            if self._info is None:
                from decoding.guided._llguidance import TokenizerInfo

                self._info = TokenizerInfo(self.tokenizer, self.vocab_size)
            b = self._backends.get(name)
            if b is None:
                if name == "llguidance":
                    from decoding.guided._llguidance import LLGuidanceBackend

                    b = LLGuidanceBackend(self._info)
                elif name == "outlines-core":
                    from decoding.guided._outlines import OutlinesBackend

                    b = OutlinesBackend(self._info)
                else:
                    raise InvalidArgumentError("guided.backend", f"unknown backend {name!r}")
                self._backends[name] = b
            return b

    @property
    def bitmask_words(self) -> int:
        """int32 words per bitmask row (covers the model's vocabulary)."""
        return (max(self.vocab_size, int(self.tokenizer.vocab_size)) + 31) // 32

    def compile_times_since(self, seen: int) -> tuple[int, list[float]]:
        """(compilations so far, the times in seconds of those after the first `seen`), read
        together under the compiler's lock. Only the last 1024 times are kept, so fewer come back
        when a reader falls further behind. The reader keeps its own count: several readers do
        not take each other's times."""
        with self._lock:
            total = self.num_compiled
            new = total - seen
            times = list(self.compile_times_s)[-new:] if new > 0 else []
        return total, times

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- internals --------------------------------------------------------------------------

    def _lookup(self, spec: GuidedSpec) -> tuple[tuple, Any]:
        spec.validate()
        key = (self._tokenizer_key, spec.cache_key())
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.num_cache_hits += 1
        return key, hit

    def _submit(self, spec: GuidedSpec, key: tuple) -> cf.Future:
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                done: cf.Future = cf.Future()
                if isinstance(hit, InvalidArgumentError):
                    done.set_exception(hit)
                else:
                    done.set_result(hit)
                return done
            fut = self._inflight.get(key)
            if fut is not None:
                return fut
            fut = self._pool.submit(self._build, spec)
            self._inflight[key] = fut
        # Outside the lock: a build that already failed runs the callback at once, and the
        # callback takes the lock.
        fut.add_done_callback(lambda f, key=key: self._finished(key, f))
        return fut

    def _finished(self, key: tuple, fut: cf.Future) -> None:
        with self._lock:
            self._inflight.pop(key, None)
            if fut.cancelled():
                return
            exc = fut.exception()
            if exc is not None and not isinstance(exc, InvalidArgumentError):
                return  # an unexpected failure (not the spec's fault) is not cached
            self._cache[key] = exc if exc is not None else fut.result()
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def _tables(self) -> BudgetTables:
        """The tokenizer's tables for budget-aware guides, built on first use (~0.5 s, on a
        compiler thread). Needs the tokenizer info, so call it after `backend()`."""
        with self._tables_lock:
            if self._budget_tables is None:
                info = self._info
                assert info is not None, "backend() builds the tokenizer info first"
                self._budget_tables = BudgetTables(info.token_bytes(), info.eos_ids, info.words)
            return self._budget_tables

    def _build(self, spec: GuidedSpec, names: tuple[str, ...] | None = None, normalize: bool = True) -> CompiledGrammar:
        if names is None:
            names = AUTO_ORDER[spec.kind] if spec.backend == "auto" else (spec.backend,)
        first_error: InvalidArgumentError | None = None
        t0 = time.perf_counter()
        if spec.kind == "json_schema":
            refuse_counted_duplicates(json.loads(schema_json(spec)), spec.field)
        # Each backend gets the schema as sent, then (when it refuses that) the normaliser's
        # equivalent rewrite: a schema a backend takes as it is costs nothing more, and a refusal
        # reports the user's keyword.
        variants = _Variants(spec, normalize)
        for name in names:
            backend = self.backend(name)
            if spec.kind not in backend.kinds:
                err = InvalidArgumentError(
                    spec.field, f"backend {name} does not support kind {spec.kind!r}; llguidance does")
                first_error = first_error or err
                continue
            tables = self._tables()
            for variant in variants:
                try:
                    grammar = backend.compile(variant)
                except InvalidArgumentError as exc:
                    if variant is spec:
                        first_error = first_error or exc
                    continue
                except Exception as exc:  # a backend bug or panic: report it as this spec's failure
                    log.exception("guided compile failed in %s", name)
                    if variant is spec:
                        first_error = first_error or InvalidArgumentError(spec.field, f"{name} failed: {exc}")
                    continue
                with self._lock:
                    self.num_compiled += 1
                    self.compile_times_s.append(time.perf_counter() - t0)
                return _with_budget(grammar, variant, tables)
        with self._lock:
            self.num_failed += 1
        assert first_error is not None
        raise first_error

    def _timeout_error(self, spec: GuidedSpec) -> InvalidArgumentError:
        return InvalidArgumentError(spec.field, f"compiling took longer than the {self.timeout_s:g} s limit")


class _Variants:
    """The spec as sent, then (json_schema kind, when it differs) the spec with its schema
    normalised: computed once, on first need."""

    def __init__(self, spec: GuidedSpec, normalize: bool) -> None:
        self.spec = spec
        self.normalize = normalize and spec.kind == "json_schema"
        self._normalized: GuidedSpec | None = None
        self._done = False

    def __iter__(self) -> Iterator[GuidedSpec]:
        yield self.spec
        if self.normalize:
            normalized = self._get()
            if normalized is not None:
                yield normalized

    def _get(self) -> GuidedSpec | None:
        if not self._done:
            self._done = True
            schema = json.loads(schema_json(self.spec))
            try:
                normalized = normalize_schema(schema)
            except Exception:  # a rewrite's bug must not cost the request: the schema as sent stands
                log.exception("guided: normalising a schema failed")
                normalized = schema
            if normalized is not schema:
                self._normalized = dataclasses.replace(self.spec, value=normalized)
        return self._normalized


def _with_budget(grammar: CompiledGrammar, spec: GuidedSpec, tables: BudgetTables) -> BudgetGrammar:
    """Wrap a backend's grammar so that its guides know the request's budget; a JSON Schema
    grammar also gets its patterns' shortest matches, for the closing planner."""
    hints: tuple[tuple[int, ...], ...] = ()
    if spec.kind == "json_schema":
        hints = string_hints(json.loads(schema_json(spec)), tables.encode)
    return BudgetGrammar(grammar, tables, hints)


def _unwrap(hit: CompiledGrammar | InvalidArgumentError) -> CompiledGrammar:
    if isinstance(hit, InvalidArgumentError):
        raise InvalidArgumentError(hit.field, hit.message)
    return hit
