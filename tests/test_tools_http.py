"""Tool calls through the REST shim of a real `weft serve` (SmolLM2, whose chat template knows
nothing of tools), driven by the official `openai` and `ollama` clients: every tool_choice mode,
streamed deltas that reassemble into exactly the unary calls, parallel calls, the legacy
functions, a two-turn exchange, sampled calls that all validate, bad tools refused naming the field."""
from __future__ import annotations

import json

import httpx
import jsonschema
import ollama
import openai
import pytest

from tests.test_tools_grpc import ASK, SCHEMAS, TOOLS

# A prompt on which greedy SmolLM2 opens a call by itself in auto mode (found by trying a few):
# the auto tests then check a real auto-mode call, not only the plain-text branch.
CALLS_BY_ITSELF = [{"role": "system", "content": "Answer by calling a function."},
                   {"role": "user", "content": "Book a flight from Paris to Rome for 2 people."}]
CHOICES = ["required", {"type": "function", "function": {"name": "get_weather"}},
           {"type": "function", "function": {"name": "book_flight"}}]


@pytest.fixture(scope="module")
def oa(smollm2_served: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{smollm2_served}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def ol(smollm2_served: str) -> ollama.Client:
    return ollama.Client(host=smollm2_served, timeout=300)


@pytest.fixture(scope="module")
def model(oa: openai.OpenAI) -> str:
    return oa.models.list().data[0].id


def _valid_openai(calls) -> None:
    assert calls
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_")
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])


def _reassemble(stream) -> tuple[str | None, list[tuple[str, str, str]], str | None, object]:
    """OpenAI chunks -> (content, [(id, name, arguments)], finish_reason, usage), the way clients
    put deltas back together: a call's index, id and name first, then its arguments in pieces."""
    content, calls, reason, usage = None, {}, None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            if ch.delta.content:
                content = (content or "") + ch.delta.content
            for piece in ch.delta.tool_calls or ():
                if piece.index not in calls:
                    assert piece.id and piece.function.name, "a call's first delta carries its id and name"
                    calls[piece.index] = [piece.id, piece.function.name, ""]
                else:
                    assert piece.id is None and piece.function.name is None
                calls[piece.index][2] += piece.function.arguments or ""
            reason = ch.finish_reason or reason
    return content, [tuple(calls[i]) for i in sorted(calls)], reason, usage


@pytest.mark.parametrize("choice", CHOICES, ids=["required", "get_weather", "book_flight"])
def test_openai_required_and_named_stream_the_same_calls(oa, model, choice) -> None:
    kw = dict(model=model, messages=ASK, tools=TOOLS, tool_choice=choice, temperature=0, max_tokens=96)
    msg = (c := oa.chat.completions.create(**kw).choices[0]).message
    assert c.finish_reason == "tool_calls" and msg.content is None
    _valid_openai(msg.tool_calls)
    if isinstance(choice, dict):
        assert {t.function.name for t in msg.tool_calls} == {choice["function"]["name"]}
    content, calls, reason, usage = _reassemble(
        oa.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert (content, reason) == (None, "tool_calls")
    # Ids are drawn per response; names and arguments are the same greedy output.
    assert [(n, a) for _, n, a in calls] == [(t.function.name, t.function.arguments) for t in msg.tool_calls]
    assert usage is not None and usage.completion_tokens > 0


def test_openai_auto_calls_by_itself_and_streams_the_same(oa, model) -> None:
    kw = dict(model=model, messages=CALLS_BY_ITSELF, tools=TOOLS, temperature=0, max_tokens=96)
    c = oa.chat.completions.create(**kw).choices[0]
    assert c.finish_reason == "tool_calls"
    _valid_openai(c.message.tool_calls)
    assert "<tool_call>" not in (c.message.content or "")
    content, calls, reason, _ = _reassemble(oa.chat.completions.create(**kw, stream=True))
    assert (content, reason) == (c.message.content, "tool_calls")
    assert [(n, a) for _, n, a in calls] == [(t.function.name, t.function.arguments) for t in c.message.tool_calls]


def test_openai_none_and_auto_without_a_call_answer_in_text(oa, model) -> None:
    for choice in ("none", "auto"):
        c = oa.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice=choice,
                                       temperature=0, max_tokens=24).choices[0]
        if c.message.tool_calls:       # auto may call; then the call must be valid
            assert choice == "auto" and c.finish_reason == "tool_calls"
            _valid_openai(c.message.tool_calls)
        else:
            assert c.message.content and c.finish_reason in ("stop", "length")
            assert "<tool_call>" not in c.message.content


