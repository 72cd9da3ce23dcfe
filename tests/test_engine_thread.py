"""The engine thread cannot die: whatever a command or a step raises fails that command's caller
(or the requests of that step) only, and the server goes on serving everyone else."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest

from clients.client import NO_RETRY, WeftClient
from decoding.sampling import SamplingParams
from service.config import EngineConfig
from service.engine.async_engine import AsyncEngine
from service.engine.core import EngineCore
from service.server import BackgroundServer, ServerOptions


@pytest.fixture(scope="module")
def core(tiny_llama) -> EngineCore:
    return EngineCore(EngineConfig(model=str(tiny_llama), num_blocks=128, progress=False))


@pytest.fixture(scope="module")
def server(core):
    srv = BackgroundServer(ServerOptions(host="127.0.0.1", port=0), core=core).start()
    yield srv
    srv.stop()


@pytest.fixture()
def client(server):
    with WeftClient(f"127.0.0.1:{server.port}", retry=NO_RETRY, timeout=60) as c:
        yield c


def _fails_once(real: Callable[..., Any], exc: BaseException) -> Callable[..., Any]:
    calls = {"n": 0}

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise exc
        return real(*args, **kwargs)
    return wrapped


def _still_serving(client: WeftClient, server: BackgroundServer, core: EngineCore) -> None:
    resp = client.generate("still serving", max_tokens=5, temperature=0, ignore_eos=True)
    assert len(resp.choices[0].token_ids) == 5
    server.call(server.server.engine.wait_idle(), timeout=30)
    assert core.pool_is_whole() and not core.requests


def test_add_request_raising_fails_that_request_only(client, server, core, monkeypatch) -> None:
    monkeypatch.setattr(core, "add_request", _fails_once(core.add_request, KeyError("boom in add")))
    with pytest.raises(grpc.RpcError) as err:
        client.generate("first", max_tokens=4, temperature=0)
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "boom in add" in err.value.details()
    _still_serving(client, server, core)


def test_step_raising_fails_the_running_requests_only(client, server, core, monkeypatch) -> None:
    monkeypatch.setattr(core, "step", _fails_once(core.step, RuntimeError("boom in step")))
    with pytest.raises(grpc.RpcError) as err:
        client.generate("first", max_tokens=4, temperature=0)
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "boom in step" in err.value.details()
    _still_serving(client, server, core)


def test_admin_call_raising_fails_that_call_only(client, server, core, monkeypatch) -> None:
    monkeypatch.setattr(core, "reset_prefix_cache", _fails_once(core.reset_prefix_cache, RuntimeError("boom in reset")))
    with pytest.raises(grpc.RpcError) as err:
        client.reset_prefix_cache()
    assert err.value.code() == grpc.StatusCode.INTERNAL
    client.reset_prefix_cache()   # the next call goes through
    _still_serving(client, server, core)


def test_abort_raising_keeps_the_engine_alive(client, server, core, monkeypatch) -> None:
    """A failed abort leaves the request to finish on its own (its blocks are freed then)."""
    monkeypatch.setattr(core, "abort", _fails_once(core.abort, RuntimeError("boom in abort")))
    stream = client.generate_stream("cancel me", max_tokens=40, temperature=0, ignore_eos=True)
    next(stream)
    stream.close()   # cancels the call: the server aborts the request, and that abort raises
    _still_serving(client, server, core)


def test_stats_raising_keeps_the_engine_alive(client, server, core, monkeypatch) -> None:
    monkeypatch.setattr(core, "stats", _fails_once(core.stats, RuntimeError("boom in stats")))
    _still_serving(client, server, core)


async def test_stats_snapshot_counts_what_ran(tiny_llama) -> None:
    """stats() is the engine thread's snapshot: after a request it counts its prefix lookup,
    and reset_prefix_cache returns the counters as they stood."""
    engine = AsyncEngine(EngineCore(EngineConfig(model=str(tiny_llama), num_blocks=64, progress=False)))

    prompt = list(range(10, 60))
    async for _ in engine.generate(prompt, SamplingParams(temperature=0, max_tokens=3)):
        pass
    await engine.wait_idle()
    stats = engine.stats()
    assert stats.num_running == 0 and stats.num_waiting == 0
    assert stats.num_free_blocks == stats.num_blocks == 64
    assert stats.prefix_queried_tokens == len(prompt)
    after = await engine.reset_prefix_cache()
    assert after.prefix_queried_tokens == len(prompt)
    await engine.shutdown()
