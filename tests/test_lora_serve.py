"""LoRA adapters served: over gRPC (ListModels with parents, requests by model name equal to the
offline engine, LoadAdapter / UnloadAdapter, hot swap while other requests stream — none fails,
each gets what it gets alone, the pool whole after — and bad adapters refused naming the
field); over HTTP with the official `openai` and `ollama` clients and vLLM's
/v1/load_lora_adapter and /v1/unload_lora_adapter routes; a GGUF adapter file over both."""
from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import httpx
import ollama
import openai
import pytest

from clients.client import AsyncWeftClient, NO_RETRY, WeftClient
from decoding.sampling import SamplingParams
from service.config import EngineConfig
from service.llm import LLM
from tests.gguf_writer import write_lora_gguf
from tests.test_http_shim import ShimStack
from tests.test_lora import ALL, make_adapter

N = 12


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("served_loras")
    return {name: make_adapter(tiny_llama, root / name, seed=20 + i, r=8, lora_alpha=16, target_modules=ALL)
            for i, name in enumerate(("alpha", "beta", "gamma"))}


@pytest.fixture(scope="module")
def offline(tiny_llama, adapters) -> LLM:
    return LLM(str(tiny_llama), dtype="float32", num_blocks=256, progress=False,
               lora=[f"{n}={p}" for n, p in adapters.items()])


@pytest.fixture(scope="module")
def stack(tiny_llama, adapters):
    config = EngineConfig(model=str(tiny_llama), num_blocks=512, progress=False, max_loras=2,
                          lora=[f"alpha={adapters['alpha']}"])
    s = ShimStack.start(config)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(stack):
    with WeftClient(stack.grpc.target, retry=NO_RETRY, timeout=60) as c:
        yield c


PROMPT = [1, 504, 3451, 28, 253, 1132, 29, 77]


def _expect(offline: LLM, adapter: str | None, prompt=PROMPT, n: int = N) -> list[int]:
    [res] = offline.generate([prompt], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), lora=adapter)
    return res.outputs[0].token_ids


def _grpc_ids(client: WeftClient, model: str, prompt=PROMPT, n: int = N) -> list[int]:
    resp = client.generate(list(prompt), model=model, temperature=0, max_tokens=n, ignore_eos=True)
    assert resp.model == model or not model
    return list(resp.choices[0].token_ids)


def test_models_list_adapters_with_their_parent(client) -> None:
    models = {m.name: m for m in client.models()}
    base = next(m for m in models.values() if not m.parent)
    assert models["alpha"].parent == base.name and models["alpha"].lora_rank == 8
    assert models["alpha"].source.endswith("alpha") and base.features.lora


def test_requests_by_adapter_name_equal_the_offline_engine(client, offline) -> None:
    assert _grpc_ids(client, "alpha") == _expect(offline, "alpha")
    assert _grpc_ids(client, "") == _expect(offline, None) != _expect(offline, "alpha")


def test_load_unload_and_hot_swap_while_streaming(stack, client, offline, adapters) -> None:
    async def run() -> None:
        async with AsyncWeftClient(stack.grpc.target, retry=NO_RETRY, timeout=120) as ac:
            loaded = await ac.load_adapter("beta", str(adapters["beta"]))
            assert loaded.model.parent and loaded.load_seconds > 0

            models = ["alpha", "beta", "", "alpha", "beta"]
            started = [asyncio.Event() for _ in models]

            async def stream(model: str, i: int) -> tuple[str, list[int], list[int]]:
                prompt = [p + i for p in PROMPT]
                ids: list[int] = []
                async for msg in ac.generate_stream(prompt, model=model, temperature=0, max_tokens=200,
                                                    ignore_eos=True):
                    ids += msg.choice.token_ids
                    started[i].set()
                return model, prompt, ids

            tasks = [asyncio.ensure_future(stream(m, i)) for i, m in enumerate(models)]
            await asyncio.gather(*(e.wait() for e in started))   # every stream has its first tokens
            # While they stream: unload alpha (its running requests finish with it), swap gamma
            # in and out (two slots, three adapters: someone is evicted), load alpha back.
            await ac.unload_adapter("alpha")
            with pytest.raises(grpc.RpcError) as err:
                await ac.generate(PROMPT, model="alpha", max_tokens=2)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            await ac.load_adapter("gamma", str(adapters["gamma"]))
            gamma = await ac.generate(PROMPT, model="gamma", temperature=0, max_tokens=N, ignore_eos=True)
            await ac.unload_adapter("gamma")
            await ac.load_adapter("alpha", str(adapters["alpha"]))
            for model, prompt, ids in await asyncio.gather(*tasks):
                assert ids == _expect(offline, model or None, prompt, 200), model
            assert list(gamma.choices[0].token_ids) == _expect(offline, "gamma")
    stack.grpc.call(run(), timeout=300)
    stack.grpc.call(stack.grpc.engine.wait_idle(), timeout=30)
    assert stack.grpc.core.pool_is_whole()
    assert _grpc_ids(client, "alpha") == _expect(offline, "alpha")   # reloaded: serving again


