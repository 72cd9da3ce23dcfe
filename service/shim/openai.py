"""OpenAI's routes: /v1/chat/completions (tools included), /v1/completions, /v1/models,
/v1/tokenize and /v1/detokenize, each a weft.v1 call."""
from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from fastapi import Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from clients.weft.v1 import inference_pb2 as pb
from service.shim.backend import EOF_MSG, SSE_HEADERS, Ctx, Stream, gather_all, guarded, merge, sse
from service.shim.base import ShimBase
from service.shim.models import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DetokenizeRequest,
    LoadLoraAdapterRequest,
    TokenizeRequest,
    UnloadLoraAdapterRequest,
)
from service.shim.tools import openai_call_deltas, openai_calls, openai_message_calls, openai_tools
from service.shim.translate import (
    FINISH,
    HttpError,
    RequestBuilder,
    add_usage,
    apply_sampling,
    chat_logprobs,
    completion_logprobs,
    rpc_error,
    spec_json,
    stop_reason,
    usage_json,
)


def choice_json(c: pb.Choice, index: int, body: dict[str, Any], logprobs: Any, token_ids: bool) -> dict[str, Any]:
    """One choice of a chat or completions answer, unary or a stream chunk: `body` is its
    message, delta or text; a finished one carries its finish and stop reasons and spec_decode."""
    fr = FINISH[c.finish_reason]
    item: dict[str, Any] = {"index": index, **body, "logprobs": logprobs, "finish_reason": fr}
    if fr:
        item["stop_reason"] = stop_reason(c)
        if (spec := spec_json(c)) is not None:
            item["spec_decode"] = spec
    if token_ids:
        item["token_ids"] = list(c.token_ids)
    return item


