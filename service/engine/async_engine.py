"""AsyncEngine: the step loop on its own thread, requests and deltas on the asyncio side.

The engine thread alone touches EngineCore; callers talk to it through a command queue, and
deltas come back with one `call_soon_threadsafe` per step, so the event loop never waits on a
forward pass and the model never waits on the network.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import torch

from common.errors import InvalidArgumentError, ResourceExhaustedError, WeftError
from decoding.guided import CompiledGrammar
from decoding.sampling import SamplingParams
from service.engine.core import EngineCore
from service.engine.lora_manager import AdapterInfo
from service.engine.openmp import release_thread_pool
from service.engine.request import RequestOutput
from service.engine.stats import EngineStats

log = logging.getLogger("weft.engine")


@dataclass(slots=True)
class _Add:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    cache_salt: str | None = None
    grammar: CompiledGrammar | None = None   # params.guided, compiled before the add is queued
    lora: str | None = None                  # the adapter it runs with


@dataclass(slots=True)
class _AddEmbedding:
    request_id: str
    prompts: list[list[int]]
    pooling: str


@dataclass(slots=True)
class _Abort:
    request_id: str


class _Stop:
    pass


@dataclass(slots=True)
class _Ping:
    """Resolved once the engine has no unfinished request (tests and drains wait on it)."""
    future: asyncio.Future


@dataclass(slots=True)
class _Call:
    """Run fn(core) on the engine thread (the only thread that may touch the core) and resolve
    the future with its result; for admin calls such as resetting the prefix cache."""
    fn: Callable[[EngineCore], Any]
    future: asyncio.Future


class AsyncEngine:
    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self._commands: queue.SimpleQueue[_Add | _AddEmbedding | _Abort | _Ping | _Call | _Stop] = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue[list[RequestOutput] | BaseException]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()
        self._pending_adds = 0   # adds sent but not yet in a published snapshot (queue-limit accounting)
        self._stats = core.stats()   # replaced after every pass of the engine thread's loop
        self.steps = 0

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            # The model may have been loaded on this thread: its OpenMP workers would otherwise
            # stay beside the engine thread's and slow every step (see service/engine/openmp.py).
            release_thread_pool()
            self._thread = threading.Thread(target=self._run, name="weft-engine", daemon=True)
            self._thread.start()

    async def shutdown(self) -> None:
        if self._thread is not None:
            self._commands.put(_Stop())
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    # ---- requests ----------------------------------------------------------------------------

    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
        cache_salt: str | None = None, lora: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream deltas for a request. Raises InvalidArgumentError / ResourceExhaustedError before
        the first delta. Leaving the iteration early (cancel, disconnect) aborts the request."""
        self.start()
        rid = request_id or f"req-{next(self._ids)}"
        if rid in self._streams:
            raise InvalidArgumentError("request_id", f"{rid!r} is already in flight")
        ids = self.core.validate(prompt, params)
        self._check_queue()
        grammar = None
        if params.guided is not None:
            # On the compiler's threads: the engine keeps stepping while this request waits.
            grammar = await self.core.guide_compiler.compile(params.guided)
            if rid in self._streams:   # the id was taken while we waited
                raise InvalidArgumentError("request_id", f"{rid!r} is already in flight")
            self._check_queue()
        stream: asyncio.Queue[list[RequestOutput] | BaseException] = asyncio.Queue()
        self._streams[rid] = stream
        self._pending_adds += 1
        self._commands.put(_Add(rid, ids, params, cache_salt, grammar, lora))
        remaining = params.n
        try:
            while remaining:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                for out in item:
                    if out.finished:
                        remaining -= 1
                    yield out
        finally:
            self._streams.pop(rid, None)
            if remaining:
                self._commands.put(_Abort(rid))

    async def embed(self, prompts: list[list[int]], pooling: str, request_id: str | None = None) -> torch.Tensor:
        """Pooled final hidden states [len(prompts), hidden] (float32, CPU) of token lists, computed
        as prefill-only requests scheduled beside generation; their KV blocks are freed as each
        finishes. Raises InvalidArgumentError / ResourceExhaustedError; cancelling aborts them."""
        self.start()
        rid = request_id or f"emb-{next(self._ids)}"
        if rid in self._streams:
            raise InvalidArgumentError("request_id", f"{rid!r} is already in flight")
        self._check_queue()
        stream: asyncio.Queue[list[RequestOutput] | BaseException] = asyncio.Queue()
        self._streams[rid] = stream
        self._pending_adds += 1
        self._commands.put(_AddEmbedding(rid, prompts, pooling))
        vectors: list[torch.Tensor | None] = [None] * len(prompts)
        remaining = len(prompts)
        try:
            while remaining:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                for out in item:
                    if out.finished:
                        if out.embedding is None:
                            raise RuntimeError(out.error or f"embedding request ended: {out.finish_reason}")
                        vectors[out.index] = out.embedding
                        remaining -= 1
        finally:
            self._streams.pop(rid, None)
            if remaining:
                self._commands.put(_Abort(rid))
        return torch.stack(vectors)  # type: ignore[arg-type]

    def _check_queue(self) -> None:
        # The snapshot and the pending count move together (`_publish`): every add is in one of them.
        if self._stats.num_waiting + self._pending_adds >= self.core.config.max_queue_len:
            raise ResourceExhaustedError(
                f"waiting queue is full ({self.core.config.max_queue_len} requests); retry later"
            )

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    async def call(self, fn: Callable[[EngineCore], Any]) -> Any:
        """Run fn(core) between two engine steps and return its result."""
        self.start()
        future = asyncio.get_running_loop().create_future()
        self._commands.put(_Call(fn, future))
        return await future

    async def reset_prefix_cache(self) -> EngineStats:
        """Forget every cached prefix block; returns the counters as they stood just after."""
        def reset(core: EngineCore) -> EngineStats:
            core.reset_prefix_cache()
            return core.stats()
        return await self.call(reset)

    async def load_adapter(self, name: str, path: str) -> AdapterInfo:
        """Read an adapter on a worker thread (the engine keeps stepping), then serve it."""
        weights, seconds = await asyncio.to_thread(self.core.read_adapter, name, path)
        return await self.call(lambda core: core.add_adapter(weights, seconds))

    async def unload_adapter(self, name: str) -> bool:
        return await self.call(lambda core: core.remove_adapter(name))

    async def adapters(self) -> list[AdapterInfo]:
        return await self.call(lambda core: core.lora.infos() if core.lora is not None else [])

    def stats(self) -> EngineStats:
        """The engine's counters as of its last loop pass (a snapshot the engine thread took:
        safe to read from any thread, never blocks the engine)."""
        return self._stats

    async def wait_idle(self) -> None:
        """Return once every queued command is applied and no request is left unfinished."""
        self.start()
        future = asyncio.get_running_loop().create_future()
        self._commands.put(_Ping(future))
        await future

    # ---- engine thread -----------------------------------------------------------------------

    def _run(self) -> None:
        """The engine thread. Nothing a command or a step raises may end it: a failure fails
        that command's caller (or, for a step, the requests in it) and the loop goes on."""
        core = self.core
        pings: list[_Ping] = []
        while True:
            # Idle: block until a command arrives instead of spinning.
            commands = [self._commands.get()] if not core.has_unfinished() else []
            while True:
                try:
                    commands.append(self._commands.get_nowait())
                except queue.Empty:
                    break
            outputs: list[RequestOutput] = []
            errors: list[tuple[str, BaseException]] = []
            added = 0
            for cmd in commands:
                if isinstance(cmd, _Stop):
                    return
                if isinstance(cmd, _Ping):
                    pings.append(cmd)
                    continue
                added += isinstance(cmd, (_Add, _AddEmbedding))
                self._apply(cmd, outputs, errors)
            try:
                outputs.extend(core.step())
                self.steps += 1
            except Exception as exc:  # keep the loop alive; fail what was running
                log.exception("engine step failed")
                errors += self._fail_all(f"engine step failed: {exc}")
            self._loop.call_soon_threadsafe(self._publish, self._snapshot(), added, outputs, errors)
            if pings and not core.has_unfinished():
                for ping in pings:
                    self._loop.call_soon_threadsafe(_resolve, ping.future)
                pings = []

    def _apply(self, cmd: _Add | _AddEmbedding | _Abort | _Call, outputs: list[RequestOutput],
               errors: list[tuple[str, BaseException]]) -> None:
        """One command on the engine thread; whatever it raises goes to its caller alone."""
        core = self.core
        if isinstance(cmd, _Call):
            try:
                result = cmd.fn(core)
            except Exception as exc:
                log.exception("engine call failed")
                self._loop.call_soon_threadsafe(_fail_future, cmd.future, exc)
            else:
                self._loop.call_soon_threadsafe(_resolve, cmd.future, result)
        elif isinstance(cmd, (_Add, _AddEmbedding)):
            try:
                if isinstance(cmd, _AddEmbedding):
                    core.add_embedding(cmd.request_id, cmd.prompts, cmd.pooling)
                else:
                    core.add_request(cmd.request_id, cmd.prompt_ids, cmd.params, cmd.cache_salt, cmd.grammar,
                                     cmd.lora)
            except WeftError as exc:
                errors.append((cmd.request_id, exc))
            except Exception as exc:
                log.exception("adding request %s failed", cmd.request_id)
                core.abort(cmd.request_id)   # whatever part of it got in
                errors.append((cmd.request_id, RuntimeError(f"adding the request failed: {exc}")))
        else:
            try:
                outputs.extend(core.abort(cmd.request_id))
            except Exception:
                # The caller has gone (abort follows a cancel or a disconnect): nobody to tell.
                log.exception("aborting request %s failed", cmd.request_id)

    def _fail_all(self, message: str) -> list[tuple[str, BaseException]]:
        """Abort every request the core holds, each with `message` for its stream."""
        errors: list[tuple[str, BaseException]] = []
        for rid in list(self.core.requests):
            try:
                self.core.abort(rid)
            except Exception:
                log.exception("aborting request %s failed", rid)
                self.core.requests.pop(rid, None)
            errors.append((rid, RuntimeError(message)))
        return errors

    def _snapshot(self) -> EngineStats | None:
        try:
            return self.core.stats()
        except Exception:   # counters are not worth a dead engine thread
            log.exception("engine stats failed")
            return None

    def _publish(self, stats: EngineStats | None, added: int, outputs: list[RequestOutput],
                 errors: list[tuple[str, BaseException]]) -> None:
        """On the event loop: one engine pass's snapshot, then its deltas and errors."""
        if stats is not None:
            self._stats = stats
        self._pending_adds -= added
        if outputs or errors:
            self._deliver(outputs, errors)

    def _deliver(self, outputs: list[RequestOutput], errors: list[tuple[str, BaseException]]) -> None:
        by_id: dict[str, list[RequestOutput]] = {}
        for out in outputs:
            by_id.setdefault(out.request_id, []).append(out)
        for rid, outs in by_id.items():
            stream = self._streams.get(rid)
            if stream is not None:
                stream.put_nowait(outs)
        for rid, exc in errors:
            stream = self._streams.get(rid)
            if stream is not None:
                stream.put_nowait(exc)


def _resolve(future: asyncio.Future, value: Any = None) -> None:
    if not future.done():
        future.set_result(value)


def _fail_future(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
