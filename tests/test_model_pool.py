"""service/model_pool.py on its own: what is loaded, for how long, and what goes first, with a
clock the test moves (no engines: loading a model here makes a record, unloading notes it)."""
from __future__ import annotations

import asyncio
import math

import pytest

from service.model_pool import FOREVER, ModelPool, ModelTooLargeError, parse_keep_alive


class Models:
    """Loads and unloads names, recording the order; a load of "broken" fails."""

    def __init__(self, sizes: dict[str, int] | None = None) -> None:
        self.sizes = sizes or {}
        self.loads: list[str] = []
        self.unloads: list[str] = []
        self.now = 0.0

    async def load(self, key: object, name: str) -> tuple[str, int]:
        await asyncio.sleep(0)   # a real load yields to the loop
        if name == "broken":
            raise ValueError("corrupt weights")
        self.loads.append(name)
        return name, self.sizes.get(name, 10)

    async def unload(self, value: str) -> None:
        self.unloads.append(value)

    def clock(self) -> float:
        return self.now

    def pool(self, **kw: object) -> ModelPool[str]:
        return ModelPool(self.load, self.unload, clock=self.clock, **kw)  # type: ignore[arg-type]


def names(pool: ModelPool[str]) -> list[str]:
    return sorted(e.name for e in pool.loaded())


async def use(pool: ModelPool[str], name: str, keep_alive: float | None = None) -> None:
    async with pool.use(name, name, 10, keep_alive):
        pass


def test_keep_alive_on_the_clock() -> None:
    async def main() -> None:
        m = Models()
        pool = m.pool(keep_alive=300)
        await use(pool, "a")
        await use(pool, "b", keep_alive=10)
        await use(pool, "c", keep_alive=FOREVER)
        m.now = 9.9
        assert names(pool) == ["a", "b", "c"]
        m.now = 10.0
        assert names(pool) == ["a", "c"]
        m.now = 300.0
        assert names(pool) == ["c"]
        m.now = 1e12
        assert names(pool) == ["c"]
        await use(pool, "c", keep_alive=0)   # 0: gone as its request ends
        assert names(pool) == []
        await pool.wait_unloaded()
        assert m.unloads == ["b", "a", "c"]
    asyncio.run(main())


def test_no_expiry_while_in_flight_and_a_request_sets_keep_alive() -> None:
    async def main() -> None:
        m = Models()
        pool = m.pool(keep_alive=5)
        async with pool.use("a", "a", 10):
            m.now = 100.0
            assert names(pool) == ["a"]                  # in flight: never expires
            (entry,) = pool.loaded()
            assert pool.expires_in(entry) is None
        (entry,) = pool.loaded()
        assert pool.expires_in(entry) == 5               # counted from the end of its last request
        entry = await pool.acquire("a", "a", 10, None)   # a side call (None) keeps keep_alive as it was
        pool.release(entry)
        assert pool.expires_in(entry) == 5
        assert pool.expire("a") and names(pool) == []    # unload now (idle)
        assert not pool.expire("a")
    asyncio.run(main())


def test_least_recently_used_idle_model_goes_first() -> None:
    async def main() -> None:
        m = Models()
        pool = m.pool(max_loaded=2)
        await use(pool, "a")
        m.now = 1
        await use(pool, "b")
        m.now = 2
        await use(pool, "a")          # a is now the more recent
        m.now = 3
        await use(pool, "c")          # room for c: b goes
        assert names(pool) == ["a", "c"] and m.unloads == ["b"]
    asyncio.run(main())


def test_a_busy_model_is_never_evicted_the_request_waits() -> None:
    async def main() -> None:
        m = Models()
        pool = m.pool(max_loaded=1)
        held = await pool.acquire("a", "a", 10)
        waiting = asyncio.ensure_future(use(pool, "b"))
        for _ in range(20):           # let it run as far as it can: it must wait for room
            await asyncio.sleep(0)
        assert not waiting.done() and names(pool) == ["a"] and m.unloads == []
        pool.release(held)            # a goes idle: evicted, then b loads
        await asyncio.wait_for(waiting, 5)
        assert names(pool) == ["b"] and m.unloads == ["a"]
        # A waiter that gives up leaves nothing behind.
        held = await pool.acquire("b", "b", 10)
        gave_up = asyncio.ensure_future(use(pool, "c"))
        await asyncio.sleep(0)
        gave_up.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gave_up
        pool.release(held)
        assert names(pool) == ["b"] and "c" not in m.loads
    asyncio.run(main())


def test_memory_budget_and_a_model_too_large() -> None:
    async def main() -> None:
        m = Models({"a": 40, "b": 40, "c": 50, "huge": 10})
        pool = m.pool(memory_bytes=100)
        for name in ("a", "b"):
            async with pool.use(name, name, 40):
                pass
        async with pool.use("c", "c", 50):   # 40 + 40 + 50 > 100: a (least recent) goes
            pass
        assert names(pool) == ["b", "c"]
        with pytest.raises(ModelTooLargeError, match="memory budget"):
            await pool.acquire("x", "x", 101)     # the estimate alone is over: refused before loading
        m.sizes["huge"] = 150                     # measured larger than estimated: unloaded, refused
        with pytest.raises(ModelTooLargeError):
            await pool.acquire("huge", "huge", 10)
        await pool.wait_unloaded()
        assert names(pool) == ["b", "c"] and "huge" in m.unloads
    asyncio.run(main())


def test_a_failed_load_is_forgotten() -> None:
    async def main() -> None:
        m = Models()
        pool = m.pool()
        results = await asyncio.gather(use(pool, "broken"), use(pool, "broken"), return_exceptions=True)
        assert all(isinstance(r, ValueError) for r in results)   # both waiters hear it; one load ran
        assert names(pool) == [] and pool.get("broken") is None
    asyncio.run(main())


@pytest.mark.parametrize("value, seconds", [
    (None, None), (0, 0.0), ("0", 0.0), ("0s", 0.0), (30, 30.0), ("30", 30.0), ("5m", 300.0), ("1h30m", 5400.0),
    ("1.5h", 5400.0), ("300ms", 0.3), (-1, FOREVER), ("-1m", FOREVER), (2.5, 2.5)])
def test_parse_keep_alive(value, seconds) -> None:
    got = parse_keep_alive(value)
    assert got == seconds or (got is not None and seconds is not None and math.isclose(got, seconds))


@pytest.mark.parametrize("value", ["forever", "5 minutes", "m", "", "1d", True, float("nan")])
def test_parse_keep_alive_refuses(value) -> None:
    with pytest.raises(ValueError):
        parse_keep_alive(value)
