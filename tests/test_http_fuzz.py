"""Property-based fuzzing of the REST shim: hypothesis builds request bodies from the shim's own
request models (every field, with plausible values, junk values of any JSON type, and unknown
extra fields) and posts them to a real server. Whatever the body, the answer is never a 5xx,
never a mid-stream server error, and the server keeps serving.

The model's context is 96 tokens, so no fuzzed request generates for long; the examples are
derandomized (the same bodies every run) and bounded in number.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from service.config import EngineConfig
from service.shim.models import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    OllamaChatRequest,
    OllamaEmbeddingsRequest,
    OllamaEmbedRequest,
    OllamaGenerateRequest,
    OllamaShowRequest,
    TokenizeRequest,
)
from tests.test_http_shim import ShimStack, idle

CONTEXT = 96
EXAMPLES = int(os.environ.get("WEFT_FUZZ_EXAMPLES", "60"))   # per endpoint

# Any JSON value (NaN and infinities included: Python's json writes and reads them).
scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.integers(-3, 40)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
any_json = st.recursive(scalars, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids,
                                                                                           max_size=3), max_leaves=8)
small_ints = st.integers(-3, 40) | st.integers(-(2**65), 2**65)
numbers = st.floats(-3, 3) | st.floats(allow_nan=True, allow_infinity=True) | st.integers(-3, 3)
words = st.text(max_size=16)
roles = st.sampled_from(["system", "developer", "user", "assistant", "tool", "robot", ""])
token_ids = st.lists(st.integers(-2, 50000) | st.integers(2**31, 2**33), max_size=6)
schema = st.sampled_from([{"type": "object"}, {"type": "object", "properties": {"a": {"type": "integer"}}},
                          {"type": "strange"}, {}, {"$ref": "#/nowhere"}])
message = st.fixed_dictionaries({"role": roles}, optional={
    "content": words | st.none() | st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"])},
                                                                  optional={"text": words}), max_size=2),
    "images": st.lists(words, max_size=1), "name": words})
options = st.fixed_dictionaries({}, optional={
    k: (small_ints if k in ("top_k", "seed", "num_predict") else words | st.lists(words, max_size=2) if k == "stop"
        else numbers) | any_json
    for k in ("temperature", "top_p", "top_k", "min_p", "seed", "num_predict", "stop", "repeat_penalty",
              "presence_penalty", "frequency_penalty", "num_ctx")})

PLAUSIBLE: dict[str, st.SearchStrategy[Any]] = {
    "messages": st.lists(message, max_size=3),
    "prompt": st.one_of(st.text(min_size=1, max_size=16), st.text(min_size=1, max_size=16),
                        st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=2),
                        st.lists(st.integers(0, 49151), min_size=1, max_size=6), token_ids),
    "tokens": st.lists(st.integers(0, 49151), max_size=6) | token_ids,
    "context": token_ids,
    "stop": words | st.lists(words, max_size=3),
    "stop_token_ids": token_ids,
    "response_format": st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "json_schema", "xml"])},
                                             optional={"json_schema": st.fixed_dictionaries(
                                                 {"name": words}, optional={"schema": schema | words})}),
    "structured_outputs": st.fixed_dictionaries({}, optional={
        "json": schema, "regex": st.sampled_from(["[ab]+", "(", "\\d{2}"]), "choice": st.lists(words, max_size=2),
        "grammar": st.sampled_from(['start: "a"', 'root ::= "a"', "???"]), "json_object": st.booleans()}),
    "guided_json": schema | words,
    "guided_regex": st.sampled_from(["[ab]+", "(", ""]),
    "guided_choice": st.lists(words, max_size=2),
    "guided_grammar": st.sampled_from(['start: "a"', "root ::= x"]),
    "format": st.sampled_from(["json", "", "yaml"]) | schema,
    "options": options,
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans() | any_json}),
    "logit_bias": st.dictionaries(words | st.integers(-2, 49155).map(str), numbers, max_size=2),
    "tools": st.lists(st.fixed_dictionaries({"type": st.just("function")}), max_size=1),
    "model": st.sampled_from(["", "", "nope", "llama:latest"]) | st.none(),
    "name": st.sampled_from(["", "nope"]) | st.none(),
    "suffix": st.sampled_from(["", "end"]) | st.none(),
    "template": st.sampled_from(["", "{{ .Prompt }}"]) | st.none(),
    "system": words | st.none(),
    "think": st.booleans() | st.none(),
    "verbose": st.booleans(),
    "keep_alive": st.sampled_from(["5m", 0, -1, "0s"]) | st.none(),
    "user": words,
    "cache_salt": words,
    "images": st.none() | st.just([]) | st.lists(words, max_size=1),
}
_INT_FIELDS = {"max_tokens": (1, 24), "max_completion_tokens": (1, 24), "n": (1, 3), "seed": (0, 2**40),
               "top_k": (-1, 60), "top_logprobs": (0, 5), "best_of": (1, 3), "num_speculative_tokens": (0, 4)}
_FLOAT_FIELDS = {"temperature": (0, 2), "top_p": (0.05, 1), "min_p": (0, 0.5), "repetition_penalty": (0.5, 2),
                 "presence_penalty": (-2, 2), "frequency_penalty": (-2, 2)}
_BOOL_FIELDS = {"stream", "echo", "ignore_eos", "include_stop_str_in_output", "skip_special_tokens", "raw",
                "add_generation_prompt", "add_special_tokens", "return_token_strs", "return_token_ids"}


def plausible(name: str, model: type[BaseModel]) -> st.SearchStrategy[Any]:
    """Values of the right type in a sensible range (a few still out of range)."""
    if name == "logprobs":   # bool in chat, int in completions
        return st.booleans() if model is ChatCompletionRequest else st.integers(0, 5)
    if name in PLAUSIBLE:
        return PLAUSIBLE[name]
    if name in _INT_FIELDS:
        lo, hi = _INT_FIELDS[name]
        return st.integers(lo, hi)
    if name in _FLOAT_FIELDS:
        lo, hi = _FLOAT_FIELDS[name]
        return st.floats(lo, hi)
    if name in _BOOL_FIELDS:
        return st.booleans()
    return words


def junk(name: str) -> st.SearchStrategy[Any]:
    """Edge and wrong values: out-of-range numbers, NaN, wrong types, any JSON."""
    edges: list[st.SearchStrategy[Any]] = [any_json]
    if name in _INT_FIELDS or name == "logprobs":
        edges.append(small_ints)
    if name in _FLOAT_FIELDS:
        edges.append(numbers)
    return st.one_of(*edges)


@st.composite
def _object(draw: Any, model: type[BaseModel]) -> dict[str, Any]:
    names = [f.alias or n for n, f in model.model_fields.items()]
    required = [f.alias or n for n, f in model.model_fields.items() if f.is_required()]
    optional = [n for n in names if n not in required]
    chosen = required + draw(st.lists(st.sampled_from(optional), max_size=6, unique=True))
    body = {n: draw(plausible(n, model)) for n in chosen}
    for n in draw(st.lists(st.sampled_from(names + ["unknown_field"]), max_size=2, unique=True)):
        body[n] = draw(junk(n))   # zero to two fields made wrong
    return body


def bodies(model: type[BaseModel]) -> st.SearchStrategy[Any]:
    return st.one_of(_object(model), _object(model), _object(model), _object(model), any_json)


ENDPOINTS = [
    ("/v1/chat/completions", ChatCompletionRequest),
    ("/v1/completions", CompletionRequest),
    ("/api/generate", OllamaGenerateRequest),
    ("/api/chat", OllamaChatRequest),
    ("/v1/tokenize", TokenizeRequest),
    ("/v1/detokenize", DetokenizeRequest),
    ("/api/show", OllamaShowRequest),
    ("/v1/embeddings", EmbeddingRequest),
    ("/api/embed", OllamaEmbedRequest),
    ("/api/embeddings", OllamaEmbeddingsRequest),
]


@pytest.fixture(scope="module")
def stack(tiny_llama) -> Iterator[ShimStack]:
    config = EngineConfig(model=str(tiny_llama), num_blocks=256, max_model_len=CONTEXT, progress=False)
    s = ShimStack.start(config)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def http(stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, timeout=60) as client:
        yield client


def _post(http: httpx.Client, path: str, body: Any) -> None:
    content = json.dumps(body, allow_nan=True).encode()
    with http.stream("POST", path, content=content, headers={"content-type": "application/json"}) as r:
        text = r.read().decode("utf-8", "replace")
    assert r.status_code < 500, f"{path} {body!r} -> {r.status_code} {text[:500]}"
    if r.status_code != 200:
        err = json.loads(text)["error"]
        assert err if path.startswith("/api/") else err["message"] and err["type"], text
        return
    ctype = r.headers.get("content-type", "")
    if ctype.startswith("text/event-stream"):
        events = [line[6:] for line in text.split("\n") if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", text[-300:]
        for e in events[:-1]:
            assert "error" not in json.loads(e), e
    elif ctype.startswith("application/x-ndjson"):
        lines = [json.loads(line) for line in text.splitlines() if line.strip()]
        assert lines and lines[-1]["done"], text[-300:]
        assert not any("error" in line for line in lines), text[-300:]
    else:
        json.loads(text)


@pytest.mark.parametrize("path, model", ENDPOINTS, ids=[p for p, _ in ENDPOINTS])
def test_fuzzed_bodies_never_get_a_5xx(stack, http, path, model) -> None:
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, print_blob=True,
              suppress_health_check=list(HealthCheck))
    @given(body=bodies(model))
    def check(body: Any) -> None:
        _post(http, path, body)

    check()
    # Still serving, and nothing left behind.
    r = http.post("/v1/completions", json={"prompt": "still there?", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    idle(stack)


def test_numbers_json_cannot_carry_are_refused_cleanly(http) -> None:
    for value in (math.nan, math.inf, -math.inf):
        _post(http, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "temperature": value})