class OpenAIRoutes(ShimBase):
    # ---- chat ---------------------------------------------------------------------------------

    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        ctx = self._ctx(request)
        b = RequestBuilder(body.model)
        b.req.chat.SetInParent()
        b.name("chat", "messages")
        b.name("chat.messages", "messages")
        b.req.chat.messages.extend(chat_messages(body.messages))
        b.set("chat.add_generation_prompt", body.add_generation_prompt, "add_generation_prompt")
        legacy = openai_tools(b, body)
        apply_sampling(b, body)
        max_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        top = 0
        if body.logprobs:
            top = body.top_logprobs or 0
            b.set("logprobs", top, "top_logprobs")
        elif body.top_logprobs:
            raise HttpError(400, "top_logprobs: needs logprobs set to true", "top_logprobs")
        info = await self.backend.model_info(ctx.metadata)
        b.set("stopping.max_tokens", max_tokens if max_tokens is not None else info.max_model_len, max_param)
        cid = f"chatcmpl-{ctx.rid}"
        model = body.model or info.name   # a LoRA adapter's name, echoed
        token_ids = bool(body.return_token_ids)

        def finish(c: pb.Choice, item: dict[str, Any]) -> dict[str, Any]:
            if legacy and item["finish_reason"] == "tool_calls":
                item["finish_reason"] = "function_call"
            return item

        if not body.stream:
            resp = await self._unary(request, self.backend.stub.Generate(b.req, metadata=ctx.metadata), b)
            choices = [finish(c, choice_json(c, c.index, {"message": openai_message_calls(c, legacy)},
                                             {"content": chat_logprobs(c.logprobs, top)} if body.logprobs else None,
                                             token_ids))
                       for c in resp.choices]
            return JSONResponse({"id": cid, "object": "chat.completion", "created": ctx.created,
                                 "model": resp.model or model, "choices": choices, "usage": usage_json(resp.usage)},
                                headers={"x-request-id": ctx.rid})

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        [(call, first)] = await self._open_streams(request, [b.req], [ctx.metadata], b)

        async def events() -> AsyncIterator[str]:
            started: set[int] = set()
            usage: pb.Usage | None = None
            base = {"id": cid, "object": "chat.completion.chunk", "created": ctx.created, "model": model}
            try:
                msg = first
                while msg is not EOF_MSG:
                    c = msg.choice
                    if msg.HasField("usage"):
                        usage = msg.usage
                    delta: dict[str, Any] = {}
                    if c.index not in started:
                        started.add(c.index)
                        delta["role"] = "assistant"
                    if c.text or delta or c.finish_reason or c.logprobs or c.tool_calls or (token_ids and c.token_ids):
                        delta["content"] = c.text if c.text or not c.tool_calls else None
                        if c.tool_calls:
                            delta["function_call" if legacy else "tool_calls"] = openai_call_deltas(c.tool_calls, legacy)
                        item = finish(c, choice_json(c, c.index, {"delta": delta},
                                                     {"content": chat_logprobs(c.logprobs, top)} if body.logprobs
                                                     else None, token_ids))
                        chunk = {**base, "choices": [item]}
                        if include_usage:
                            chunk["usage"] = None
                        yield sse(chunk)
                    msg = await call.read()
                if include_usage and usage is not None:
                    yield sse({**base, "choices": [], "usage": usage_json(usage)})
            except grpc.aio.AioRpcError as exc:
                yield sse(rpc_error(exc, b).openai())
            finally:
                call.cancel()
            yield "data: [DONE]\n\n"

        return Stream(events(), media_type="text/event-stream", headers={**SSE_HEADERS, "x-request-id": ctx.rid})

    # ---- completions --------------------------------------------------------------------------

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        ctx = self._ctx(request)
        prompts = _prompts(body.prompt)
        if body.suffix:
            raise HttpError(400, "suffix: not supported", "suffix")
        if body.echo and body.logprobs is not None:
            raise HttpError(400, "echo: prompt logprobs are not supported (echo with logprobs)", "echo")
        builders = []
        for p in prompts:
            b = RequestBuilder(body.model)
            if isinstance(p, str):
                b.set("text", p, "prompt")
            else:
                b.req.token_ids.SetInParent()
                b.extend("token_ids.ids", p, "prompt")
                b.name("token_ids", "prompt")
            apply_sampling(b, body)
            b.set("stopping.max_tokens", body.max_tokens, "max_tokens")
            b.set("logprobs", body.logprobs, "logprobs")
            builders.append(b)
        n = builders[0].req.n if builders[0].req.HasField("n") else 1
        if body.best_of is not None and body.best_of != n:
            raise HttpError(400, "best_of: only best_of == n is supported", "best_of")
        info = await self.backend.model_info(ctx.metadata)
        echoes = [await self._echo_text(request, ctx, p) if body.echo else "" for p in prompts]
        cid = f"cmpl-{ctx.rid}"
        token_ids = bool(body.return_token_ids)
        mds = [ctx.metadata] if len(builders) == 1 else [ctx.with_id(f"{ctx.rid}-{i}") for i in range(len(builders))]
        want_lp = body.logprobs is not None

        if not body.stream:
            async def one(i: int) -> pb.GenerateResponse:
                try:
                    return await self.backend.stub.Generate(builders[i].req, metadata=mds[i])
                except grpc.aio.AioRpcError as exc:
                    raise rpc_error(exc, builders[i]) from None

            resps = await guarded(request, gather_all([one(i) for i in range(len(builders))]))
            choices = []
            usage = pb.Usage()
            for i, resp in enumerate(resps):
                add_usage(usage, resp.usage)
                for c in resp.choices:
                    lp = completion_logprobs(c.logprobs, len(echoes[i])) if want_lp else None
                    choices.append(choice_json(c, i * n + c.index, {"text": echoes[i] + c.text}, lp, token_ids))
            return JSONResponse({"id": cid, "object": "text_completion", "created": ctx.created,
                                 "model": body.model or info.name,
                                 "choices": choices, "usage": usage_json(usage)}, headers={"x-request-id": ctx.rid})

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        opened = await self._open_streams(request, [b.req for b in builders], mds, builders[0])

        async def events() -> AsyncIterator[str]:
            base = {"id": cid, "object": "text_completion", "created": ctx.created, "model": body.model or info.name}
            offsets: dict[int, int] = {}
            usage = pb.Usage()
            try:
                async for i, msg in merge(opened):
                    c = msg.choice
                    if msg.HasField("usage"):
                        add_usage(usage, msg.usage)
                    index = i * n + c.index
                    text = c.text
                    if index not in offsets:
                        text = echoes[i] + text
                        offsets[index] = 0
                    if not (text or c.finish_reason or c.logprobs or (token_ids and c.token_ids)):
                        continue
                    lp = completion_logprobs(c.logprobs, offsets[index] + len(text) - len(c.text)) if want_lp else None
                    offsets[index] += len(text)
                    chunk = {**base, "choices": [choice_json(c, index, {"text": text}, lp, token_ids)]}
                    if include_usage:
                        chunk["usage"] = None
                    yield sse(chunk)
                if include_usage:
                    yield sse({**base, "choices": [], "usage": usage_json(usage)})
            except grpc.aio.AioRpcError as exc:
                yield sse(rpc_error(exc, builders[0]).openai())
            finally:
                for call, _ in opened:
                    call.cancel()
            yield "data: [DONE]\n\n"

        return Stream(events(), media_type="text/event-stream", headers={**SSE_HEADERS, "x-request-id": ctx.rid})

    async def _echo_text(self, request: Request, ctx: Ctx, prompt: str | list[int]) -> str:
        if isinstance(prompt, str):
            return prompt
        req = pb.DetokenizeRequest(token_ids=prompt, skip_special_tokens=False)
        resp = await self._unary(request, self.backend.stub.Detokenize(req, metadata=ctx.metadata))
        return resp.text

    # ---- models and tokens --------------------------------------------------------------------

    def _model_json(self, info: pb.ModelInfo) -> dict[str, Any]:
        """vLLM's shape: a LoRA adapter has its directory as `root` and the base model as `parent`."""
        return {"id": info.name, "object": "model", "created": 0, "owned_by": "weft", "root": info.source or info.name,
                "parent": info.parent or None, "max_model_len": info.max_model_len}

    async def list_models(self, request: Request) -> Response:
        ctx = self._ctx(request)
        resp = await self._unary(request, self.backend.stub.ListModels(pb.ListModelsRequest(), metadata=ctx.metadata))
        return JSONResponse({"object": "list", "data": [self._model_json(m) for m in resp.models]})

    async def get_model(self, model_id: str, request: Request) -> Response:
        ctx = self._ctx(request)
        call = self.backend.stub.GetModelInfo(pb.GetModelInfoRequest(model=model_id), metadata=ctx.metadata)
        resp = await self._unary(request, call)
        return JSONResponse(self._model_json(resp.model))

    # ---- LoRA adapters (vLLM's routes) ---------------------------------------------------------

    async def load_lora_adapter(self, body: LoadLoraAdapterRequest, request: Request) -> Response:
        ctx = self._ctx(request)
        b = RequestBuilder()
        b.names.update(name="lora_name", path="lora_path")
        req = pb.LoadAdapterRequest(name=body.lora_name, path=body.lora_path)
        await self._unary(request, self.backend.stub.LoadAdapter(req, metadata=ctx.metadata), b)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    async def unload_lora_adapter(self, body: UnloadLoraAdapterRequest, request: Request) -> Response:
        ctx = self._ctx(request)
        b = RequestBuilder()
        b.names.update(name="lora_name")
        req = pb.UnloadAdapterRequest(name=body.lora_name)
        await self._unary(request, self.backend.stub.UnloadAdapter(req, metadata=ctx.metadata), b)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    async def tokenize(self, body: TokenizeRequest, request: Request) -> Response:
        ctx = self._ctx(request)
        req = pb.TokenizeRequest(model=body.model or "", return_tokens=bool(body.return_token_strs))
        b = RequestBuilder()
        if (body.prompt is None) == (body.messages is None):
            raise HttpError(400, "prompt: set exactly one of prompt or messages", "prompt")
        if body.messages is not None:
            req.chat.messages.extend(chat_messages(body.messages))
            if body.add_generation_prompt is not None:
                req.chat.add_generation_prompt = body.add_generation_prompt
            b.name("chat", "messages")
            b.name("chat.messages", "messages")
        else:
            req.text = body.prompt or ""
            b.name("text", "prompt")
        if body.add_special_tokens is not None:
            req.add_special_tokens = body.add_special_tokens
        resp = await self._unary(request, self.backend.stub.Tokenize(req, metadata=ctx.metadata), b)
        return JSONResponse({"count": resp.count, "max_model_len": resp.max_model_len, "tokens": list(resp.token_ids),
                             "token_strs": list(resp.tokens) if body.return_token_strs else None})

    async def detokenize(self, body: DetokenizeRequest, request: Request) -> Response:
        ctx = self._ctx(request)
        b = RequestBuilder()
        b.name("token_ids", "tokens")
        req = pb.DetokenizeRequest(model=body.model or "")
        try:
            req.token_ids.extend(body.tokens)
        except ValueError:
            raise HttpError(400, "tokens: every id must be a 32-bit integer", "tokens") from None
        resp = await self._unary(request, self.backend.stub.Detokenize(req, metadata=ctx.metadata), b)
        return JSONResponse({"prompt": resp.text})


