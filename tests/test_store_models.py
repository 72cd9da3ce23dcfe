"""Several models in one server (`weft serve` over the model store), driven with the official
`ollama` client over loopback: two tiny models of different weights served at once with
requests interleaved (each one's greedy answer equals that model served alone), loaded on first
use, unloaded after keep_alive (the pool's clock is a test clock: time moves when the test says,
nothing sleeps), least recently used first under --max-loaded-models 1, never while a request
runs on it; a model larger than --memory-gb; /api/pull progress lines; bad input.

The servers run in this process exactly as `weft serve` assembles them (server_cli.store_router
and load_store), except for the clock; one test starts the real `weft serve` command."""
from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import threading
import time
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import httpx
import ollama
import openai
import pytest

from clients.client import NO_RETRY, WeftClient
from clients.weft.v1 import inference_pb2 as pb
from service.config import EngineConfig
from service.modelfile import parse
from service.server import ServerOptions, WeftServer
from service.server_cli import StoreSettings, load_store, store_router
from service.shim.app import HttpServer
from service.store import ModelStore
from service.store_router import StoreRouter
from tests.test_http_serve import Proc, free_port
from tests.test_http_shim import ShimStack, wait_until

ASK = "Name a fruit."
GREEDY = {"temperature": 0, "num_predict": 8}


class ManualClock:
    """The pool's clock: seconds that pass only when the test advances them."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class StoreStack:
    """`weft serve` over a store in this process: its router (pool), gRPC server and HTTP shim
    on one event loop in a thread."""
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    server: WeftServer
    router: StoreRouter
    http: HttpServer
    clock: ManualClock

    @classmethod
    def start(cls, settings: StoreSettings) -> StoreStack:
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="store-stack", daemon=True)
        thread.start()
        clock = ManualClock()

        async def up() -> tuple[WeftServer, StoreRouter, HttpServer]:
            options = ServerOptions(host="127.0.0.1", port=0)
            router = store_router(options, EngineConfig(num_blocks=64, progress=False), settings, clock=clock)
            server = WeftServer(options, servicer=router)
            port = await server.start()
            await load_store(server, router, settings.preload)
            http = HttpServer(f"127.0.0.1:{port}", "127.0.0.1", 0)
            await http.start()
            return server, router, http

        server, router, http = asyncio.run_coroutine_threadsafe(up(), loop).result(300)
        return cls(loop, thread, server, router, http, clock)

    def call(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http.port}"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def loaded(self) -> list[str]:
        """/api/ps's names (expired models are swept as it is asked)."""
        return [m.model for m in ollama.Client(host=self.url).ps().models]

    def engine_of(self, name: str):
        """The engine a loaded model runs on."""
        async def find():
            (entry,) = [e for e in self.router.pool.loaded() if e.name.removesuffix(":latest") == name]
            return entry.value.engine
        return self.call(find())

    def unloads_done(self) -> None:
        """Wait for the engines told to go to have stopped (their memory is free)."""
        self.call(self.router.pool.wait_unloaded())

    def stop(self) -> None:
        self.call(self.http.stop())
        self.call(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_llama, tiny_qwen2) -> Iterator:
    home = tmp_path_factory.mktemp("weft_home")
    store = ModelStore(home)
    store.create("llama", parse(f"FROM {tiny_llama}\n"))
    store.create("qwen", parse(f"FROM {tiny_qwen2}\n"))
    store.create("terse", parse(f'FROM llama\nSYSTEM "One word."\n'))   # same weights as llama: one engine
    mp = pytest.MonkeyPatch()
    mp.setenv("WEFT_HOME", str(home))
    yield home
    mp.undo()


@pytest.fixture(scope="module")
def alone(tiny_llama, tiny_qwen2) -> dict[str, list[int]]:
    """Each model's greedy answer served alone (`weft serve --model PATH`, production mode)."""
    answers = {}
    for name, path in (("llama", tiny_llama), ("qwen", tiny_qwen2)):
        s = ShimStack.start(EngineConfig(model=str(path), num_blocks=64, progress=False),
                            options=ServerOptions(host="127.0.0.1", port=0, served_model_name=name))
        try:
            answers[name] = ollama.Client(host=s.url).generate(model=name, prompt=ASK, options=GREEDY).context
        finally:
            s.stop()
    return answers


