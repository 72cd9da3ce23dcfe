"""OpenAI's Responses API: POST /v1/responses (unary, or streamed as Responses events), GET and
DELETE /v1/responses/{id}. A request becomes one chat GenerateRequest: `instructions` as a
system turn, input items as turns (function_call / function_call_output as a call and its
answer), function `tools` under the tool-call guarantee, `text.format` as guided decoding.

Stored responses (`store`, default true as at OpenAI) live in this process's memory, bounded
and expiring (service/shim/response_store.py); `previous_response_id` continues one."""
from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from clients.weft.v1 import guided_pb2
from clients.weft.v1 import inference_pb2 as pb
from service.shim.backend import EOF_MSG, SSE_HEADERS, Stream, dumps
from service.shim.base import ShimBase
from service.shim.models import ResponsesRequest
from service.shim.response_events import ResponseStream, assistant_turn, new_id, output_items
from service.shim.response_store import ResponseStore
from service.shim.tools import TOOL_CHOICE_MODES, add_tool
from service.shim.translate import FINISH, HttpError, RequestBuilder, chat_logprobs, rpc_error

_TEXT_PARTS = ("input_text", "output_text", "text", "refusal")
_LOGPROBS_INCLUDE = "message.output_text.logprobs"


class ResponsesRoutes(ShimBase):
    response_store: ResponseStore

    async def create_response(self, body: ResponsesRequest, request: Request) -> Response:
        ctx = self._ctx(request)
        _refuse_unsupported(body)
        b = RequestBuilder(body.model)
        conversation = self._conversation(body)
        b.req.chat.SetInParent()
        b.name("chat", "input")
        b.name("chat.messages", "input")
        if body.instructions:
            b.req.chat.messages.append(pb.ChatMessage(role="system", content=body.instructions))
        b.req.chat.messages.extend(conversation)
        _apply_tools(b, body)
        _apply_format(b, body.text)
        b.set("sampling.temperature", body.temperature, "temperature")
        b.set("sampling.top_p", body.top_p, "top_p")
        top = body.top_logprobs or 0
        want_logprobs = bool(body.top_logprobs) or _LOGPROBS_INCLUDE in (body.include or ())
        if want_logprobs:
            b.set("logprobs", top, "top_logprobs")
        info = await self.backend.model_info(ctx.metadata)
        b.set("stopping.max_tokens", body.max_output_tokens if body.max_output_tokens is not None
              else info.max_model_len, "max_output_tokens")
        store = body.store is not False
        head = _response_head(body, new_id("resp"), ctx.created, body.model or info.name)

        def finished(output: list[dict[str, Any]], usage: pb.Usage, status: str) -> dict[str, Any]:
            resp = {**head, "status": status, "output": output, "usage": _usage(usage)}
            if status == "incomplete":
                resp["incomplete_details"] = {"reason": "max_output_tokens"}
            if store and status != "failed":
                self.response_store.put(resp["id"], resp, conversation + [assistant_turn(output)], len(dumps(resp)))
            return resp

        if not body.stream:
            resp = await self._unary(request, self.backend.stub.Generate(b.req, metadata=ctx.metadata), b)
            c = resp.choices[0]
            status = _status(c)
            lp = chat_logprobs(c.logprobs, top) if want_logprobs else None
            return JSONResponse(finished(output_items(c, status, lp), resp.usage, status),
                                headers={"x-request-id": ctx.rid})

        [(call, first)] = await self._open_streams(request, [b.req], [ctx.metadata], b)

        async def events() -> AsyncIterator[str]:
            state = ResponseStream(want_logprobs)
            usage = pb.Usage()
            start = {**head, "status": "in_progress", "output": [], "usage": None}
            yield state.event("response.created", response=start)
            yield state.event("response.in_progress", response=start)
            try:
                msg = first
                status = "completed"
                while msg is not EOF_MSG:
                    c = msg.choice
                    if msg.HasField("usage"):
                        usage = msg.usage
                    if c.text:
                        for e in state.text(c.text, chat_logprobs(c.logprobs, top) if want_logprobs else []):
                            yield e
                    for piece in c.tool_calls:
                        for e in state.call_piece(piece):
                            yield e
                    if c.finish_reason:
                        status = _status(c)
                    msg = await call.read()
                for e in state.finish(status):
                    yield e
                kind = "response.incomplete" if status == "incomplete" else "response.completed"
                yield state.event(kind, response=finished(state.output, usage, status))
            except grpc.aio.AioRpcError as exc:
                err = rpc_error(exc, b)
                failed = {**head, "status": "failed", "output": state.output, "usage": _usage(usage),
                          "error": {"code": err.code or err.type, "message": err.message}}
                yield state.event("response.failed", response=failed)
            finally:
                call.cancel()

        return Stream(events(), media_type="text/event-stream", headers={**SSE_HEADERS, "x-request-id": ctx.rid})

    def _conversation(self, body: ResponsesRequest) -> list[pb.ChatMessage]:
        """The stored conversation `previous_response_id` names (if any), then this input."""
        turns: list[pb.ChatMessage] = []
        if body.previous_response_id is not None:
            stored = self.response_store.get(body.previous_response_id)
            if stored is None:
                raise HttpError(400, f"previous_response_id: no stored response {body.previous_response_id!r} (never "
                                "stored, expired or deleted; responses are kept in this server's memory)",
                                "previous_response_id", "previous_response_not_found")
            turns += [_copy(m) for m in stored.conversation]
        return turns + input_turns(body.input, turns)

    async def get_response(self, response_id: str, request: Request) -> Response:
        self._ctx(request)
        stored = self.response_store.get(response_id)
        if stored is None:
            raise HttpError(404, f"response {response_id!r} not found", "response_id", "not_found")
        return JSONResponse(stored.body)

    async def delete_response(self, response_id: str, request: Request) -> Response:
        self._ctx(request)
        if not self.response_store.delete(response_id):
            raise HttpError(404, f"response {response_id!r} not found", "response_id", "not_found")
        return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})


