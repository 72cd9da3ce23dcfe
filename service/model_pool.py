"""Which models a multi-model server keeps loaded (Ollama's scheduler): a model is loaded on
first use, stays while it has requests in flight, and is unloaded `keep_alive` seconds after its
last request ends (0: at once; infinity: never) or, least recently used first, when another
model needs room under the budget (`max_loaded` models, `memory_bytes` in all). A model with a
request in flight is never unloaded: a request that needs room then waits until one is idle, as
Ollama's does (its caller's deadline or cancellation ends the wait). A model larger than the
whole memory budget is refused with ModelTooLargeError.

Generic over what a loaded model is (the server's engine and servicer): the caller gives the
coroutines that load and unload one. Runs on one event loop; `clock` (seconds, monotonic) is
injectable so that tests drive keep_alive expiry without sleeping: expiry is checked on every
call into the pool as well as by a timer on the real clock.
"""
from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from common.errors import WeftError

T = TypeVar("T")
Clock = Callable[[], float]
FOREVER = math.inf
DEFAULT_KEEP_ALIVE_S = 300.0      # Ollama's default: five minutes


class ModelTooLargeError(WeftError):
    """The model alone needs more memory than the whole budget: it can never be loaded here."""

    def __init__(self, name: str, need: int, budget: int) -> None:
        super().__init__(f"model {name!r} needs {need / 1e9:.2f} GB, more than this server's memory budget of "
                         f"{budget / 1e9:.2f} GB (--memory-gb)")
        self.need, self.budget = need, budget


@dataclass(eq=False)
class Loaded(Generic[T]):
    """One model in the pool. `value` is None until `ready` is done."""
    key: Hashable
    name: str                         # the name it was loaded for (listings)
    size: int                         # bytes: the caller's estimate while loading, measured once loaded
    last_used: float
    keep_alive: float                 # seconds it stays after its last request ends
    ready: asyncio.Future[None]
    value: T | None = None
    in_flight: int = 0
    expires_at: float | None = None   # on the pool's clock; None while in flight or kept forever
    loaded_at: float = 0.0


@dataclass(eq=False)
class _Unloading:
    size: int
    task: asyncio.Task[None] | None = field(default=None)


