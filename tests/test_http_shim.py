"""The REST shim against a real server: the official `openai` and `ollama` clients (and raw HTTP
where the wire format itself is the point) -> HTTP on a loopback port -> the shim -> gRPC ->
the engine (tiny random Llama), all in this process the way `weft serve` runs them: the gRPC
server and the HTTP server share one event loop.

The model's context is 4096 tokens, so a request with ignore_eos runs for seconds: the abort
and queue tests can only pass by cancelling it.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import httpx
import ollama
import openai
import pytest

from clients.client import NO_RETRY, WeftClient
from clients.weft.v1 import guided_pb2
from clients.weft.v1 import inference_pb2 as pb
from clients.weft.v1 import inference_pb2_grpc as pb_grpc
from service.config import EngineConfig
from service.metrics import WeftMetrics
from service.shim.app import HttpServer
from service.server import BackgroundServer, ServerOptions, WeftServer
from service.shim.models import ChatCompletionRequest, CompletionRequest
from service.shim.translate import HttpError, ollama_guided, openai_guided

CONTEXT = 4096
LONG = 4000
MAX_SEQS = 8
API_KEY = "http-test-key"
CHAT = [{"role": "user", "content": "Tell me about looms."}]


class Outcomes:
    """How each gRPC call ended (the server's on_request_end hook), to wait on instead of sleeping."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._seen: dict[str, list[str]] = {}

    def __call__(self, request_id: str, outcome: str) -> None:
        with self._cond:
            self._seen.setdefault(request_id, []).append(outcome)
            self._cond.notify_all()

    def wait_for(self, request_id: str, outcome: str, timeout: float = 20.0) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: outcome in self._seen.get(request_id, ()), timeout), \
                f"{request_id}: {self._seen.get(request_id)}"


@dataclass
class ShimStack:
    """A gRPC server (BackgroundServer) and the REST shim on its event loop, like `weft serve`."""
    grpc: BackgroundServer
    http: HttpServer
    metrics: WeftMetrics

    @classmethod
    def start(cls, config: EngineConfig, api_key: str | None = None, on_request_end=None,
              options: ServerOptions | None = None) -> ShimStack:
        metrics = WeftMetrics()
        options = options or ServerOptions(host="127.0.0.1", port=0, api_key=api_key)
        bg = BackgroundServer(options, config=config, on_request_end=on_request_end, observer=metrics).start()
        metrics.bind(lambda: bg.server.engine if bg.server else None)
        http = HttpServer(bg.target, "127.0.0.1", 0, api_key=api_key, metrics=metrics)
        bg.call(http.start(), timeout=30)
        return cls(bg, http, metrics)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http.port}"

    def extra_http(self, target: str | None = None, **kw) -> HttpServer:
        """Another shim on the same loop (in front of this server or of `target`)."""
        http = HttpServer(target or self.grpc.target, "127.0.0.1", 0, **kw)
        self.grpc.call(http.start(), timeout=30)
        return http

    def stop(self) -> None:
        self.grpc.call(self.http.stop(), timeout=30)
        self.grpc.stop()


def wait_until(cond: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.005)


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory):
    return tiny_model_factory("llama", max_position_embeddings=CONTEXT)


@pytest.fixture(scope="module")
def outcomes() -> Outcomes:
    return Outcomes()


@pytest.fixture(scope="module")
def stack(model_dir, outcomes) -> Iterator[ShimStack]:
    config = EngineConfig(model=str(model_dir), num_blocks=1024, max_num_seqs=MAX_SEQS, max_queue_len=MAX_SEQS,
                          progress=False)
    s = ShimStack.start(config, on_request_end=outcomes)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def name(stack) -> str:
    return stack.grpc.engine.core.model_name