def _copy(m: pb.ChatMessage) -> pb.ChatMessage:
    out = pb.ChatMessage()
    out.CopyFrom(m)
    return out


def _refuse_unsupported(body: ResponsesRequest) -> None:
    """Fields that change what a response means, which Weft cannot honour: a 400 naming them,
    never silently ignored."""
    if body.background:
        raise HttpError(400, "background: background responses are not supported", "background")
    if body.conversation is not None:
        raise HttpError(400, "conversation: the Conversations API is not supported; send the input items, or "
                        "previous_response_id", "conversation")
    if body.prompt is not None:
        raise HttpError(400, "prompt: stored prompt templates are not supported", "prompt")
    if body.truncation not in (None, "disabled", "auto"):
        raise HttpError(400, f"truncation: must be disabled or auto, got {body.truncation!r}", "truncation")


def input_turns(value: str | list[dict[str, Any]], earlier: list[pb.ChatMessage]) -> list[pb.ChatMessage]:
    """Input items as chat turns. Consecutive function_call items (and an assistant message just
    before them) are one assistant turn; a function_call_output answers its call by call_id."""
    if isinstance(value, str):
        return [pb.ChatMessage(role="user", content=value)]
    if not value:
        raise HttpError(400, "input: must hold at least one item", "input")
    out: list[pb.ChatMessage] = []
    names = {c.id: c.name for m in earlier for c in m.tool_calls}
    for i, item in enumerate(value):
        param = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise HttpError(400, f"{param}.role: must be user, system, developer or assistant; got {role!r}",
                                f"{param}.role")
            out.append(pb.ChatMessage(role="system" if role == "developer" else role,
                                      content=_text(item.get("content"), f"{param}.content")))
        elif kind == "function_call":
            call_id, name = item.get("call_id"), item.get("name")
            if not isinstance(call_id, str) or not isinstance(name, str):
                raise HttpError(400, f"{param}: a function_call needs call_id and name", param)
            args = item.get("arguments", "{}")
            if not isinstance(args, str):
                args = json.dumps(args, ensure_ascii=False)
            if not out or out[-1].role != "assistant":
                out.append(pb.ChatMessage(role="assistant"))
            turn = out[-1]
            turn.tool_calls.append(pb.ToolCall(id=call_id, name=name, arguments=args, index=len(turn.tool_calls)))
            names[call_id] = name
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if call_id not in names:
                raise HttpError(400, f"{param}.call_id: answers no earlier function_call ({call_id!r})",
                                f"{param}.call_id")
            output = item.get("output", "")
            text = output if isinstance(output, str) else _text(output, f"{param}.output")
            out.append(pb.ChatMessage(role="tool", content=text, tool_call_id=call_id, name=names[call_id]))
        elif kind == "reasoning":
            continue   # another model's reasoning: this model neither reads nor writes it
        else:
            raise HttpError(400, f"{param}.type: must be message, function_call or function_call_output; got "
                            f"{kind!r}", f"{param}.type")
    return out