class ModelPool(Generic[T]):
    def __init__(self, load: Callable[[Hashable, str], Awaitable[tuple[T, int]]],
                 unload: Callable[[T], Awaitable[None]], *, max_loaded: int | None = None,
                 memory_bytes: int | None = None, keep_alive: float = DEFAULT_KEEP_ALIVE_S,
                 clock: Clock = time.monotonic, released: Callable[[], None] | None = None) -> None:
        """`load(key, name)` returns the loaded model and its measured size in bytes;
        `released()` runs after an unload, once the pool holds no reference to the model (to
        free its memory at once: a garbage collection, a device cache)."""
        if max_loaded is not None and max_loaded < 1:
            raise ValueError("max_loaded must be at least 1")
        self._load, self._unload, self._released = load, unload, released
        self.max_loaded, self.memory_bytes = max_loaded, memory_bytes
        self.keep_alive, self.clock = keep_alive, clock
        self._entries: dict[Hashable, Loaded[T]] = {}
        self._unloading: list[_Unloading] = []     # still holding memory until their unload ends
        self._changed: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # ---- using a model ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def use(self, key: Hashable, name: str, estimate: int, keep_alive: float | None = None
                  ) -> AsyncIterator[T]:
        """The loaded model for `key` (loading it first if needed), counted in flight until the
        block ends. `keep_alive` applies once no request uses it (None: as it was; the pool's
        default for a model loaded now)."""
        entry = await self.acquire(key, name, estimate, keep_alive)
        try:
            assert entry.value is not None
            yield entry.value
        finally:
            self.release(entry)

    async def acquire(self, key: Hashable, name: str, estimate: int, keep_alive: float | None = None) -> Loaded[T]:
        self.sweep()
        while True:
            entry = self._entries.get(key)
            if entry is None:
                if self.memory_bytes is not None and estimate > self.memory_bytes:
                    raise ModelTooLargeError(name, estimate, self.memory_bytes)
                if not self._fits(estimate, self._bytes()):
                    # Evict only what the unloads already under way will not free.
                    victim = None if self._fits(estimate, self._bytes(loaded_only=True), unloading=False) \
                        else self._least_recently_used_idle()
                    if victim is not None:
                        self._start_unload(victim)
                    else:   # wait for an unload to end or a busy model to go idle
                        await asyncio.shield(self._change())
                    continue
                entry = self._entries[key] = Loaded(key, name, estimate, self.clock(), self.keep_alive,
                                                    asyncio.ensure_future(self._load_entry(key, name)))
            # A request arriving sets how long the model stays after it (Ollama: the last one's);
            # side calls (tokenize, describe) pass None and leave it.
            if keep_alive is not None:
                entry.keep_alive = keep_alive
            entry.in_flight += 1
            entry.expires_at = None
            entry.last_used = self.clock()
            try:
                await asyncio.shield(entry.ready)   # a cancelled waiter leaves the load running
            except BaseException:
                self.release(entry)
                raise
            return entry

    def release(self, entry: Loaded[T]) -> None:
        entry.in_flight -= 1
        entry.last_used = self.clock()
        if entry.in_flight == 0:
            self._idle(entry)
        self._notify()

    async def _load_entry(self, key: Hashable, name: str) -> None:
        try:
            value, size = await self._load(key, name)
        except BaseException:
            self._entries.pop(key, None)
            self._notify()
            raise
        entry = self._entries[key]
        entry.value, entry.size, entry.loaded_at = value, size, self.clock()
        if self.memory_bytes is not None and size > self.memory_bytes:   # the estimate was short of it
            self._start_unload(entry)
            raise ModelTooLargeError(name, size, self.memory_bytes)
        while self.memory_bytes is not None and self._bytes(loaded_only=True) > self.memory_bytes:
            victim = self._least_recently_used_idle(besides=entry)
            if victim is None:
                break   # others are busy: over budget until they go idle (they are not stopped mid-request)
            self._start_unload(victim)

    # ---- expiry and eviction ------------------------------------------------------------------

    def _idle(self, entry: Loaded[T]) -> None:
        if not entry.ready.done():
            return   # still loading for a waiter that gave up: decided once loaded
        if entry.keep_alive <= 0:
            self._start_unload(entry)
        elif entry.keep_alive == FOREVER:
            entry.expires_at = None
        else:
            entry.expires_at = self.clock() + entry.keep_alive
            self._arm_timer()

    def sweep(self) -> None:
        """Unload every idle model whose keep_alive has run out (on the pool's clock)."""
        now = self.clock()
        for entry in list(self._entries.values()):
            if entry.in_flight == 0 and entry.expires_at is not None and entry.expires_at <= now:
                self._start_unload(entry)
        self._arm_timer()

    def _arm_timer(self) -> None:
        """A real-time wake-up at the next expiry (with an injected clock, calls sweep too)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        due = [e.expires_at for e in self._entries.values() if e.expires_at is not None]
        if due:
            delay = max(0.0, min(due) - self.clock())
            self._timer = asyncio.get_running_loop().call_later(min(delay, 3600.0) + 0.01, self.sweep)

    def expire(self, key: Hashable) -> bool:
        """keep_alive 0 now: unload at once if idle, else as soon as its requests end. False when
        it is not loaded."""
        entry = self._entries.get(key)
        if entry is None:
            return False
        entry.keep_alive = 0
        if entry.in_flight == 0:
            self._idle(entry)
        return True

    def _fits(self, extra: int, used: int, unloading: bool = True) -> bool:
        """Room for one more model of `extra` bytes beside `used` bytes (and, with `unloading`,
        beside the models still being unloaded)."""
        count = len(self._entries) + (len(self._unloading) if unloading else 0)
        if self.max_loaded is not None and count >= self.max_loaded:
            return False
        return self.memory_bytes is None or used + extra <= self.memory_bytes

    def _bytes(self, loaded_only: bool = False) -> int:
        loaded = sum(e.size for e in self._entries.values())
        return loaded if loaded_only else loaded + sum(u.size for u in self._unloading)

    def _least_recently_used_idle(self, besides: Loaded[T] | None = None) -> Loaded[T] | None:
        idle = [e for e in self._entries.values()
                if e.in_flight == 0 and e is not besides and e.ready.done() and e.value is not None]
        return min(idle, key=lambda e: e.last_used, default=None)

    def _start_unload(self, entry: Loaded[T]) -> None:
        """Gone from the pool at once (new requests load it afresh); its memory counts until
        the unload has finished."""
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
        if entry.value is None:
            return
        value: T | None
        value, entry.value = entry.value, None
        pending = _Unloading(entry.size)
        self._unloading.append(pending)

        async def run() -> None:
            nonlocal value
            try:
                await self._unload(value)
            finally:
                value = None   # the pool's last reference
                if self._released is not None:
                    self._released()
                self._unloading.remove(pending)
                self._notify()

        pending.task = asyncio.ensure_future(run())
        self._tasks.add(pending.task)
        pending.task.add_done_callback(self._tasks.discard)

    def _change(self) -> asyncio.Future[None]:
        if self._changed is None or self._changed.done():
            self._changed = asyncio.get_running_loop().create_future()
        return self._changed

    def _notify(self) -> None:
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)

    # ---- looking ------------------------------------------------------------------------------

    def loaded(self) -> list[Loaded[T]]:
        """The models loaded now, most recently used first (expired ones swept out first)."""
        self.sweep()
        ready = [e for e in self._entries.values() if e.ready.done() and e.value is not None]
        return sorted(ready, key=lambda e: -e.last_used)

    def get(self, key: Hashable) -> Loaded[T] | None:
        entry = self._entries.get(key)
        return entry if entry is not None and entry.value is not None else None

    def expires_in(self, entry: Loaded[T]) -> float | None:
        """Seconds until it is unloaded if no request comes; None: not while in flight or kept forever."""
        return None if entry.expires_at is None else max(0.0, entry.expires_at - self.clock())

    async def close(self) -> None:
        """Unload everything (the server is stopping); waits for every unload to finish."""
        if self._timer is not None:
            self._timer.cancel()
        for entry in list(self._entries.values()):
            if not entry.ready.done():
                with contextlib.suppress(BaseException):
                    await entry.ready
            self._start_unload(entry)
        await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def wait_unloaded(self) -> None:
        """Return once no unload is running (tests: the engine threads have stopped)."""
        await asyncio.gather(*list(self._tasks), return_exceptions=True)


def parse_keep_alive(value: str | float | int | None) -> float | None:
    """Ollama's keep_alive: a number of seconds or a Go duration ("5m", "1h30m", "300ms");
    negative means forever (FOREVER), 0 unload now; None stays None. ValueError otherwise."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"a duration (\"5m\") or seconds, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            seconds = _go_duration(text)
    if math.isnan(seconds):
        raise ValueError("a duration, got NaN")
    return FOREVER if seconds < 0 else seconds


_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def _go_duration(text: str) -> float:
    import re

    m = re.fullmatch(r"([-+]?)((?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|ms|s|m|h))+", text)
    if not m or not text:
        raise ValueError(f"a duration such as \"5m\", \"1h\", \"30s\" or a number of seconds, got {text!r}")
    total = sum(float(n) * _UNITS[u] for n, u in re.findall(r"((?:\d+(?:\.\d*)?|\.\d+))(ns|us|µs|ms|s|m|h)", text))
    return -total if m.group(1) == "-" else total
