"""Server limits and lifecycle: API keys, the bounded queue, UNAVAILABLE while loading or
draining, client retries, TLS, and `weft serve` in a subprocess answering SIGTERM."""
from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest

from clients.client import NO_RETRY, AsyncWeftClient, RetryPolicy, WeftClient, build_generate_request
from service.config import EngineConfig
from service.engine.async_engine import AsyncEngine
from service.engine.core import EngineCore
from service.server import BackgroundServer, ServerOptions, WeftServer

API_KEY = "test-key-123"
LONG = 4000


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory):
    return tiny_model_factory("llama", max_position_embeddings=4096)


@pytest.fixture(scope="module")
def core(model_dir) -> EngineCore:
    """One model for the module; each server below wraps it in its own AsyncEngine in turn."""
    return EngineCore(EngineConfig(model=str(model_dir), num_blocks=1024, max_num_seqs=1, max_queue_len=1,
                                   progress=False))


@pytest.fixture(scope="module")
def locked_server(core):
    """API key on; one running sequence and one waiting request at most."""
    srv = BackgroundServer(ServerOptions(host="127.0.0.1", port=0, api_key=API_KEY), core=core).start()
    yield srv
    srv.stop()


def _wait_until(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.002)


# ---- API key --------------------------------------------------------------------------------


def test_missing_or_wrong_key_is_unauthenticated(locked_server) -> None:
    for key in (None, "wrong-key"):
        with WeftClient(locked_server.target, api_key=key, retry=NO_RETRY) as c:
            for call in (lambda: c.generate("hi", max_tokens=1), lambda: list(c.generate_stream("hi", max_tokens=1)),
                         c.models):
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert c.health() == "SERVING"   # probes need no key
    with WeftClient(locked_server.target, api_key=API_KEY, retry=NO_RETRY) as c:
        assert len(c.generate("hi", max_tokens=2).choices[0].token_ids) == 2


# ---- bounded queue --------------------------------------------------------------------------


def test_full_queue_is_resource_exhausted_at_once(locked_server) -> None:
    core = locked_server.core
    with WeftClient(locked_server.target, api_key=API_KEY, retry=NO_RETRY, timeout=60) as c:
        running = c.generate_stream("first", max_tokens=LONG, ignore_eos=True)
        next(running)                                   # holds the only running slot
        waiting = c.stub.GenerateStream(build_generate_request("second", max_tokens=LONG, ignore_eos=True),
                                        metadata=(("authorization", f"Bearer {API_KEY}"),))
        _wait_until(lambda: core.num_waiting == 1)      # fills the queue (max_queue_len=1)
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            c.generate("third", max_tokens=1)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert time.monotonic() - t0 < 2.0
        running.close()
        waiting.cancel()
        _wait_until(core.pool_is_whole)
        _wait_until(lambda: core.num_waiting == 0 and core.num_running == 0)
        assert len(c.generate("after", max_tokens=2).choices[0].token_ids) == 2


# ---- loading, retries, draining -------------------------------------------------------------


async def test_unavailable_while_loading_then_retry_succeeds(core) -> None:
    unavailable = asyncio.Event()

    def on_end(rid: str, outcome: str) -> None:
        if outcome == "unavailable":
            unavailable.set()

    server = WeftServer(ServerOptions(host="127.0.0.1", port=0), on_request_end=on_end)
    port = await server.start()
    target = f"127.0.0.1:{port}"
    engine = AsyncEngine(core)
    try:
        async with AsyncWeftClient(target, retry=NO_RETRY) as c:
            assert await c.health() == "NOT_SERVING"
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await c.generate("hi", max_tokens=1)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "loading" in err.value.details()
        unavailable.clear()

        patient = RetryPolicy(max_attempts=50, initial_backoff_s=0.02, max_backoff_s=0.05)
        async with AsyncWeftClient(target, retry=patient) as c:
            call = asyncio.create_task(c.generate("hi", max_tokens=2, temperature=0))
            await asyncio.wait_for(unavailable.wait(), 10)   # the first attempt was refused ...
            await server.attach(engine)                     # ... the model is "loaded" ...
            resp = await asyncio.wait_for(call, 10)          # ... and a retry got through
            assert len(resp.choices[0].token_ids) == 2
            await c.wait_ready(5)
    finally:
        await server.stop(0)
        await engine.shutdown()


async def test_graceful_drain_finishes_in_flight_stream(core) -> None:
    engine = AsyncEngine(core)
    server = WeftServer(ServerOptions(host="127.0.0.1", port=0), engine=engine)
    port = await server.start()
    target = f"127.0.0.1:{port}"
    try:
        async with AsyncWeftClient(target, retry=NO_RETRY, timeout=60) as c:
            stream = c.generate_stream("drain", max_tokens=200, ignore_eos=True, temperature=0)
            first = await stream.__anext__()
            stopping = asyncio.create_task(server.stop(grace=30))
            await asyncio.sleep(0)                          # let stop() flip health and the drain flag
            assert server.servicer.draining
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await c.generate("during the drain", max_tokens=1)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            rest = [m async for m in stream]
            assert sum(len(m.choice.token_ids) for m in [first, *rest]) == 200   # finished, not cut
            await asyncio.wait_for(stopping, 30)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await c.generate("late", max_tokens=1)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(0)
        await engine.shutdown()
    assert core.pool_is_whole()


# ---- TLS ------------------------------------------------------------------------------------


def _self_signed(tmp_path) -> tuple[str, str] | None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    proc = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        capture_output=True,
    )
    return (str(cert), str(key)) if proc.returncode == 0 else None


def test_tls(core, tmp_path) -> None:
    pair = _self_signed(tmp_path)
    if pair is None:
        pytest.skip("openssl not available to make a certificate")
    cert, key = pair
    options = ServerOptions(host="127.0.0.1", port=0, tls_cert=cert, tls_key=key)
    with BackgroundServer(options, core=core) as srv:
        root = open(cert, "rb").read()
        with WeftClient(f"localhost:{srv.port}", root_certificates=root, retry=NO_RETRY, timeout=30) as c:
            assert len(c.generate("tls", max_tokens=2).choices[0].token_ids) == 2
        with WeftClient(f"localhost:{srv.port}", retry=NO_RETRY, timeout=5) as plain:
            with pytest.raises(grpc.RpcError) as err:
                plain.generate("plaintext", max_tokens=1)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE


# ---- `weft serve` ---------------------------------------------------------------------------


def test_weft_serve_subprocess_serves_and_drains_on_sigterm(model_dir) -> None:
    env = {**os.environ, "WEFT_API_KEY": ""}
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--model", str(model_dir), "--host", "127.0.0.1",
         "--port", "0", "--kv-cache-gb", "0.05"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
    )
    lines: list[str] = []
    try:
        port = None
        for line in proc.stderr:                     # wait on the log, not on a timer
            lines.append(line)
            if m := re.search(r"listening on 127\.0\.0\.1:(\d+)", line):
                port = int(m.group(1))
            if "serving " in line:
                break
        assert port, "".join(lines)
        threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
        with WeftClient(f"127.0.0.1:{port}", retry=NO_RETRY, timeout=30) as c:
            c.wait_ready(30)
            stream = c.generate_stream("serve", max_tokens=64, ignore_eos=True)
            first = next(stream)
            proc.send_signal(signal.SIGTERM)
            rest = list(stream)                      # the drain lets it finish
            assert sum(len(m.choice.token_ids) for m in [first, *rest]) == 64
        assert proc.wait(timeout=60) == 0, "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert any("serving " in line and f"127.0.0.1:{port}" in line for line in lines)
