"""Tool calling in OpenAI's and Ollama's shapes <-> weft.v1 (tools, tool choice, history with
calls, and the calls of a choice, whole or streamed). The guarantee itself — every call parses
and validates — is the server's (decoding/tools); this module only translates."""
from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from clients.weft.v1 import inference_pb2 as pb
from service.shim.models import ChatCompletionRequest
from service.shim.translate import HttpError, RequestBuilder

TOOL_CHOICE_MODES = {"none": pb.ToolChoice.MODE_NONE, "auto": pb.ToolChoice.MODE_AUTO, "required": pb.ToolChoice.MODE_REQUIRED}


def add_tool(b: RequestBuilder, i: int, fn: Any, param: str) -> None:
    """One function definition ({name, description, parameters, strict}) as GenerateRequest.tools[i]."""
    if not isinstance(fn, dict):
        raise HttpError(400, f"{param}: must be an object with a name", param)
    params = fn.get("parameters")
    try:
        text = "" if params is None else json.dumps(params, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise HttpError(400, f"{param}.parameters: not valid JSON: {exc}", f"{param}.parameters") from None
    name = fn.get("name")
    if not isinstance(name, str):
        raise HttpError(400, f"{param}.name: required, a string", f"{param}.name")
    b.req.tools.append(pb.Tool(name=name, description=str(fn.get("description") or ""), parameters=text,
                               strict=bool(fn.get("strict"))))
    b.name(f"tools[{i}]", param)


def openai_tools(b: RequestBuilder, body: ChatCompletionRequest) -> bool:
    """`tools` / `tool_choice` / `parallel_tool_calls`, or the legacy `functions` / `function_call`.
    Returns True for the legacy form (answered with `message.function_call`)."""
    if body.tools is not None and body.functions is not None:
        raise HttpError(400, "functions: send tools or the legacy functions, not both", "functions")
    legacy = body.functions is not None
    for i, t in enumerate(body.tools or ()):
        if not isinstance(t, dict) or t.get("type", "function") != "function":
            raise HttpError(400, f"tools[{i}].type: only function tools are supported", f"tools[{i}].type")
        add_tool(b, i, t.get("function"), f"tools[{i}].function")
    for i, f in enumerate(body.functions or ()):
        add_tool(b, i, f, f"functions[{i}]")
    choice, param = (body.function_call, "function_call") if legacy else (body.tool_choice, "tool_choice")
    if choice is not None:
        if isinstance(choice, str):
            if choice not in TOOL_CHOICE_MODES or (legacy and choice == "required"):
                raise HttpError(400, f"{param}: must be none, auto{'' if legacy else ', required'} or a function; "
                                f"got {choice!r}", param)
            b.req.tool_choice.mode = TOOL_CHOICE_MODES[choice]
        else:
            fn = choice.get("function", choice) if isinstance(choice, dict) else None
            name = fn.get("name") if isinstance(fn, dict) else None
            if not isinstance(name, str):
                raise HttpError(400, f"{param}: a function choice needs a name", param)
            b.req.tool_choice.function_name = name
        b.name("tool_choice", param)
    if legacy:
        b.req.parallel_tool_calls = False   # one function_call per answer
    else:
        b.set("parallel_tool_calls", body.parallel_tool_calls, "parallel_tool_calls")
    return legacy


def openai_calls(calls: Sequence[dict[str, Any]], param: str) -> list[pb.ToolCall]:
    """An assistant turn's `tool_calls` ([{id, type, function: {name, arguments}}])."""
    out = []
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise HttpError(400, f"{param}[{j}].function: needs a name and arguments", f"{param}[{j}].function")
        args = fn.get("arguments", "{}")
        out.append(pb.ToolCall(id=str(c.get("id") or ""), name=fn["name"], index=j,
                               arguments=args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)))
    return out


def openai_message_calls(c: pb.Choice, legacy: bool) -> dict[str, Any]:
    """The assistant message of a finished choice: content (None when it only calls) and its calls."""
    if not c.tool_calls:
        return {"role": "assistant", "content": c.text}
    content = c.text if c.text.strip() else None
    if legacy:
        first = c.tool_calls[0]
        return {"role": "assistant", "content": content,
                "function_call": {"name": first.name, "arguments": first.arguments}}
    return {"role": "assistant", "content": content,
            "tool_calls": [{"id": t.id, "type": "function", "function": {"name": t.name, "arguments": t.arguments}}
                           for t in c.tool_calls]}


def openai_call_deltas(pieces: Sequence[pb.ToolCall], legacy: bool) -> list[dict[str, Any]] | dict[str, Any]:
    """A stream message's call pieces as OpenAI's `delta.tool_calls` (pieces of one call merged:
    its id, type and name first, then arguments), or the legacy `delta.function_call`."""
    merged: dict[int, dict[str, Any]] = {}
    for p in pieces:
        item = merged.get(p.index)
        if item is None:
            item = merged[p.index] = {"index": p.index}
            if p.id:
                item.update(id=p.id, type="function")
            item["function"] = {"name": p.name} if p.id else {}
            item["function"]["arguments"] = ""
        item["function"]["arguments"] += p.arguments
    out = [merged[i] for i in sorted(merged)]
    if legacy:
        fn: dict[str, Any] = {}
        for item in out:
            if "name" in item["function"]:
                fn["name"] = item["function"]["name"]
            fn["arguments"] = fn.get("arguments", "") + item["function"]["arguments"]
        return fn
    return out


def ollama_history(messages: Sequence[Any]) -> list[pb.ChatMessage]:
    """Ollama's history: calls carry no ids there, so each call gets one and each `tool` turn
    answers the earliest unanswered call (of its `tool_name`, when given)."""
    out: list[pb.ChatMessage] = []
    pending: list[pb.ToolCall] = []
    for i, m in enumerate(messages):
        msg = pb.ChatMessage(role=m.role, content=m.content or "")
        for j, c in enumerate(m.tool_calls or ()):
            fn = c.get("function") if isinstance(c, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise HttpError(400, f"messages[{i}].tool_calls[{j}].function: needs a name",
                                f"messages[{i}].tool_calls[{j}].function")
            args = fn.get("arguments", {})
            call = pb.ToolCall(id=str(c.get("id") or f"call_{i}_{j}"), name=fn["name"], index=j,
                               arguments=args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))
            msg.tool_calls.append(call)
            pending.append(call)
        if m.role == "tool":
            match = next((c for c in pending if not m.tool_name or c.name == m.tool_name), None)
            if match is None:
                raise HttpError(400, f"messages[{i}]: a tool turn answers no earlier tool call", f"messages[{i}]")
            pending.remove(match)
            msg.tool_call_id, msg.name = match.id, m.tool_name or match.name
        out.append(msg)
    return out


def ollama_calls(calls: Sequence[pb.ToolCall]) -> list[dict[str, Any]]:
    """Ollama's `message.tool_calls`: arguments as an object."""
    return [{"id": c.id, "function": {"index": c.index, "name": c.name, "arguments": json.loads(c.arguments)}}
            for c in calls]