@pytest.fixture(scope="module")
def stack(home) -> Iterator[StoreStack]:
    s = StoreStack.start(StoreSettings(preload=["llama"], keep_alive=300.0))
    yield s
    s.stop()


def test_two_models_at_once_interleaved(stack, alone) -> None:
    """qwen is loaded on first use beside the preloaded llama; a qwen request runs while a llama
    stream is open; each answer equals that model's answer served alone."""
    client = ollama.Client(host=stack.url)
    assert stack.loaded() == ["llama"]
    llama = client.generate(model="llama", prompt=ASK, options=GREEDY, stream=True)
    first = next(llama)                     # llama's request is running ...
    qwen = client.generate(model="qwen", prompt=ASK, options=GREEDY)   # ... qwen loads and answers meanwhile
    rest = list(llama)
    assert qwen.context == alone["qwen"]
    assert rest[-1].context == alone["llama"] and first.response + "".join(r.response for r in rest) != ""
    assert alone["llama"] != alone["qwen"]  # different weights, different answers
    ps = client.ps().models
    assert sorted(m.model for m in ps) == ["llama", "qwen"]
    assert all(m.size > 0 and m.size_vram == 0 and m.expires_at for m in ps)
    # A store model of the same weights runs on llama's engine (no third load), with its defaults.
    chat = [{"role": "user", "content": ASK}]
    terse = client.chat(model="terse", messages=chat, options=GREEDY).message.content
    assert terse != client.chat(model="llama", messages=chat, options=GREEDY).message.content
    assert sorted(stack.loaded()) == ["llama", "qwen"]
    tags = {m.model: m for m in client.list().models}
    assert {"llama", "qwen", "terse"} <= set(tags) and tags["llama"].digest == tags["terse"].digest
    assert tags["llama"].size > 0 and tags["llama"].digest != tags["qwen"].digest


def test_keep_alive_unloads_on_the_clock(stack) -> None:
    client = ollama.Client(host=stack.url)
    client.generate(model="qwen", prompt=ASK, options=GREEDY, keep_alive="10m")
    client.generate(model="llama", prompt=ASK, options=GREEDY, keep_alive=-1)      # never
    (qwen,) = [m for m in client.ps().models if m.model == "qwen"]
    left = qwen.expires_at.timestamp() - time.time()
    assert 590 < left <= 600, left
    stack.clock.advance(599)
    assert sorted(stack.loaded()) == ["llama", "qwen"]
    stack.clock.advance(2)                   # 10 minutes and a second: qwen goes, llama stays
    assert stack.loaded() == ["llama"]
    stack.clock.advance(10 ** 7)
    assert stack.loaded() == ["llama"]
    # Loaded again on use; keep_alive 0 unloads it right after its request (Ollama's), and its
    # memory is free once the unload is done (nothing keeps the engine alive).
    client.generate(model="qwen", prompt=ASK, options=GREEDY, keep_alive="1h")
    core = weakref.ref(stack.engine_of("qwen").core)
    client.generate(model="qwen", prompt=ASK, options=GREEDY, keep_alive=0)
    assert stack.loaded() == ["llama"]
    stack.unloads_done()
    assert core() is None
    # An empty prompt loads (done_reason load) and, with keep_alive 0, unloads.
    assert client.generate(model="qwen", prompt="", keep_alive="1h").done_reason == "load"
    assert sorted(stack.loaded()) == ["llama", "qwen"]
    assert client.generate(model="qwen", prompt="", keep_alive=0).done_reason == "unload"
    assert stack.loaded() == ["llama"]
    # The default keep_alive (300 s) applies to a request that gives none.
    client.chat(model="qwen", messages=[{"role": "user", "content": ASK}], options=GREEDY)
    stack.clock.advance(301)
    assert stack.loaded() == ["llama"]