def chat_messages(messages: Sequence[ChatMessage]) -> list[pb.ChatMessage]:
    """OpenAI messages as ChatMessages: text parts joined, `developer` read as system, an
    assistant turn's tool calls (or legacy function_call) and a tool turn's call id kept; a
    legacy `function` turn answers the function_call before it."""
    out = []
    last_legacy_call = ""
    for i, m in enumerate(messages):
        role = "system" if m.role == "developer" else m.role
        content = m.content
        if content is None:
            text = ""
        elif isinstance(content, str):
            text = content
        else:
            parts = []
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise HttpError(400, f"messages[{i}].content[{j}].type: only text parts are supported, got "
                                    f"{part.type!r}", f"messages[{i}].content[{j}].type")
                parts.append(part.text)
            text = "\n".join(parts)
        msg = pb.ChatMessage(role=role, content=text, tool_call_id=m.tool_call_id or "")
        if m.tool_calls:
            msg.tool_calls.extend(openai_calls(m.tool_calls, f"messages[{i}].tool_calls"))
        elif m.function_call:
            last_legacy_call = f"call_legacy_{i}"
            msg.tool_calls.extend(openai_calls([{"id": last_legacy_call, "function": m.function_call}],
                                               f"messages[{i}].function_call"))
        if role == "function":
            msg.role, msg.tool_call_id, msg.name = "tool", last_legacy_call, m.name or ""
        elif role == "tool" and m.name:
            msg.name = m.name
        out.append(msg)
    return out


def _prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """OpenAI's prompt: a string, a list of strings, token ids, or a list of token-id lists."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise HttpError(400, "prompt: must not be empty", "prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]   # type: ignore[arg-type]
    return list(prompt)  # type: ignore[arg-type]