def test_openai_parallel_calls(oa, model) -> None:
    kw = dict(model=model, messages=ASK, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=160)
    several = oa.chat.completions.create(**kw).choices[0].message.tool_calls
    _valid_openai(several)
    assert len(several) >= 2 and len({t.id for t in several}) == len(several)
    one = oa.chat.completions.create(**kw, parallel_tool_calls=False).choices[0].message.tool_calls
    _valid_openai(one)
    assert len(one) == 1


def test_openai_sampled_calls_all_validate(oa, model) -> None:
    """Temperature 1.0, n=8 per mode, unary and streamed: every call returned validates."""
    for choice in ("required", "auto"):
        for messages in (ASK, CALLS_BY_ITSELF):
            kw = dict(model=model, messages=messages, tools=TOOLS, tool_choice=choice, temperature=1.0, n=8,
                      seed=11, max_tokens=96)
            resp = oa.chat.completions.create(**kw)
            assert len(resp.choices) == 8
            for c in resp.choices:
                if choice == "required":
                    assert c.finish_reason == "tool_calls"
                if c.message.tool_calls:
                    _valid_openai(c.message.tool_calls)
            chunks = list(oa.chat.completions.create(**kw, stream=True))
            for i in range(8):
                _, calls, reason, _ = _reassemble(
                    [ch.model_copy(update={"choices": [x for x in ch.choices if x.index == i]}) for ch in chunks])
                for _, name, args in calls:
                    jsonschema.validate(json.loads(args), SCHEMAS[name])
                assert reason == ("tool_calls" if calls else reason)


def test_openai_two_turn_exchange(oa, model) -> None:
    first = oa.chat.completions.create(model=model, messages=ASK, tools=TOOLS, temperature=0, max_tokens=64,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = first.choices[0].message.tool_calls[0]
    history = [*ASK, first.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id,
                "content": [{"type": "text", "text": json.dumps({"temperature": 18, "sky": "clear"})}]}]
    answer = oa.chat.completions.create(model=model, messages=history, tools=TOOLS, tool_choice="none",
                                        temperature=0, max_tokens=40).choices[0]
    assert answer.message.content and not answer.message.tool_calls
    # The rendered prompt carries the call and the tool's answer (Weft's tool prompt: the call in
    # the assistant turn, the result as <tool_response>), through the shim's /tokenize.
    base = str(oa.base_url).rstrip("/")
    ids = httpx.post(f"{base}/tokenize", json={"model": model, "messages": history}, timeout=60).json()["tokens"]
    text = httpx.post(f"{base}/detokenize", json={"model": model, "tokens": ids}, timeout=60).json()["prompt"]
    assert json.dumps(json.loads(call.function.arguments)) in text and "<tool_response>" in text
    assert json.dumps(json.dumps({"temperature": 18, "sky": "clear"})) in text   # the result, as JSON text


def test_openai_legacy_functions(oa, model) -> None:
    fns = [t["function"] for t in TOOLS]
    msg = oa.chat.completions.create(model=model, messages=ASK, functions=fns, function_call={"name": "get_weather"},
                                     temperature=0, max_tokens=64).choices[0]
    assert msg.finish_reason == "function_call" and msg.message.function_call.name == "get_weather"
    jsonschema.validate(json.loads(msg.message.function_call.arguments), SCHEMAS["get_weather"])