def test_embed_keep_alive_and_the_store_over_http(stack) -> None:
    client = ollama.Client(host=stack.url)
    vectors = client.embed(model="qwen", input=["a loom", "a shuttle"], keep_alive=0).embeddings
    assert len(vectors) == 2 and "qwen" not in stack.loaded()   # embedded, then unloaded at once
    client.embed(model="qwen", input="a loom", keep_alive="2m")
    (qwen,) = [m for m in client.ps().models if m.model == "qwen"]
    assert 110 < qwen.expires_at.timestamp() - time.time() <= 120
    # Created over HTTP FROM a model of other weights than the first loaded: served on qwen's engine.
    assert client.create(model="pirate", from_="qwen", system="You are a pirate.",
                         parameters={"temperature": 0, "num_predict": 5}).status == "success"
    chat = [{"role": "user", "content": ASK}]
    assert client.chat(model="pirate", messages=chat).eval_count == 5
    with WeftClient(stack.target, retry=NO_RETRY, timeout=60) as c:
        (engine,) = [m for m in c.loaded_models() if "qwen" in m.names]
        assert "pirate" in engine.names
        listed = {m.name: m for m in c.models()}
        assert listed["pirate"].loaded and listed["pirate"].digest == listed["qwen"].digest
    ids = {m["id"] for m in httpx.get(f"{stack.url}/v1/models", timeout=30).json()["data"]}
    assert {"llama", "qwen", "terse", "pirate"} <= ids
    client.copy("pirate", "pirate2")
    client.delete("pirate")
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="pirate", messages=chat)
    assert err.value.status_code == 404
    assert client.chat(model="pirate2", messages=chat).eval_count == 5
    client.delete("pirate2")


def test_bad_input_keeps_serving(stack, tmp_path) -> None:
    client = ollama.Client(host=stack.url)
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="qwen", prompt=ASK, keep_alive="forever")
    assert err.value.status_code == 400 and "keep_alive" in str(err.value)
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="no-such-model", prompt=ASK)
    assert err.value.status_code == 404 and "no-such-model" in str(err.value)
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="Bad Name!", prompt=ASK)
    assert err.value.status_code == 404
    with WeftClient(stack.target, retry=NO_RETRY, timeout=60) as c:
        with pytest.raises(grpc.RpcError) as rpc:
            c.stub.Generate(pb.GenerateRequest(model="llama", text="hi", keep_alive_seconds=float("nan")))
        assert rpc.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "keep_alive" in rpc.value.details()
        with pytest.raises(grpc.RpcError) as rpc:
            c.stub.LoadAdapter(pb.LoadAdapterRequest(name="x", path="/nowhere"))
        assert rpc.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"architectures": ["NoSuchForCausalLM"]}')
    client.create(model="broken", from_=str(broken))
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="broken", prompt=ASK)
    assert err.value.status_code == 400 and "cannot be loaded" in str(err.value)
    client.delete("broken")
    assert client.generate(model="llama", prompt=ASK, options=GREEDY).done


def test_pull_from_this_machine(stack, tmp_path) -> None:
    data = os.urandom(20 << 20)   # a .gguf of 20 MB: pulling copies it in chunks, it is not loaded
    path = tmp_path / "Pulled_Model.gguf"
    path.write_bytes(data)
    lines = list(ollama.Client(host=stack.url).pull(str(path), stream=True))
    statuses = [p.status for p in lines]
    assert statuses[0] == "pulling manifest" and statuses[-3:] == ["verifying sha256 digest", "writing manifest",
                                                                    "success"]
    copying = [p for p in lines if p.status == "pulling Pulled_Model.gguf"]
    assert copying and copying[-1].total == copying[-1].completed == len(data)
    digest = hashlib.sha256(data).hexdigest()
    assert [p.digest for p in lines if p.status == "verifying sha256 digest"] == [f"sha256:{digest}"]
    tags = {m.model: m for m in ollama.Client(host=stack.url).list().models}
    assert tags["pulled-model"].digest == digest and tags["pulled-model"].size == len(data)
    # stream false: the last line; a name that needs a registry: 404 saying there is none.
    assert httpx.post(f"{stack.url}/api/pull", json={"model": str(path), "stream": False},
                      timeout=60).json() == {"status": "success"}
    with pytest.raises(ollama.ResponseError) as err:
        ollama.Client(host=stack.url).pull("llama3.1:8b")
    assert err.value.status_code == 404 and "registry" in str(err.value)
    r = httpx.post(f"{stack.url}/api/pull", json={}, timeout=30)
    assert r.status_code == 400 and "model" in r.json()["error"]


