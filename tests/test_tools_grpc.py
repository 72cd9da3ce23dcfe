"""Tool calls over gRPC on the real SmolLM2 (whose chat template knows nothing of tools): every
returned call parses and validates, in every mode, streamed or not; bad tools are refused
naming the field and the server keeps serving."""
from __future__ import annotations

import json
from collections.abc import Iterator

import grpc
import jsonschema
import pytest

from clients.client import NO_RETRY, WeftClient, add_tool_call_piece
from clients.weft.v1 import inference_pb2 as pb
from service.config import EngineConfig
from service.server import BackgroundServer, ServerOptions

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
           "required": ["city"], "additionalProperties": False}
FLIGHT = {"type": "object", "properties": {"origin": {"type": "string", "maxLength": 30},
                                           "destination": {"type": "string", "maxLength": 30},
                                           "passengers": {"type": "integer", "minimum": 1, "maximum": 9}},
          "required": ["origin", "destination", "passengers"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "book_flight", "description": "Book a flight",
                                           "parameters": FLIGHT}}]
SCHEMAS = {"get_weather": WEATHER, "book_flight": FLIGHT}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]


@pytest.fixture(scope="module")
def server(smollm2_dir) -> Iterator[BackgroundServer]:
    srv = BackgroundServer(ServerOptions(host="127.0.0.1", port=0),
                           config=EngineConfig(model=str(smollm2_dir), num_blocks=512, progress=False)).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server) -> Iterator[WeftClient]:
    with WeftClient(server.target, retry=NO_RETRY, timeout=300) as c:
        yield c


def _valid(calls) -> None:
    assert calls
    for c in calls:
        assert c.id.startswith("call_") and len(c.id) == 29
        jsonschema.validate(json.loads(c.arguments), SCHEMAS[c.name])


def _streamed(client: WeftClient, **kw) -> tuple[str, list[pb.ToolCall], int]:
    text, calls, reason = "", {}, None
    for msg in client.generate_stream(ASK, tools=TOOLS, **kw):
        text += msg.choice.text
        for piece in msg.choice.tool_calls:
            add_tool_call_piece(calls, piece.index, piece)
        if msg.choice.finish_reason:
            reason = msg.choice.finish_reason
    return text, [calls[i] for i in sorted(calls)], reason


@pytest.mark.parametrize("choice", ["required", "get_weather", "book_flight"])
def test_required_and_named_calls_validate_and_stream_the_same(client, choice) -> None:
    resp = client.generate(ASK, tools=TOOLS, tool_choice=choice, temperature=0, max_tokens=96)
    c = resp.choices[0]
    assert c.finish_reason == pb.FINISH_REASON_TOOL_CALLS and c.text == ""
    _valid(c.tool_calls)
    if choice != "required":
        assert [x.name for x in c.tool_calls] == [choice]
    text, calls, reason = _streamed(client, tool_choice=choice, temperature=0, max_tokens=96)
    assert (text, reason) == (c.text, c.finish_reason)
    assert [(x.index, x.name, x.arguments) for x in calls] == [(x.index, x.name, x.arguments) for x in c.tool_calls]


def test_without_parallel_calls_exactly_one(client) -> None:
    c = client.generate(ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                        temperature=0, max_tokens=96).choices[0]
    assert len(c.tool_calls) == 1
    _valid(c.tool_calls)


def test_auto_and_none(client) -> None:
    auto = client.generate(ASK, tools=TOOLS, temperature=0, max_tokens=64).choices[0]
    if auto.tool_calls:
        _valid(auto.tool_calls)
        assert auto.finish_reason == pb.FINISH_REASON_TOOL_CALLS
    else:
        assert auto.text and auto.finish_reason != pb.FINISH_REASON_TOOL_CALLS
    none = client.generate(ASK, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=24).choices[0]
    assert not none.tool_calls and none.text and "<tool_call>" not in none.text


def test_sampled_calls_all_validate(client) -> None:
    """Temperature 1.0, many samples, each mode that can call: every call validates."""
    for choice in ("required", "auto"):
        resp = client.generate(ASK, tools=TOOLS, tool_choice=choice, temperature=1.0, seed=7, n=8, max_tokens=96)
        for c in resp.choices:
            for call in c.tool_calls:
                jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
            assert c.finish_reason != pb.FINISH_REASON_LENGTH or not c.tool_calls or choice == "auto"
        if choice == "required":
            assert all(c.tool_calls for c in resp.choices)