@pytest.mark.parametrize(("body", "param"), [
    (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_news"}}), "tool_choice"),
    (dict(tool_choice="required"), "tool_choice"),
    (dict(tools=[TOOLS[0], TOOLS[0]]), "tools[1].function.name"),
    (dict(tools=[TOOLS[0], {"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]),
     "tools[1].function.parameters"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "array", "uniqueItems": True}}}}}]),
     "tools[0].function.parameters"),
    (dict(tools=[{"type": "retrieval"}]), "tools[0].type"),
    (dict(tools=TOOLS, messages=[*ASK, {"role": "tool", "tool_call_id": "call_nope", "content": "18"}]),
     "messages[1].tool_call_id"),
])
def test_bad_tools_are_400_naming_the_field(smollm2_served, oa, model, body, param) -> None:
    r = httpx.post(f"{smollm2_served}/v1/chat/completions", timeout=60,
                   json={"model": model, "messages": ASK, "max_tokens": 8, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()
    assert r.json()["error"]["message"].startswith(param + ":")
    ok = oa.chat.completions.create(model=model, messages=ASK, max_tokens=2, temperature=0)
    assert ok.choices[0].finish_reason == "length"   # still serving


# ---- Ollama -------------------------------------------------------------------------------------


# What the server is given: the `ollama` client keeps only type / properties (type, description,
# enum, items) / required of a tool's parameters, so bounds and additionalProperties never reach it.
OLLAMA_SCHEMAS = {t["function"]["name"]: ollama.Tool.model_validate(t).model_dump(exclude_none=True)["function"]
                  ["parameters"] for t in TOOLS}


def _valid_ollama(calls) -> None:
    assert calls
    for c in calls:
        assert isinstance(c.function.arguments, dict)
        jsonschema.validate(c.function.arguments, OLLAMA_SCHEMAS[c.function.name])


def test_ollama_tools_unary_and_streamed(ol, model) -> None:
    opts = {"temperature": 0, "num_predict": 96}
    r = ol.chat(model=model, messages=CALLS_BY_ITSELF, tools=TOOLS, options=opts)
    _valid_ollama(r.message.tool_calls)
    text, calls = "", []
    for chunk in ol.chat(model=model, messages=CALLS_BY_ITSELF, tools=TOOLS, options=opts, stream=True):
        text += chunk.message.content or ""
        calls += chunk.message.tool_calls or []
    assert text == r.message.content
    assert [(c.function.name, c.function.arguments) for c in calls] == \
        [(c.function.name, c.function.arguments) for c in r.message.tool_calls]


def test_ollama_two_turns_and_sampled(ol, model) -> None:
    first = ol.chat(model=model, messages=CALLS_BY_ITSELF, tools=TOOLS, options={"temperature": 0, "num_predict": 96})
    call = first.message.tool_calls[0]
    history = [*CALLS_BY_ITSELF, first.message,
               {"role": "tool", "tool_name": call.function.name, "content": json.dumps({"booked": True})}]
    answer = ol.chat(model=model, messages=history, options={"temperature": 0, "num_predict": 32})
    assert answer.message.content and not answer.message.tool_calls
    for seed in range(6):
        r = ol.chat(model=model, messages=CALLS_BY_ITSELF, tools=TOOLS,
                    options={"temperature": 1.0, "seed": seed, "num_predict": 96})
        for c in r.message.tool_calls or ():
            jsonschema.validate(c.function.arguments, OLLAMA_SCHEMAS[c.function.name])


def test_ollama_show_lists_the_tools_capability(ol, model) -> None:
    assert "tools" in (ol.show(model).capabilities or [])


def test_ollama_api_enforces_the_whole_schema(smollm2_served, model) -> None:
    """Sent as JSON (not through the `ollama` client, which drops bounds), the full schemas hold."""
    for seed in range(6):
        r = httpx.post(f"{smollm2_served}/api/chat", timeout=120, json={
            "model": model, "messages": CALLS_BY_ITSELF, "tools": TOOLS, "stream": False,
            "options": {"temperature": 1.0, "seed": seed, "num_predict": 96}})
        assert r.status_code == 200, r.text
        for c in r.json()["message"].get("tool_calls", []):
            jsonschema.validate(c["function"]["arguments"], SCHEMAS[c["function"]["name"]])