@pytest.fixture(scope="module")
def one_at_a_time(home) -> Iterator[StoreStack]:
    s = StoreStack.start(StoreSettings(preload=[], keep_alive=300.0, max_loaded=1))
    yield s
    s.stop()


def test_lru_eviction_with_one_model_at_a_time(one_at_a_time) -> None:
    s = one_at_a_time
    client = ollama.Client(host=s.url)
    assert s.loaded() == []                                    # nothing until first use
    client.generate(model="llama", prompt=ASK, options=GREEDY)
    assert s.loaded() == ["llama"]
    client.generate(model="qwen", prompt=ASK, options=GREEDY)  # llama, idle, makes room
    assert s.loaded() == ["qwen"]
    s.unloads_done()
    client.generate(model="terse", prompt=ASK, options=GREEDY)  # llama's weights again, loaded for terse
    assert s.loaded() == ["terse"]
    with WeftClient(s.target, retry=NO_RETRY, timeout=60) as c:
        (engine,) = c.loaded_models()
        assert {"llama", "terse"} <= set(engine.names) and "qwen" not in engine.names
    # An OpenAI request runs on the engine of the model it names: nothing else is loaded for it
    # (not the default model for its limits), so the loaded engine is the same one.
    async def engines() -> list:
        return s.router.pool.loaded()   # on the server's loop, where the pool lives
    (before,) = s.call(engines())
    chat = openai.OpenAI(base_url=f"{s.url}/v1", api_key="none").chat.completions.create(
        model="llama", messages=[{"role": "user", "content": ASK}], max_tokens=4, temperature=0)
    assert chat.usage.completion_tokens == 4 and chat.model == "llama"
    (after,) = s.call(engines())
    assert after is before


def test_never_evicts_a_model_with_a_request_in_flight(one_at_a_time) -> None:
    """A qwen request waits while a llama request runs (Ollama's way), then runs once llama is idle."""
    s = one_at_a_time
    client = ollama.Client(host=s.url)
    for name in s.loaded():                                    # start from nothing loaded
        client.generate(model=name, prompt="", keep_alive=0)
    s.unloads_done()
    with WeftClient(s.target, retry=NO_RETRY, timeout=120) as c, ThreadPoolExecutor(1) as pool:
        stream = c.generate_stream("Tell me a long story.", model="llama", max_tokens=3000, ignore_eos=True)
        next(stream)                                           # llama is running
        waiting = pool.submit(client.generate, model="qwen", prompt=ASK, options=GREEDY)
        wait_until(lambda: s.router.in_flight == 2)            # qwen's request is in, waiting for room
        for _ in range(5):
            next(stream)                                       # llama keeps generating meanwhile
        assert s.loaded() == ["llama"] and not waiting.done()
        with pytest.raises(ollama.ResponseError) as err:
            client.delete("llama")                             # its engine has a request running
        assert err.value.status_code == 400 and "in use" in str(err.value)
        stream.close()                                         # llama's request ends: now it can go
        assert waiting.result(120).done
    assert s.loaded() == ["qwen"]


def test_model_too_large_for_the_memory_budget(home) -> None:
    s = StoreStack.start(StoreSettings(preload=[], memory_bytes=100_000))   # 0.1 MB: no model fits
    try:
        client = ollama.Client(host=s.url)
        with pytest.raises(ollama.ResponseError) as err:
            client.generate(model="llama", prompt=ASK)
        assert err.value.status_code == 400 and "memory budget" in str(err.value)
        assert s.loaded() == [] and "llama" in {m.model for m in client.list().models}   # still serving
    finally:
        s.stop()