def test_two_turn_exchange(client) -> None:
    first = client.generate(ASK, tools=TOOLS, tool_choice="get_weather", temperature=0, max_tokens=64).choices[0]
    call = first.tool_calls[0]
    history = ASK + [
        {"role": "assistant", "content": "", "tool_calls": [{"id": call.id, "name": call.name, "arguments": call.arguments}]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 18, "sky": "clear"})}]
    answer = client.generate(history, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=40).choices[0]
    assert answer.text and not answer.tool_calls
    # The rendered prompt carries the call and its result.
    ids = client.tokenize(messages=history).token_ids
    rendered = client.detokenize(list(ids), skip_special_tokens=False)
    assert "<tool_response>" in rendered and call.arguments in rendered


def test_speculation_and_prefix_cache_leave_calls_unchanged(client) -> None:
    plain = client.generate(ASK, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=96).choices[0]
    spec = client.generate(ASK, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=96,
                           num_speculative_tokens=4).choices[0]
    assert list(spec.token_ids) == list(plain.token_ids)
    again = client.generate(ASK, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=96)
    assert again.usage.cached_prompt_tokens > 0   # the tools block is a shared prefix
    assert list(again.choices[0].token_ids) == list(plain.token_ids)


def test_model_info_reports_tools(client) -> None:
    info = client.model_info()
    assert info.features.tool_calls and info.features.tool_call_format == "hermes"


@pytest.mark.parametrize(("kwargs", "field"), [
    (dict(tools=TOOLS, tool_choice="get_news"), "tool_choice"),
    (dict(tool_choice="required"), "tool_choice"),
    (dict(tool_choice="get_weather"), "tool_choice"),
    (dict(tool_choice="auto"), "tool_choice"),
    (dict(tools=[TOOLS[0], TOOLS[0]]), "tools[1].name"),
    (dict(tools=[{"name": "bad name"}]), "tools[0].name"),
    (dict(tools=[{"name": "f", "parameters": "{not json"}]), "tools[0].parameters"),
    # Keywords no grammar holds (an unknown format or `not` are rewritten exactly, and accepted).
    (dict(tools=[TOOLS[0], {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}}}}]), "tools[1].parameters"),
    (dict(tools=[{"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "array", "contains": {"type": "integer"}, "minContains": 2}}}}]), "tools[0].parameters"),
])
def test_bad_tools_name_the_field(client, kwargs, field) -> None:
    with pytest.raises(grpc.RpcError) as err:
        client.generate(ASK, max_tokens=8, **kwargs)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field + ":"), err.value.details()
    assert dict(err.value.trailing_metadata()).get("weft-invalid-field") == field
    assert client.generate(ASK, max_tokens=2, temperature=0).choices[0].token_ids   # still serving


def test_bad_history_names_the_field(client) -> None:
    orphan = ASK + [{"role": "tool", "tool_call_id": "call_nope", "content": "18"}]
    with pytest.raises(grpc.RpcError) as err:
        client.generate(orphan, tools=TOOLS, max_tokens=8)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("chat.messages[1].tool_call_id:")
    with pytest.raises(grpc.RpcError) as err:
        client.generate("plain text prompt", tools=TOOLS, max_tokens=8)
    assert err.value.details().startswith("tools:")


def test_weft_client_cli_tool_flags(server, client, capsys, tmp_path) -> None:
    from service.cli import main

    expect = client.generate(ASK, tools=TOOLS, tool_choice="get_weather", temperature=0, max_tokens=64)
    call = expect.choices[0].tool_calls[0]
    tools_file = tmp_path / "tools.json"
    tools_file.write_text(json.dumps(TOOLS[1:]))
    base = ["client", "--target", server.target, "generate", ASK[0]["content"], "--tool", json.dumps(TOOLS[0]),
            "--tools-file", str(tools_file), "--tool-choice", "get_weather", "--temperature", "0",
            "--max-tokens", "64"]
    for extra in ([], ["--stream"]):
        assert main(base + extra) == 0
        out = capsys.readouterr().out
        assert f"tool call 0: get_weather({call.arguments})" in out
    assert main(base + ["--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["choices"][0]["tool_calls"][0]["arguments"] == call.arguments
    with pytest.raises(SystemExit, match="tools: "):
        main(base[:5] + ["--tool", "{not json"])
