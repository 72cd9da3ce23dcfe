"""Oversized requests are refused for what they are — 413 on HTTP, RESOURCE_EXHAUSTED naming
the limit on gRPC — never a 429 with Retry-After (which invites a retry that cannot succeed),
and the server keeps serving."""
from __future__ import annotations

import json
from collections.abc import Iterator

import grpc
import httpx
import openai
import pytest

from clients.client import NO_RETRY, WeftClient
from service.config import EngineConfig
from service.server import BackgroundServer, ServerOptions
from service.shim.app import HttpServer

GRPC_LIMIT = 1024 * 1024          # the gRPC server reads messages up to 1 MiB
HTTP_LIMIT = 4 * 1024 * 1024      # the shim reads bodies up to 4 MiB: between the two, gRPC refuses


@pytest.fixture(scope="module")
def servers(tiny_model_factory) -> Iterator[tuple[BackgroundServer, str]]:
    model = tiny_model_factory("llama", max_position_embeddings=512)
    bg = BackgroundServer(ServerOptions(host="127.0.0.1", port=0, max_request_bytes=GRPC_LIMIT),
                          config=EngineConfig(model=str(model), num_blocks=64, progress=False)).start()
    http = HttpServer(bg.target, "127.0.0.1", 0, max_body_bytes=HTTP_LIMIT)
    bg.call(http.start(), timeout=30)
    yield bg, f"http://127.0.0.1:{http.port}"
    bg.call(http.stop(), timeout=30)
    bg.stop()


def _chat(size: int) -> bytes:
    return json.dumps({"model": "", "max_tokens": 2,   # the served model: a name it lacks would be 404 first
                       "messages": [{"role": "user", "content": "x" * size}]}).encode()


def _served(url: str) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    resp = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert resp.usage.completion_tokens == 2


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/api/chat"])
def test_a_30_mb_body_is_413_and_the_next_request_is_served(servers, route) -> None:
    _, url = servers
    r = httpx.post(url + route, content=_chat(30 * 1024 * 1024), headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code == 413 and "Retry-After" not in r.headers
    err = r.json()["error"]
    message = err["message"] if isinstance(err, dict) else err
    assert str(HTTP_LIMIT) in message
    _served(url)


def test_a_chunked_body_over_the_limit_is_413(servers) -> None:
    _, url = servers
    body = _chat(5 * 1024 * 1024)

    def chunks():
        for i in range(0, len(body), 64 * 1024):
            yield body[i:i + 64 * 1024]
    r = httpx.post(url + "/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code == 413
    _served(url)


def test_over_the_grpc_limit_is_413_through_the_shim_and_named_on_grpc(servers) -> None:
    bg, url = servers
    r = httpx.post(url + "/v1/chat/completions", content=_chat(2 * 1024 * 1024), timeout=60,
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and "Retry-After" not in r.headers, r.text
    assert r.json()["error"]["code"] == "request_too_large"
    with WeftClient(bg.target, retry=NO_RETRY, timeout=60) as client:
        with pytest.raises(grpc.RpcError) as exc:
            client.generate("x" * (2 * GRPC_LIMIT), max_tokens=2)
        assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert str(GRPC_LIMIT) in exc.value.details()
        assert client.generate("hello", max_tokens=2, temperature=0).usage.completion_tokens == 2
    _served(url)