def test_weft_serve_command_serves_the_store(home) -> None:
    """The real command: two --model names preloaded under --max-loaded-models 1 (the second
    evicts the first), then the first loaded again on use; SIGTERM stops it."""
    port = free_port()
    proc = Proc(["serve", "--model", "llama", "--model", "qwen", "--max-loaded-models", "1", "--num-blocks", "64",
                 "--port", "0", "--host", "127.0.0.1", "--http-port", str(port), "--embedding-model", "none"],
                ready=r"serving the model store")   # logged once the preloads are done (WEFT_HOME: this store)
    try:
        client = ollama.Client(host=f"http://127.0.0.1:{port}")
        assert [m.model for m in client.ps().models] == ["qwen"]
        assert client.generate(model="llama", prompt=ASK, options=GREEDY).done
        assert [m.model for m in client.ps().models] == ["llama"]
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(60) == 0
    finally:
        proc.stop()


def test_weft_ps_and_stop(stack, capsys) -> None:
    import argparse

    from service.store_cli import cmd_ps, cmd_stop

    client = ollama.Client(host=stack.url)
    client.generate(model="qwen", prompt="", keep_alive="1h")
    client.generate(model="llama", prompt="", keep_alive=-1)
    assert cmd_ps(argparse.Namespace(host=stack.target)) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert set(rows) == {"qwen", "llama"}
    assert rows["qwen"].endswith("60 minutes from now") and rows["llama"].endswith("Forever")
    assert "100% CPU" in rows["qwen"]
    assert cmd_stop(argparse.Namespace(host=stack.target, name="qwen")) == 0
    assert capsys.readouterr().out.strip() == "stopping qwen" and stack.loaded() == ["llama"]
    assert cmd_stop(argparse.Namespace(host=stack.target, name="qwen")) == 0
    assert "not loaded" in capsys.readouterr().out


def test_grpc_load_unload_and_pull(stack, tmp_path) -> None:
    with WeftClient(stack.target, retry=NO_RETRY, timeout=120) as c:
        loaded = c.load_model("qwen", keep_alive=30).model
        assert loaded.model.name == "qwen" and loaded.model.loaded and loaded.size_bytes > 0
        assert 25 < loaded.expires_at - time.time() <= 30 and "qwen" in loaded.names
        assert c.load_model("llama", keep_alive=-1).model.HasField("expires_at") is False   # kept
        assert c.unload_model("qwen") is True
        assert c.unload_model("qwen") is False                   # not loaded: nothing to do
        assert "qwen" not in [m.model.name for m in c.loaded_models()]
        with pytest.raises(grpc.RpcError) as rpc:
            c.load_model("no-such-model")
        assert rpc.value.code() is grpc.StatusCode.NOT_FOUND
        # Generate with keep_alive_seconds 0: unloaded as it ends.
        c.generate("hi", model="qwen", max_tokens=2, keep_alive=0)
        assert "qwen" not in [m.model.name for m in c.loaded_models()]
        listed = {m.name: m for m in c.models()}
        assert not listed["qwen"].loaded and listed["qwen"].size_bytes > 0 and listed["llama"].loaded
        path = tmp_path / "tiny.gguf"
        path.write_bytes(b"GGUF" + bytes(1000))
        steps = list(c.pull_model(str(path), name="tiny-pulled:v1"))
        assert steps[-1].status == "success" and steps[-1].model.name == "tiny-pulled:v1"
        assert steps[-1].model.digest == hashlib.sha256(path.read_bytes()).hexdigest()
        with pytest.raises(grpc.RpcError) as rpc:
            list(c.pull_model("library/llama3.1"))
        assert rpc.value.code() is grpc.StatusCode.NOT_FOUND and "registry" in rpc.value.details()
