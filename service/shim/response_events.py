"""The Responses API's output: items (an assistant `message` with `output_text`, `function_call`s)
of a whole choice, and the event sequence of a streamed one.

A stream is a small state machine over GenerateStream deltas: text opens a message item, a call
piece with a new index opens a function_call item, and whatever opens an item first closes the
one before it (`.done` events in OpenAI's order). Text that is only white space is held back
until something visible follows, so an answer that only calls tools has no empty message item,
as in the unary answer."""
from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from clients.weft.v1 import inference_pb2 as pb
from service.shim.backend import dumps


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def message_item(item_id: str, text: str, status: str, logprobs: list[dict[str, Any]] | None) -> dict[str, Any]:
    part: dict[str, Any] = {"type": "output_text", "text": text, "annotations": []}
    if logprobs is not None:
        part["logprobs"] = logprobs
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": [part]}


def call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


def output_items(c: pb.Choice, status: str, logprobs: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """A finished choice's output: its text as one message (left out when the answer only calls
    tools), then one item per call."""
    items = []
    # With calls, white space after the text is the separator before them, not text (a stream
    # holds it back and drops it the same way).
    text = c.text.rstrip() if c.tool_calls else c.text
    if text.strip() or not c.tool_calls:
        items.append(message_item(new_id("msg"), text, status, logprobs))
    items += [call_item(new_id("fc"), t.id, t.name, t.arguments, "completed") for t in c.tool_calls]
    return items


def assistant_turn(output: Sequence[dict[str, Any]]) -> pb.ChatMessage:
    """The output items as one assistant turn of the conversation (for previous_response_id)."""
    msg = pb.ChatMessage(role="assistant")
    for item in output:
        if item["type"] == "message":
            msg.content += "".join(p["text"] for p in item["content"])
        else:
            msg.tool_calls.append(pb.ToolCall(id=item["call_id"], name=item["name"], arguments=item["arguments"],
                                              index=len(msg.tool_calls)))
    return msg


@dataclass(slots=True)
class _Open:
    """The item being streamed: its index in `output` and, for a call, the call's index."""
    output_index: int
    call_index: int | None


@dataclass(slots=True)
class ResponseStream:
    """Turns GenerateStream choices into Responses events (SSE text), and keeps the output."""
    want_logprobs: bool
    seq: int = 0
    output: list[dict[str, Any]] = field(default_factory=list)
    open: _Open | None = None
    held_text: str = ""
    held_logprobs: list[dict[str, Any]] = field(default_factory=list)

    def event(self, kind: str, **fields: Any) -> str:
        data = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {kind}\ndata: {dumps(data)}\n\n"

    def text(self, delta: str, logprobs: list[dict[str, Any]]) -> list[str]:
        self.held_text += delta
        self.held_logprobs += logprobs
        if not self.held_text.strip():
            return []
        return self._flush_text()

    def _open_message(self) -> list[str]:
        out = self.close()
        item = message_item(new_id("msg"), "", "in_progress", [] if self.want_logprobs else None)
        out += self._add(item, None)
        out.append(self.event("response.content_part.added", item_id=item["id"], output_index=len(self.output) - 1,
                              content_index=0, part={"type": "output_text", "text": "", "annotations": []}))
        return out

    def _flush_text(self) -> list[str]:
        out: list[str] = []
        if self.open is None or self.open.call_index is not None:
            out += self._open_message()
        index = self.open.output_index   # type: ignore[union-attr]
        item = self.output[index]
        part = item["content"][0]
        part["text"] += self.held_text
        if self.want_logprobs:
            part["logprobs"] += self.held_logprobs
        out.append(self.event("response.output_text.delta", item_id=item["id"], output_index=index,
                              content_index=0, delta=self.held_text, logprobs=self.held_logprobs))
        self.held_text, self.held_logprobs = "", []
        return out

    def call_piece(self, piece: pb.ToolCall) -> list[str]:
        out: list[str] = []
        if self.open is None or self.open.call_index != piece.index:
            self.held_text, self.held_logprobs = "", []   # white space between calls: not an item
            out += self.close()
            out += self._add(call_item(new_id("fc"), piece.id, piece.name, "", "in_progress"), piece.index)
        item = self.output[self.open.output_index]   # type: ignore[union-attr]
        if piece.arguments:
            item["arguments"] += piece.arguments
            out.append(self.event("response.function_call_arguments.delta", item_id=item["id"],
                                  output_index=self.open.output_index, delta=piece.arguments))   # type: ignore[union-attr]
        return out

    def _add(self, item: dict[str, Any], call_index: int | None) -> list[str]:
        self.output.append(item)
        self.open = _Open(len(self.output) - 1, call_index)
        return [self.event("response.output_item.added", output_index=len(self.output) - 1, item=item)]

    def close(self, status: str = "completed") -> list[str]:
        """End the open item with its `.done` events."""
        if self.open is None:
            return []
        index, item = self.open.output_index, self.output[self.open.output_index]
        self.open = None
        item["status"] = status
        out = []
        if item["type"] == "message":
            part = item["content"][0]
            out.append(self.event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                                  text=part["text"], logprobs=part.get("logprobs", [])))
            out.append(self.event("response.content_part.done", item_id=item["id"], output_index=index,
                                  content_index=0, part=part))
        else:
            out.append(self.event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                  name=item["name"], arguments=item["arguments"]))
        out.append(self.event("response.output_item.done", output_index=index, item=item))
        return out

    def finish(self, status: str) -> list[str]:
        """Close the stream's last item. White space held at the end joins the answer's text
        unless the answer called tools; an answer with no item at all still gets its (maybe
        empty) message, as the unary answer does."""
        out: list[str] = []
        if self.held_text and not any(i["type"] == "function_call" for i in self.output):
            out += self._flush_text()
        if not self.output:
            out += self._open_message()
        return out + self.close("incomplete" if status == "incomplete" else "completed")
