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

from decoding.guided import CompiledGrammar
from decoding.sampling import SamplingParams
from service.config import EngineConfig
from service.engine.core import EngineCore
from service.engine.openmp import release_thread_pool
from service.engine.request import RequestOutput
from common.errors import ResourceExhaustedError, WeftError

log = logging.getLogger("weft.engine")


@dataclass(slots=True)
class _Add:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    cache_salt: str | None = None
    grammar: CompiledGrammar | None = None   # params.guided, compiled before the add is queued


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
        self._commands: queue.SimpleQueue[_Add | _Abort | _Ping | _Call | _Stop] = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue[list[RequestOutput] | BaseException]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()
        self._pending_adds = 0   # adds sent but not yet seen by the engine thread (queue-limit accounting)
        self.steps = 0

    @classmethod
    def from_config(cls, config: EngineConfig) -> "AsyncEngine":
        return cls(EngineCore(config))

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

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    # ---- requests ----------------------------------------------------------------------------

    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
        cache_salt: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream deltas for a request. Raises InvalidArgumentError / ResourceExhaustedError before
        the first delta. Leaving the iteration early (cancel, disconnect) aborts the request."""
        self.start()
        rid = request_id or f"req-{next(self._ids)}"
        if rid in self._streams:
            from common.errors import InvalidArgumentError

            raise InvalidArgumentError("request_id", f"{rid!r} is already in flight")
        ids = self.core.validate(prompt, params)
        self._check_queue()
        grammar = None
        if params.guided is not None:
            # On the compiler's threads: the engine keeps stepping while this request waits.
            grammar = await self.core.guide_compiler.compile(params.guided)
            if rid in self._streams:   # the id was taken while we waited
                from common.errors import InvalidArgumentError

                raise InvalidArgumentError("request_id", f"{rid!r} is already in flight")
            self._check_queue()
        stream: asyncio.Queue[list[RequestOutput] | BaseException] = asyncio.Queue()
        self._streams[rid] = stream
        self._pending_adds += 1
        self._commands.put(_Add(rid, ids, params, cache_salt, grammar))
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

    def _check_queue(self) -> None:
        if self.core.num_waiting + self._pending_adds >= self.core.config.max_queue_len:
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

    async def reset_prefix_cache(self) -> None:
        await self.call(EngineCore.reset_prefix_cache)

    async def wait_idle(self) -> None:
        """Return once every queued command is applied and no request is left unfinished."""
        self.start()
        future = asyncio.get_running_loop().create_future()
        self._commands.put(_Ping(future))
        await future

    # ---- engine thread -----------------------------------------------------------------------

    def _run(self) -> None:
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
            for cmd in commands:
                if isinstance(cmd, _Stop):
                    return
                if isinstance(cmd, _Ping):
                    pings.append(cmd)
                    continue
                if isinstance(cmd, _Call):
                    self._loop.call_soon_threadsafe(_resolve, cmd.future, cmd.fn(core))
                    continue
                if isinstance(cmd, _Add):
                    self._loop.call_soon_threadsafe(self._added)
                    try:
                        core.add_request(cmd.request_id, cmd.prompt_ids, cmd.params, cmd.cache_salt, cmd.grammar)
                    except WeftError as exc:
                        errors.append((cmd.request_id, exc))
                else:
                    outputs.extend(core.abort(cmd.request_id))
            try:
                outputs.extend(core.step())
                self.steps += 1
            except Exception as exc:  # keep the loop alive; fail what was running
                log.exception("engine step failed")
                for rid in list(core.requests):
                    core.abort(rid)
                    errors.append((rid, RuntimeError(f"engine step failed: {exc}")))
            if outputs or errors:
                self._loop.call_soon_threadsafe(self._deliver, outputs, errors)
            if pings and not core.has_unfinished():
                for ping in pings:
                    self._loop.call_soon_threadsafe(_resolve, ping.future)
                pings = []

    def _added(self) -> None:
        self._pending_adds -= 1

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