def _text(content: Any, param: str) -> str:
    """A message's content: a string, or text parts joined."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise HttpError(400, f"{param}: must be a string or a list of text parts", param)
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS:
            raise HttpError(400, f"{param}[{j}].type: only text parts are supported, got {kind!r}", f"{param}[{j}].type")
        parts.append(str(part.get("refusal" if kind == "refusal" else "text") or ""))
    return "\n".join(parts)


def _apply_tools(b: RequestBuilder, body: ResponsesRequest) -> None:
    for i, t in enumerate(body.tools or ()):
        if not isinstance(t, dict) or t.get("type", "function") != "function":
            kind = t.get("type") if isinstance(t, dict) else None
            raise HttpError(400, f"tools[{i}].type: only function tools are supported, got {kind!r}",
                            f"tools[{i}].type")
        add_tool(b, i, t, f"tools[{i}]")
    choice = body.tool_choice
    if choice is not None:
        if isinstance(choice, str):
            if choice not in TOOL_CHOICE_MODES:
                raise HttpError(400, f"tool_choice: must be none, auto, required or a function; got {choice!r}",
                                "tool_choice")
            b.req.tool_choice.mode = TOOL_CHOICE_MODES[choice]
        elif choice.get("type") == "function" and isinstance(choice.get("name"), str):
            b.req.tool_choice.function_name = choice["name"]
        else:
            raise HttpError(400, 'tool_choice: must be none, auto, required or {"type": "function", "name": ...}',
                            "tool_choice")
        b.name("tool_choice", "tool_choice")
    b.set("parallel_tool_calls", body.parallel_tool_calls, "parallel_tool_calls")


def _apply_format(b: RequestBuilder, text: dict[str, Any] | None) -> None:
    """`text.format`: json_schema / json_object become guided decoding; text is no constraint."""
    fmt = (text or {}).get("format")
    if fmt is None:
        return
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return
    if kind == "json_object":
        b.req.guided.json_object.SetInParent()
    elif kind == "json_schema":
        schema = fmt.get("schema")
        if not isinstance(schema, dict):
            raise HttpError(400, "text.format.schema: required (an object) for type json_schema", "text.format.schema")
        b.req.guided.CopyFrom(guided_pb2.GuidedDecoding(json_schema=json.dumps(schema, ensure_ascii=False)))
        b.name("guided.json_schema", "text.format.schema")
    else:
        raise HttpError(400, f"text.format.type: must be text, json_object or json_schema, got {kind!r}",
                        "text.format.type")
    b.name("guided", "text.format")


def _status(c: pb.Choice) -> str:
    reason = FINISH[c.finish_reason]
    if reason == "length":
        return "incomplete"
    return "failed" if reason in ("error", "abort") else "completed"


def _usage(u: pb.Usage) -> dict[str, Any]:
    return {"input_tokens": u.prompt_tokens,
            "input_tokens_details": {"cached_tokens": u.cached_prompt_tokens, "cache_write_tokens": 0},
            "output_tokens": u.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": u.total_tokens}


def _response_head(body: ResponsesRequest, response_id: str, created: int, model: str) -> dict[str, Any]:
    """The fields of a response object that echo the request."""
    tool_choice: Any = body.tool_choice if body.tool_choice is not None else ("auto" if body.tools else "none")
    return {
        "id": response_id, "object": "response", "created_at": created, "model": model, "error": None,
        "incomplete_details": None, "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
        "metadata": body.metadata or {}, "parallel_tool_calls": body.parallel_tool_calls is not False,
        "previous_response_id": body.previous_response_id, "reasoning": body.reasoning,
        "store": body.store is not False, "temperature": body.temperature if body.temperature is not None else 1.0,
        "text": body.text or {"format": {"type": "text"}}, "tool_choice": tool_choice, "tools": body.tools or [],
        "top_p": body.top_p if body.top_p is not None else 1.0, "top_logprobs": body.top_logprobs,
        "truncation": body.truncation or "disabled", "user": body.user,
    }