@pytest.fixture(scope="module")
def oa(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def ol(stack) -> ollama.Client:
    return ollama.Client(host=stack.url, timeout=60)


@pytest.fixture(scope="module")
def grpc_client(stack) -> Iterator[WeftClient]:
    with WeftClient(stack.grpc.target, retry=NO_RETRY, timeout=60) as c:
        yield c


def idle(stack: ShimStack) -> None:
    """Every request finished and every KV block back in the pool."""
    core = stack.grpc.core
    stack.grpc.call(stack.grpc.engine.wait_idle(), timeout=30)
    wait_until(lambda: core.num_running == 0 and core.num_waiting == 0 and core.pool_is_whole())


def sse_events(text: str) -> list[str]:
    return [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]


# ---- discovery ----------------------------------------------------------------------------------


def test_openapi_document_health_and_models(stack, oa, name) -> None:
    doc = httpx.get(f"{stack.url}/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/tokenize", "/v1/detokenize",
                 "/api/generate", "/api/chat", "/api/tags", "/api/show", "/api/version", "/health", "/metrics"):
        assert path in doc["paths"], path
    assert "ChatCompletionRequest" in doc["components"]["schemas"]
    assert httpx.get(f"{stack.url}/health").status_code == 200
    models = oa.models.list().data
    assert [m.id for m in models] == [name]
    assert oa.models.retrieve(name).id == name
    with pytest.raises(openai.NotFoundError):
        oa.models.retrieve("no-such-model")


# ---- OpenAI: chat ---------------------------------------------------------------------------------


def test_chat_matches_grpc_greedy_and_streams_the_same_text(oa, grpc_client, name, stack) -> None:
    ref = grpc_client.generate(CHAT, max_tokens=12, temperature=0)
    resp = oa.chat.completions.create(model=name, messages=CHAT, max_tokens=12, temperature=0)
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == ref.choices[0].text
    assert choice.finish_reason == "length"
    assert resp.usage.completion_tokens == 12
    assert resp.usage.prompt_tokens == ref.usage.prompt_tokens
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 12
    assert resp.id.startswith("chatcmpl-") and resp.object == "chat.completion" and resp.model == name

    chunks = list(oa.chat.completions.create(model=name, messages=CHAT, max_tokens=12, temperature=0, stream=True,
                                             stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.choices[0].text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])

    # On the wire: SSE events, the last one [DONE].
    raw = httpx.post(f"{stack.url}/v1/chat/completions", timeout=60,
                     json={"messages": CHAT, "max_tokens": 3, "temperature": 0, "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = sse_events(raw.text)
    assert events[-1] == "[DONE]" and all(json.loads(e)["object"] == "chat.completion.chunk" for e in events[:-1])


def test_chat_max_completion_tokens_stop_seed_and_n(oa, name) -> None:
    base = oa.chat.completions.create(model=name, messages=CHAT, max_completion_tokens=24, temperature=0)
    text = base.choices[0].message.content
    assert base.usage.completion_tokens == 24
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip(), text
    cut = oa.chat.completions.create(model=name, messages=CHAT, max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].model_extra["stop_reason"] == stop

    kw = dict(model=name, messages=CHAT, max_tokens=8, temperature=1.0, seed=1234, n=3)
    a = oa.chat.completions.create(**kw)
    b = oa.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len({c.message.content for c in a.choices}) > 1      # seed + i per completion
    assert a.usage.completion_tokens == 24


def test_chat_logprobs(oa, name) -> None:
    resp = oa.chat.completions.create(model=name, messages=CHAT, max_tokens=5, temperature=0, logprobs=True,
                                      top_logprobs=3)
    content = resp.choices[0].logprobs.content
    assert len(content) == 5
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        assert item.top_logprobs[0].logprob >= item.top_logprobs[-1].logprob
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob)   # greedy: the chosen one is the top one
        assert bytes(item.bytes).decode("utf-8", "replace") == item.token
    assert "".join(i.token for i in content) == resp.choices[0].message.content
    streamed = oa.chat.completions.create(model=name, messages=CHAT, max_tokens=5, temperature=0, logprobs=True,
                                          stream=True)
    tokens = [i.token for c in streamed if c.choices and c.choices[0].logprobs for i in c.choices[0].logprobs.content]
    assert tokens == [i.token for i in content]


def test_cached_prompt_tokens_are_reported(oa, name) -> None:
    messages = [{"role": "user", "content": "Looms and threads. " * 20}]
    oa.chat.completions.create(model=name, messages=messages, max_tokens=1, temperature=0)
    again = oa.chat.completions.create(model=name, messages=messages, max_tokens=1, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens >= 16


def test_speculative_request_keeps_output_and_reports_counters(oa, name) -> None:
    messages = [{"role": "user", "content": "Repeat: warp weft warp weft warp weft warp weft"}]
    plain = oa.chat.completions.create(model=name, messages=messages, max_tokens=16, temperature=0)
    fast = oa.chat.completions.create(model=name, messages=messages, max_tokens=16, temperature=0,
                                      extra_body={"num_speculative_tokens": 3})
    assert fast.choices[0].message.content == plain.choices[0].message.content
    spec = fast.choices[0].model_extra["spec_decode"]
    assert spec["num_accepted_tokens"] <= spec["num_draft_tokens"] <= 3 * spec["num_drafts"]
    assert "spec_decode" not in (plain.choices[0].model_extra or {})
    chunks = list(oa.chat.completions.create(model=name, messages=messages, max_tokens=16, temperature=0,
                                             stream=True, extra_body={"num_speculative_tokens": 3}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.choices[0].message.content
    assert [c.choices[0].model_extra["spec_decode"] for c in chunks if c.choices and c.choices[0].finish_reason]


# ---- OpenAI: completions ------------------------------------------------------------------------


def test_completions_text_tokens_logprobs_echo_and_several_prompts(oa, grpc_client, name) -> None:
    ref = grpc_client.generate("The weft thread", max_tokens=6, temperature=0)
    resp = oa.completions.create(model=name, prompt="The weft thread", max_tokens=6, temperature=0, logprobs=2)
    c = resp.choices[0]
    assert c.text == ref.choices[0].text and c.finish_reason == "length" and resp.object == "text_completion"
    assert len(c.logprobs.tokens) == 6 and len(c.logprobs.token_logprobs) == 6
    assert all(1 <= len(t) <= 2 for t in c.logprobs.top_logprobs)
    assert c.logprobs.text_offset[0] == 0

    ids = list(grpc_client.tokenize("The weft thread").token_ids)
    by_ids = oa.completions.create(model=name, prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == ref.choices[0].text

    echoed = oa.completions.create(model=name, prompt="The weft thread", max_tokens=6, temperature=0, echo=True)
    assert echoed.choices[0].text == "The weft thread" + ref.choices[0].text

    many = oa.completions.create(model=name, prompt=["The weft thread", "A loom"], max_tokens=4, temperature=0, n=2)
    assert [ch.index for ch in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text == ref.choices[0].text[: len(many.choices[0].text)]
    assert many.usage.completion_tokens == 16

    streamed = oa.completions.create(model=name, prompt=["The weft thread", "A loom"], max_tokens=4, temperature=0,
                                     stream=True, stream_options={"include_usage": True})
    texts: dict[int, str] = {}
    usage = None
    for chunk in streamed:
        for ch in chunk.choices:
            texts[ch.index] = texts.get(ch.index, "") + ch.text
        usage = chunk.usage or usage
    assert texts[0] == many.choices[0].text and texts[1] == many.choices[2].text
    assert usage.completion_tokens == 8


async def test_async_openai_client_chat_and_completions(stack, name) -> None:
    async with openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0) as client:
        chat, comp = await asyncio.gather(
            client.chat.completions.create(model=name, messages=CHAT, max_tokens=6, temperature=0),
            client.completions.create(model=name, prompt="Once upon", max_tokens=6, temperature=0))
        assert chat.usage.completion_tokens == 6 and comp.usage.completion_tokens == 6
        parts = []
        async for chunk in await client.chat.completions.create(model=name, messages=CHAT, max_tokens=6,
                                                                temperature=0, stream=True):
            parts.append(chunk.choices[0].delta.content or "")
        assert "".join(parts) == chat.choices[0].message.content
        parts = []
        async for chunk in await client.completions.create(model=name, prompt="Once upon", max_tokens=6,
                                                           temperature=0, stream=True):
            parts.append(chunk.choices[0].text)
        assert "".join(parts) == comp.choices[0].text


# ---- tokens ---------------------------------------------------------------------------------------


def test_tokenize_and_detokenize(stack, grpc_client) -> None:
    r = httpx.post(f"{stack.url}/v1/tokenize", json={"prompt": "hello world", "return_token_strs": True}).json()
    assert r["tokens"] == list(grpc_client.tokenize("hello world").token_ids) and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == CONTEXT and len(r["token_strs"]) == r["count"]
    chat = httpx.post(f"{stack.url}/tokenize", json={"messages": CHAT}).json()
    assert chat["tokens"] == list(grpc_client.tokenize(messages=CHAT).token_ids)
    text = httpx.post(f"{stack.url}/v1/detokenize", json={"tokens": r["tokens"]}).json()["prompt"]
    assert text.endswith("hello world")
    bad = httpx.post(f"{stack.url}/v1/detokenize", json={"tokens": [10**8]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


# ---- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("body, status, param", [
    ({"messages": CHAT, "temperature": -1}, 400, "temperature"),
    ({"messages": CHAT, "top_p": 0}, 400, "top_p"),
    ({"messages": CHAT, "n": 0}, 400, "n"),
    ({"messages": CHAT, "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": CHAT, "max_completion_tokens": 2**40}, 400, "max_completion_tokens"),
    ({"messages": CHAT, "seed": -5}, 400, "seed"),
    ({"messages": CHAT, "stop": [""]}, 400, "stop"),
    ({"messages": CHAT, "logprobs": True, "top_logprobs": 99}, 400, "top_logprobs"),
    ({"messages": CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
    ({"messages": []}, 400, "messages"),
    ({"messages": "hi"}, 400, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages[0].content[0].type"),
    ({"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice":
      {"type": "function", "function": {"name": "g"}}}, 400, "tool_choice"),
    ({"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     400, "tools[0].function.parameters"),
    ({"messages": CHAT, "logit_bias": {"one": 5}}, 400, "logit_bias"),
    ({"messages": CHAT, "logit_bias": {"1": -101}}, 400, "logit_bias"),
    ({"messages": CHAT, "temperature": "hot"}, 400, "temperature"),
    ({"messages": CHAT, "structured_outputs": {"regex": "a", "choice": ["b"]}}, 400, "structured_outputs"),
    ({"messages": CHAT, "guided_regex": "a", "guided_choice": ["b"]}, 400, "guided_choice"),
    ({"messages": CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, 400,
     "response_format.json_schema.schema"),
    ({"model": "no-such-model", "messages": CHAT}, 404, "model"),
])
def test_chat_errors_have_openai_shape_and_name_the_field(stack, body, status, param) -> None:
    r = httpx.post(f"{stack.url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param, err
    assert err["message"]
    if status == 404:
        assert err["code"] == "model_not_found"


def test_error_statuses_through_the_openai_client(oa, name, stack) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        oa.chat.completions.create(model=name, messages=CHAT, temperature=-1)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        oa.completions.create(model="gpt-4", prompt="hi")
    with pytest.raises(openai.BadRequestError):
        oa.completions.create(model=name, prompt="hi", suffix="x")
    r = httpx.post(f"{stack.url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(f"{stack.url}/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()


def test_full_queue_is_429(stack, oa, name, outcomes) -> None:
    core = stack.grpc.core
    # One request of 2*MAX_SEQS sequences: MAX_SEQS run, MAX_SEQS wait, and the queue is full.
    with httpx.stream("POST", f"{stack.url}/v1/completions", timeout=60, headers={"x-request-id": "fill"},
                      json={"prompt": "fill", "max_tokens": LONG, "ignore_eos": True, "n": 2 * MAX_SEQS,
                            "stream": True}) as held:
        lines = held.iter_lines()    # kept: a dropped line iterator closes the response
        next(lines)
        wait_until(lambda: core.num_waiting == MAX_SEQS or "fill" in outcomes._seen)
        assert core.num_waiting == MAX_SEQS, outcomes._seen.get("fill")
        with pytest.raises(openai.RateLimitError) as e:
            oa.completions.create(model=name, prompt="one more", max_tokens=1)
        assert e.value.response.headers["retry-after"]
        r = httpx.post(f"{stack.url}/api/generate", json={"prompt": "one more", "stream": False})
        assert r.status_code == 429 and "queue" in r.json()["error"]
    idle(stack)


# ---- disconnects ----------------------------------------------------------------------------------


def test_client_disconnect_aborts_a_streaming_request(stack, outcomes) -> None:
    for path, body in (("/v1/chat/completions", {"messages": CHAT, "stream": True}),
                       ("/v1/completions", {"prompt": "abort me", "stream": True}),
                       ("/api/generate", {"prompt": "abort me"}),
                       ("/api/chat", {"messages": CHAT})):
        rid = f"disconnect-stream-{path.replace('/', '-')}"
        body = {**body, "max_tokens": LONG, "ignore_eos": True, "options": {"num_predict": LONG}}
        if path.startswith("/api"):
            body.pop("max_tokens")
        with httpx.stream("POST", stack.url + path, json=body, headers={"x-request-id": rid}, timeout=60) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            next(lines)
            assert not stack.grpc.core.pool_is_whole()
        # Closing the response closed the connection: the shim cancels the gRPC call.
        outcomes.wait_for(rid, "cancelled")
        idle(stack)


def test_client_disconnect_aborts_a_non_streaming_request(stack, outcomes) -> None:
    rid = "disconnect-unary"
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{stack.url}/v1/completions", headers={"x-request-id": rid}, timeout=1.0,
                   json={"prompt": "abort me", "max_tokens": LONG, "ignore_eos": True})
    outcomes.wait_for(rid, "cancelled")
    idle(stack)


# ---- Ollama ---------------------------------------------------------------------------------------


def test_ollama_generate_and_chat(ol, name, grpc_client) -> None:
    opts = {"num_predict": 8, "temperature": 0}
    resp = ol.generate(model=name, prompt="Tell me about looms.", options=opts)
    ref = grpc_client.generate(CHAT, max_tokens=8, temperature=0)   # Ollama applies the chat template
    assert resp.response == ref.choices[0].text
    assert resp.done and resp.done_reason == "length" and resp.eval_count == 8
    assert resp.prompt_eval_count == ref.usage.prompt_tokens and resp.total_duration > 0
    assert len(resp.context) == ref.usage.prompt_tokens + 8

    parts = list(ol.generate(model=f"{name}:latest", prompt="Tell me about looms.", options=opts, stream=True))
    assert "".join(p.response for p in parts) == resp.response
    assert parts[-1].done and not any(p.done for p in parts[:-1]) and parts[-1].eval_count == 8

    raw = ol.generate(model=name, prompt="The weft thread", raw=True, options=opts)
    assert raw.response == grpc_client.generate("The weft thread", max_tokens=8, temperature=0).choices[0].text
    more = ol.generate(model=name, prompt=" and", context=raw.context, raw=True, options=opts)
    assert more.prompt_eval_count == len(raw.context) + len(grpc_client.tokenize(" and", add_special_tokens=False)
                                                            .token_ids)

    chat = ol.chat(model=name, messages=CHAT, options=opts)
    assert chat.message.role == "assistant" and chat.message.content == ref.choices[0].text
    assert chat.done_reason == "length"
    streamed = list(ol.chat(model=name, messages=CHAT, options=opts, stream=True))
    assert "".join(p.message.content for p in streamed) == chat.message.content
    assert streamed[-1].done


def test_ollama_options_and_errors(ol, name, stack) -> None:
    opts = {"num_predict": 6, "temperature": 1.0, "seed": 7, "top_k": 50, "top_p": 0.95, "min_p": 0.01,
            "repeat_penalty": 1.1, "presence_penalty": 0.2, "frequency_penalty": 0.2}
    a = ol.generate(model=name, prompt="Tell me about looms.", options=opts)
    b = ol.generate(model=name, prompt="Tell me about looms.", options=opts)
    assert a.response == b.response and a.eval_count == 6
    text = ol.generate(model=name, prompt="x", raw=True, options={"num_predict": 20, "temperature": 0}).response
    stop = text[len(text) // 2: len(text) // 2 + 3]
    cut = ol.generate(model=name, prompt="x", raw=True, options={"num_predict": 20, "temperature": 0, "stop": [stop]})
    assert cut.response == text[: text.index(stop)] and cut.done_reason == "stop"

    with pytest.raises(ollama.ResponseError) as e:
        ol.generate(model="llama3", prompt="hi")
    assert e.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as e:
        ol.chat(model=name, messages=CHAT, options={"temperature": -1})
    assert e.value.status_code == 400 and "options.temperature" in e.value.error
    r = httpx.post(f"{stack.url}/api/generate", json={"model": name, "prompt": "hi", "format": "yaml"})
    assert r.status_code == 400 and r.json()["error"].startswith("format:")
    loaded = ol.generate(model=name, prompt="")
    assert loaded.done and loaded.done_reason == "load"


def test_ollama_tags_show_ps_version(ol, name, stack) -> None:
    assert [m.model for m in ol.list().models] == [name]
    show = ol.show(name)
    assert show.modelinfo["weft.context_length"] == CONTEXT and show.details.family == "llama"
    assert [m.model for m in ol.ps().models] == [name]
    assert httpx.get(f"{stack.url}/api/version").json()["version"]
    with pytest.raises(ollama.ResponseError) as e:
        ol.show("other-model")
    assert e.value.status_code == 404


# ---- guided decoding: what the shim sends -----------------------------------------------------------


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def _guided(**fields) -> tuple[guided_pb2.GuidedDecoding | None, str | None]:
    return openai_guided(ChatCompletionRequest.model_validate({"messages": CHAT, **fields}))


def test_openai_and_vllm_guided_fields_become_the_grpc_guided_message() -> None:
    g, param = _guided(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}})
    assert json.loads(g.json_schema) == SCHEMA and param == "response_format.json_schema.schema"
    g, _ = _guided(response_format={"type": "json_object"})
    assert g.WhichOneof("kind") == "json_object"
    assert _guided(response_format={"type": "text"}) == (None, None)
    g, param = _guided(structured_outputs={"json": SCHEMA})
    assert json.loads(g.json_schema) == SCHEMA and param == "structured_outputs.json"
    assert _guided(structured_outputs={"regex": "[a-z]+"})[0].regex == "[a-z]+"
    assert list(_guided(structured_outputs={"choice": ["yes", "no"]})[0].choice.choices) == ["yes", "no"]
    lark = _guided(structured_outputs={"grammar": 'start: "a"+'})[0].grammar
    assert lark.syntax == guided_pb2.Grammar.LARK and lark.definition == 'start: "a"+'
    assert _guided(structured_outputs={"grammar": 'root ::= "a"+'})[0].grammar.syntax == guided_pb2.Grammar.GBNF
    assert _guided(structured_outputs={"json_object": True})[0].WhichOneof("kind") == "json_object"
    g, param = _guided(guided_json=json.dumps(SCHEMA))
    assert json.loads(g.json_schema) == SCHEMA and param == "guided_json"
    assert _guided(guided_regex="\\d+")[0].regex == "\\d+"
    assert list(_guided(guided_choice=["a", "b"])[0].choice.choices) == ["a", "b"]
    assert _guided(guided_grammar='start: "x"')[0].grammar.definition == 'start: "x"'
    with pytest.raises(HttpError) as e:
        _guided(response_format={"type": "json_object"}, guided_regex="x")
    assert e.value.param == "guided_regex"
    comp = CompletionRequest.model_validate({"prompt": "x", "guided_choice": ["a"]})
    assert list(openai_guided(comp)[0].choice.choices) == ["a"]
    assert ollama_guided("json").WhichOneof("kind") == "json_object"
    assert json.loads(ollama_guided(SCHEMA).json_schema) == SCHEMA
    assert ollama_guided("") is None and ollama_guided(None) is None


def test_guided_requests_reach_the_server(stack, name) -> None:
    """Every guided dialect reaches the engine's guided decoding and the output follows it."""
    import jsonschema

    for body in (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}},
        {"structured_outputs": {"choice": ["yes", "no"]}},
        {"guided_regex": "[ab]{3}"},
    ):
        r = httpx.post(f"{stack.url}/v1/chat/completions", timeout=60,
                       json={"messages": CHAT, "max_tokens": 64, "temperature": 0, **body})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        out = choice["message"]["content"]
        if "structured_outputs" in body:
            assert out in ("yes", "no")
        elif "guided_regex" in body:
            assert len(out) == 3 and set(out) <= {"a", "b"}
        elif choice["finish_reason"] == "stop":
            jsonschema.validate(json.loads(out), SCHEMA)
    r = httpx.post(f"{stack.url}/api/generate", json={"prompt": "hi", "format": SCHEMA, "stream": False,
                                                      "options": {"num_predict": 20}}, timeout=60)
    assert r.status_code == 200, r.text


# ---- auth, loading, mid-stream errors ---------------------------------------------------------------


def test_api_key_is_required_when_set(stack, name) -> None:
    keyed = stack.extra_http(api_key=API_KEY)
    url = f"http://127.0.0.1:{keyed.port}"
    try:
        for key in (None, "wrong"):
            headers = {"authorization": f"Bearer {key}"} if key else {}
            r = httpx.post(f"{url}/v1/chat/completions", json={"messages": CHAT, "max_tokens": 1}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            r = httpx.post(f"{url}/api/chat", json={"messages": CHAT}, headers=headers)
            assert r.status_code == 401 and "API key" in r.json()["error"]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)
        assert client.chat.completions.create(model=name, messages=CHAT, max_tokens=2).usage.completion_tokens == 2
        ol = ollama.Client(host=url, headers={"authorization": f"Bearer {API_KEY}"})
        assert ol.generate(model=name, prompt="hi", options={"num_predict": 2}).eval_count == 2
        assert httpx.get(f"{url}/health").status_code == 200        # probes need no key
        assert httpx.get(f"{url}/metrics").status_code == 200
    finally:
        stack.grpc.call(keyed.stop())


def test_503_while_the_model_loads(stack) -> None:
    loading = WeftServer(ServerOptions(host="127.0.0.1", port=0))   # listening, no model yet
    port = stack.grpc.call(loading.start())
    http = stack.extra_http(target=f"127.0.0.1:{port}")
    url = f"http://127.0.0.1:{http.port}"
    try:
        r = httpx.get(f"{url}/health")
        assert r.status_code == 503 and r.json()["status"] == "not_serving"
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.InternalServerError) as e:
            client.chat.completions.create(model="m", messages=CHAT)
        assert e.value.status_code == 503 and e.value.response.headers["retry-after"]
        r = httpx.post(f"{url}/api/generate", json={"prompt": "hi"})
        assert r.status_code == 503 and "loading" in r.json()["error"]
    finally:
        stack.grpc.call(http.stop())
        stack.grpc.call(loading.stop(0))


class _FailingServicer(pb_grpc.InferenceServiceServicer):
    """Streams one delta, then fails: what a mid-stream server error looks like to the shim."""

    async def GetModelInfo(self, request, context):
        return pb.GetModelInfoResponse(model=pb.ModelInfo(name="failing", max_model_len=64))

    async def GenerateStream(self, request, context):
        yield pb.GenerateStreamResponse(request_id="r", choice=pb.Choice(index=0, text="Hel", token_ids=[1]))
        await context.abort(grpc.StatusCode.INTERNAL, "generation failed: the engine broke")


def test_mid_stream_error_is_an_sse_error_event(stack) -> None:
    async def serve() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        pb_grpc.add_InferenceServiceServicer_to_server(_FailingServicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = stack.grpc.call(serve())
    http = stack.extra_http(target=f"127.0.0.1:{port}")
    url = f"http://127.0.0.1:{http.port}"
    try:
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": CHAT, "stream": True})
        assert r.status_code == 200
        events = sse_events(r.text)
        assert json.loads(events[0])["choices"][0]["delta"]["content"] == "Hel"
        err = json.loads(events[-2])["error"]
        assert err["type"] == "server_error" and "engine broke" in err["message"]
        assert events[-1] == "[DONE]"
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIError, match="engine broke"):
            for _ in client.completions.create(model="failing", prompt="x", stream=True):
                pass
        with pytest.raises(ollama.ResponseError, match="engine broke"):
            for _ in ollama.Client(host=url).chat(model="failing", messages=CHAT, stream=True):
                pass
    finally:
        stack.grpc.call(http.stop())
        stack.grpc.call(server.stop(0))


# ---- metrics ----------------------------------------------------------------------------------------


def test_metrics(stack, oa, name) -> None:
    oa.chat.completions.create(model=name, messages=CHAT, max_tokens=4, temperature=0)
    oa.chat.completions.create(model=name, messages=[{"role": "user", "content": "Repeat: warp weft warp weft warp weft"}],
                               max_tokens=16, temperature=0, extra_body={"num_speculative_tokens": 3})
    text = httpx.get(f"{stack.url}/metrics").text

    def value(sample: str) -> float:
        for line in text.splitlines():
            if line.startswith(sample + " "):
                return float(line.split()[-1])
        raise AssertionError(f"{sample} not in /metrics")

    assert value("weft_time_to_first_token_seconds_count") >= 1
    assert value("weft_time_per_output_token_seconds_count") >= 1
    assert value("weft_e2e_request_latency_seconds_count") >= 1
    assert value('weft_request_finished_total{finish_reason="length"}') >= 1
    assert value('weft_requests_total{outcome="ok"}') >= 1
    assert value("weft_generation_tokens_total") >= 4
    assert value("weft_num_requests_running") == 0 and value("weft_num_requests_waiting") == 0
    assert 0 <= value("weft_kv_cache_usage_ratio") <= 1
    assert value("weft_prefix_cache_queries_total") >= value("weft_prefix_cache_hits_total") > 0
    drafts, accepted = value("weft_spec_decode_num_drafts_total"), value("weft_spec_decode_num_accepted_tokens_total")
    assert accepted <= value("weft_spec_decode_num_draft_tokens_total") <= 3 * drafts
    assert value("weft_spec_decode_mean_acceptance_length") == pytest.approx(1 + accepted / max(drafts, 1), rel=1e-6)
    assert value("weft_spec_decode_num_disabled_requests_total") >= 0
    assert value("weft_lora_adapters_loaded") == value("weft_lora_adapters_resident") == 0   # LoRA is off here
    assert value("weft_guided_compile_seconds_count") >= 0
    assert value('weft_http_requests_total{route="/v1/chat/completions",status="200"}') >= 1


def test_http_connections_are_nodelay() -> None:
    """Nagle would hold each stream's first SSE event behind the response headers until the
    client's delayed ACK (+40 ms to the first token on a kept-alive connection): asyncio turns it
    off only for connections of a socket whose proto is TCP, which is how the shim listens."""
    import socket

    from service.shim.app import _listen

    sock = _listen("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
        with socket.create_connection(sock.getsockname()):
            conn, _ = sock.accept()
            with conn:
                assert conn.proto == socket.IPPROTO_TCP
                assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        sock.close()