@pytest.mark.parametrize("name,path,field", [
    ("bad name!", "x", "name"),
    ("delta", "/nowhere/at/all", "path"),
])
def test_bad_loads_are_invalid_argument_naming_the_field(client, name, path, field) -> None:
    with pytest.raises(grpc.RpcError) as err:
        client.load_adapter(name, path)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith(f"{field}:")
    with pytest.raises(grpc.RpcError) as err:
        client.unload_adapter("never-loaded")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert _grpc_ids(client, "", n=2)   # still serving


def test_http_clients_and_vllm_routes(stack, offline, adapters) -> None:
    oa = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)
    models = {m.id: m for m in oa.models.list().data}
    assert models["alpha"].model_extra["parent"] and models["alpha"].model_extra["root"].endswith("alpha")
    r = oa.completions.create(model="alpha", prompt=PROMPT, max_tokens=N, temperature=0,
                              extra_body={"ignore_eos": True, "return_token_ids": True})
    assert r.model == "alpha" and r.choices[0].model_extra["token_ids"] == _expect(offline, "alpha")

    r = httpx.post(f"{stack.url}/v1/load_lora_adapter", json={"lora_name": "gamma", "lora_path": str(adapters["gamma"])})
    assert r.status_code == 200 and "gamma" in r.text
    r = oa.completions.create(model="gamma", prompt=PROMPT, max_tokens=N, temperature=0,
                              extra_body={"ignore_eos": True, "return_token_ids": True})
    assert r.choices[0].model_extra["token_ids"] == _expect(offline, "gamma")
    chat = ollama.Client(host=stack.url).chat(model="gamma:latest", messages=[{"role": "user", "content": "hi"}],
                                              options={"temperature": 0, "num_predict": 4})
    assert chat.model == "gamma"
    assert httpx.post(f"{stack.url}/v1/unload_lora_adapter", json={"lora_name": "gamma"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        oa.completions.create(model="gamma", prompt="hi", max_tokens=2)
    r = httpx.post(f"{stack.url}/v1/unload_lora_adapter", json={"lora_name": "gamma"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "lora_name"
    r = httpx.post(f"{stack.url}/v1/load_lora_adapter", json={"lora_name": "broken", "lora_path": "/nowhere"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path"
    metrics = {line.split()[0]: float(line.split()[1]) for line in httpx.get(f"{stack.url}/metrics").text.splitlines()
               if line.startswith("weft_lora_")}
    served = len([m for m in oa.models.list().data if m.model_extra.get("parent")])
    assert metrics["weft_lora_adapters_loaded"] == served and 1 <= metrics["weft_lora_adapters_resident"] <= 2


def test_gguf_adapter_file_over_http_and_grpc(stack, client, offline, adapters, tiny_llama, tmp_path) -> None:
    """llama.cpp's LoRA GGUF of an adapter serves what the PEFT directory does."""
    beta = write_lora_gguf(tiny_llama, adapters["beta"], tmp_path / "beta.gguf")
    r = httpx.post(f"{stack.url}/v1/load_lora_adapter", json={"lora_name": "beta-gguf", "lora_path": str(beta)})
    assert r.status_code == 200 and "beta-gguf" in r.text
    client.load_adapter("beta-gguf2", str(beta))
    assert _grpc_ids(client, "beta-gguf") == _grpc_ids(client, "beta-gguf2") == _expect(offline, "beta")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\x00" * 12)
    junk = {"lora_name": "junk", "lora_path": str(tmp_path / "junk.gguf")}
    r = httpx.post(f"{stack.url}/v1/load_lora_adapter", json=junk)
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path" and "GGUF" in r.json()["error"]["message"]
    for name in ("beta-gguf", "beta-gguf2"):
        client.unload_adapter(name)
