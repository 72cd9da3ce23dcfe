"""Tool calling on the gRPC side: `GenerateRequest.tools` / `tool_choice` / chat history with
calls -> a prompt and a guided spec, and the generated text of each choice -> `Choice.tool_calls`.

The policy (formats, grammar, parser, Weft's tool prompt) lives in decoding/tools; this module
maps the proto onto it and names proto fields in its errors (`tools[2].parameters`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from clients.weft.v1 import inference_pb2 as pb
from common.errors import InvalidArgumentError
from decoding.guided import GuideCompiler
from decoding.guided.spec import GuidedSpec
from decoding.tools import (
    FORMATS,
    ToolCallDelta,
    ToolCallParser,
    ToolChoice,
    ToolFormat,
    ToolRequest,
    ToolSpec,
    detect_format,
    render_tool_history,
    template_handles_tools,
)
from decoding.tools.grammar import call_schema

TOOL_CALL_FORMATS = ("auto", *FORMATS)
_MODES = {pb.ToolChoice.MODE_NONE: "none", pb.ToolChoice.MODE_AUTO: "auto", pb.ToolChoice.MODE_REQUIRED: "required"}


@dataclass(slots=True)
class ToolContext:
    """What a tool request needs after the prompt is built: its tools and the format to parse."""
    request: ToolRequest
    fmt: ToolFormat


def resolve_format(name: str, chat_template: str | None) -> ToolFormat:
    """The server's --tool-call-format ("auto": from the model's chat template)."""
    if name not in TOOL_CALL_FORMATS:
        raise ValueError(f"tool call format must be one of {', '.join(TOOL_CALL_FORMATS)}; got {name!r}")
    return FORMATS[detect_format(chat_template) if name == "auto" else name]


def tool_request(req: pb.GenerateRequest) -> ToolRequest | None:
    """The request's tools and choice (None when it has neither); raises InvalidArgumentError."""
    has_choice = req.HasField("tool_choice") and req.tool_choice.WhichOneof("choice") is not None
    if not req.tools:
        if has_choice:
            raise InvalidArgumentError("tool_choice", "is only allowed together with tools; the request has none")
        return None
    tools = []
    for i, t in enumerate(req.tools):
        params = None
        if t.parameters:
            try:
                params = json.loads(t.parameters)
            except ValueError as exc:
                raise InvalidArgumentError(f"tools[{i}].parameters", f"is not valid JSON: {exc}") from None
        tools.append(ToolSpec(t.name, t.description, params, t.strict))
    choice = ToolChoice("auto")
    if has_choice:
        if req.tool_choice.WhichOneof("choice") == "function_name":
            choice = ToolChoice("named", req.tool_choice.function_name)
        else:
            choice = ToolChoice(_MODES.get(req.tool_choice.mode, "auto"))
    parallel = req.parallel_tool_calls if req.HasField("parallel_tool_calls") else True
    out = ToolRequest(tuple(tools), choice, parallel)
    out.validate(parameters_suffix=".parameters", name_suffix=".name")
    if req.HasField("guided") and out.constrained:
        raise InvalidArgumentError("guided", "cannot be combined with tools (tool calls run under their own grammar)")
    return out


async def check_tool_schemas(tools: ToolRequest, fmt: ToolFormat, compiler: GuideCompiler) -> None:
    """Compile each tool's call schema alone, so that a keyword Weft cannot enforce is refused
    naming that tool's parameters (compiled grammars are cached: a repeated tool costs nothing)."""
    for i, tool in enumerate(tools.tools):
        spec = GuidedSpec("json_schema", json.dumps(call_schema(tool, fmt)), backend="llguidance")
        try:
            await compiler.compile(spec)
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"tools[{i}].parameters", exc.message) from None


def chat_history(chat: pb.Chat) -> list[dict]:
    """The chat's messages as dicts, tool calls and tool results included; a `tool` turn must
    answer a call made earlier in the conversation."""
    calls: set[str] = set()
    out = []
    for i, m in enumerate(chat.messages):
        msg: dict = {"role": m.role, "content": m.content}
        if m.tool_calls:
            if m.role != "assistant":
                raise InvalidArgumentError(f"chat.messages[{i}].tool_calls", "only assistant turns make tool calls")
            msg["tool_calls"] = []
            for j, c in enumerate(m.tool_calls):
                try:
                    json.loads(c.arguments or "{}")
                except ValueError as exc:
                    raise InvalidArgumentError(f"chat.messages[{i}].tool_calls[{j}].arguments",
                                               f"is not valid JSON: {exc}") from None
                msg["tool_calls"].append({"id": c.id, "name": c.name, "arguments": c.arguments or "{}"})
                calls.add(c.id)
        if m.role == "tool":
            if not m.tool_call_id:
                raise InvalidArgumentError(f"chat.messages[{i}].tool_call_id", "a tool turn must name the call it answers")
            if m.tool_call_id not in calls:
                raise InvalidArgumentError(f"chat.messages[{i}].tool_call_id",
                                           f"{m.tool_call_id!r} answers no tool call of an earlier assistant turn")
            msg["tool_call_id"], msg["name"] = m.tool_call_id, m.name
        out.append(msg)
    return out


def render_messages(messages: list[dict], tools: ToolRequest | None, fmt: ToolFormat,
                    chat_template: str | None) -> tuple[list[dict], list[dict] | None]:
    """Messages and `tools` for the chat template (Weft's tool prompt when it has no tool support)."""
    return render_tool_history(messages, tools, fmt, template_handles_tools(chat_template))


class OutputShaper:
    """Each choice's generated text as content and tool calls, delta by delta (one parser per
    choice). Without tools the text passes through unchanged."""

    def __init__(self, ctx: ToolContext | None) -> None:
        self._fmt = ctx.fmt if ctx is not None and ctx.request.constrained else None
        self._parsers: dict[int, ToolCallParser] = {}

    def shape(self, index: int, text: str, final: bool) -> tuple[str, list[pb.ToolCall]]:
        """(content delta, call pieces) for one delta of choice `index`."""
        if self._fmt is None:
            return text, []
        parser = self._parsers.get(index)
        if parser is None:
            parser = self._parsers[index] = ToolCallParser(self._fmt)
        content, deltas = parser.feed(text)
        if final:
            more, tail = parser.finish()
            content, deltas = content + more, deltas + tail
        return content, [_delta_proto(d) for d in deltas]

    def calls(self, index: int) -> list[pb.ToolCall]:
        """Choice `index`'s whole calls (after its final delta)."""
        parser = self._parsers.get(index)
        return [] if parser is None else [pb.ToolCall(id=c.id, name=c.name, arguments=c.arguments, index=c.index)
                                          for c in parser.calls]


def _delta_proto(d: ToolCallDelta) -> pb.ToolCall:
    return pb.ToolCall(id=d.id or "", name=d.name or "", arguments=d.arguments, index=d.index)
