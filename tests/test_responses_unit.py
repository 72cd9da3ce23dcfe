"""The Responses API's pieces without a model: the stream state machine over hand-made
GenerateStream choices (text then calls, white space between them, text after a call, nothing
at all), its events parsed by the `openai` client's own event types, the unary items of the same
choice, and the bounded store (count, bytes, expiry)."""
from __future__ import annotations

import json

import pytest
from openai.types.responses import ResponseStreamEvent
from pydantic import TypeAdapter

from clients.weft.v1 import inference_pb2 as pb
from service.shim.response_events import ResponseStream, assistant_turn, output_items
from service.shim.response_store import ResponseStore

EVENT = TypeAdapter(ResponseStreamEvent)


def _parse(sse: list[str]) -> list:
    out = []
    for chunk in sse:
        event_line, data_line = chunk.strip().split("\n")
        data = json.loads(data_line.removeprefix("data: "))
        assert event_line == f"event: {data['type']}"
        out.append(EVENT.validate_python(data))
    return out


def _run(pieces: list[str | pb.ToolCall], status: str = "completed") -> tuple[ResponseStream, list]:
    state = ResponseStream(want_logprobs=False)
    sse: list[str] = []
    for p in pieces:
        sse += state.text(p, []) if isinstance(p, str) else state.call_piece(p)
    sse += state.finish(status)
    return state, _parse(sse)


def _call(index: int, arguments: str, first: bool) -> pb.ToolCall:
    return pb.ToolCall(index=index, arguments=arguments, id=f"call_{index}" if first else "",
                       name=f"tool{index}" if first else "")


def test_text_then_two_calls_with_white_space_between() -> None:
    pieces = ["Let me ", "check.", "\n", _call(0, '{"a":', True), _call(0, " 1}", False), "\n",
              _call(1, "{}", True), "\n"]
    state, events = _run(pieces)
    assert [e.type for e in events] == [
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done"]
    assert [e.output_index for e in events if e.type == "response.output_item.done"] == [0, 1, 2]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    msg, c0, c1 = state.output
    assert msg["content"][0]["text"] == "Let me check."
    assert (c0["call_id"], c0["name"], c0["arguments"], c0["status"]) == ("call_0", "tool0", '{"a": 1}', "completed")
    assert (c1["name"], c1["arguments"]) == ("tool1", "{}")
    # The unary answer of the same choice has the same items.
    choice = pb.Choice(text="Let me check.\n\n\n", tool_calls=[
        pb.ToolCall(index=0, id="call_0", name="tool0", arguments='{"a": 1}'),
        pb.ToolCall(index=1, id="call_1", name="tool1", arguments="{}")])
    unary = output_items(choice, "completed", None)
    strip = lambda items: [{k: v for k, v in i.items() if k != "id"} for i in items]  # noqa: E731
    assert strip(unary) == strip(state.output)
    turn = assistant_turn(state.output)
    assert turn.content == "Let me check." and [c.name for c in turn.tool_calls] == ["tool0", "tool1"]


def test_only_calls_make_no_message_item() -> None:
    state, events = _run(["  \n", _call(0, "{}", True)])
    assert [o["type"] for o in state.output] == ["function_call"]
    assert output_items(pb.Choice(text=" \n", tool_calls=[pb.ToolCall(id="call_0", name="t", arguments="{}")]),
                        "completed", None)[0]["type"] == "function_call"


def test_trailing_white_space_of_plain_text_is_kept_and_empty_answer_is_one_message() -> None:
    state, _ = _run(["Hello", " ", "world", "\n"])
    assert state.output[0]["content"][0]["text"] == "Hello world\n"
    state, events = _run([], status="incomplete")
    assert [e.type for e in events][0] == "response.output_item.added"
    assert state.output[0]["content"][0]["text"] == "" and state.output[0]["status"] == "incomplete"


def test_text_after_a_call_opens_a_new_message() -> None:
    state, _ = _run([_call(0, "{}", True), "Done."])
    assert [o["type"] for o in state.output] == ["function_call", "message"]
    assert state.output[1]["content"][0]["text"] == "Done."


def test_store_bounds_count_bytes_and_expiry(monkeypatch: pytest.MonkeyPatch) -> None:
    conv = [pb.ChatMessage(role="user", content="x" * 100)]
    store = ResponseStore(max_items=3, max_bytes=10_000, ttl_s=60)
    for i in range(5):
        store.put(f"r{i}", {"i": i}, conv, 10)
    assert len(store) == 3 and store.get("r1") is None and store.get("r4").body == {"i": 4}
    store.put("big", {}, [pb.ChatMessage(content="y" * 9_800)], 10)
    assert store.get("big") is not None and len(store) < 3   # older ones made room
    store.put("huge", {}, [pb.ChatMessage(content="z" * 20_000)], 10)
    assert store.get("huge") is None   # larger than the whole store: never kept
    assert store.delete("big") and not store.delete("big")
    import service.shim.response_store as rs
    now = rs.time.monotonic()
    store.put("old", {}, conv, 10)
    monkeypatch.setattr(rs.time, "monotonic", lambda: now + 61)
    assert store.get("old") is None
