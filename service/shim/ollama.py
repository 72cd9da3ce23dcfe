"""Ollama's routes: /api/generate, /api/chat (tools included), /api/tags, /api/show, /api/ps
and /api/version, each a weft.v1 call; NDJSON streaming by default, as Ollama does."""
from __future__ import annotations

import json

import hashlib
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from clients.client import add_tool_call_piece
from clients.weft.v1 import inference_pb2 as pb
from service.shim.backend import EOF_MSG, Ctx, Stream, dumps, now_iso
from service.shim.base import ShimBase
from service.shim.models import (
    OllamaChatRequest,
    OllamaCopyRequest,
    OllamaCreateRequest,
    OllamaDeleteRequest,
    OllamaGenerateRequest,
    OllamaOptions,
    OllamaShowRequest,
)
from service.shim.tools import add_tool, ollama_calls, ollama_history
from service.modelfile import MESSAGE_ROLES, Modelfile, parse, set_parameter
from service.shim.translate import FINISH, OLLAMA_DONE, HttpError, RequestBuilder, ollama_guided, ollama_logprobs, rpc_error

OLLAMA_API_VERSION = "0.12.0"     # the Ollama API this shim follows (GET /api/version)
OLLAMA_DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9}   # Ollama's defaults when options omit them


class OllamaRoutes(ShimBase):
    async def _ollama_info(self, ctx: Ctx, name: str | None, main: pb.ModelInfo) -> pb.ModelInfo:
        """The ModelInfo of the model a request names: the main one, or another the server lists (a
        LoRA adapter, an embedding model served beside it); an unknown name is 404. Ollama names
        carry a tag (`name:latest`); a model answers to both."""
        wanted = (name or "").removesuffix(":latest")
        if not wanted or wanted == main.name:
            return main
        try:
            resp = await self.backend.stub.GetModelInfo(pb.GetModelInfoRequest(model=wanted), metadata=ctx.metadata,
                                                        timeout=30)
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.NOT_FOUND:
                raise HttpError(404, f"model {wanted!r} not found; this server serves {main.name!r}", "model") from None
            raise rpc_error(exc) from None
        return resp.model

    async def _generation_info(self, ctx: Ctx, name: str | None) -> pb.ModelInfo:
        """The named model's info for /api/generate and /api/chat; 400 for an embedding model."""
        info = await self._ollama_info(ctx, name, await self.backend.model_info(ctx.metadata))
        if info.features.embedding_only:
            raise HttpError(400, f"model: {info.name!r} is an embedding model: it does not generate (use /api/embed)",
                            "model")
        return info

    def _ollama_sampling(self, b: RequestBuilder, opts: OllamaOptions | None, fmt: Any, info: pb.ModelInfo,
                         logprobs: bool | None, top_logprobs: int | None) -> None:
        o = opts or OllamaOptions()
        # Ollama's defaults, except where the model's Modelfile sets its own (the server fills those).
        own = _modelfile(info).parameters
        b.set("sampling.temperature", _default(o.temperature, "temperature", own), "options.temperature")
        b.set("sampling.top_p", _default(o.top_p, "top_p", own), "options.top_p")
        b.set("sampling.top_k", _default(o.top_k, "top_k", own), "options.top_k")
        b.set("sampling.min_p", o.min_p, "options.min_p")
        b.set("sampling.seed", o.seed, "options.seed")
        b.set("sampling.repetition_penalty", o.repeat_penalty, "options.repeat_penalty")
        b.set("sampling.presence_penalty", o.presence_penalty, "options.presence_penalty")
        b.set("sampling.frequency_penalty", o.frequency_penalty, "options.frequency_penalty")
        if o.stop is not None:
            b.extend("stopping.stop", [o.stop] if isinstance(o.stop, str) else o.stop, "options.stop")
        num_predict = o.num_predict
        if num_predict is None and "num_predict" in own:
            num_predict = None   # the model's own, filled by the server
        elif num_predict is None or num_predict < 0:   # -1: unlimited, -2: fill the context
            num_predict = info.max_model_len
        b.set("stopping.max_tokens", num_predict, "options.num_predict")
        if logprobs or top_logprobs:
            b.set("logprobs", top_logprobs or 0, "top_logprobs")
        guided = ollama_guided(fmt)
        if guided is not None:
            b.req.guided.CopyFrom(guided)
            b.name("guided", "format")
            b.name(f"guided.{guided.WhichOneof('kind')}", "format")

    async def ollama_generate(self, body: OllamaGenerateRequest, request: Request) -> Response:
        ctx = self._ctx(request)
        info = await self._generation_info(ctx, body.model)
        model = info.name
        if body.images:
            raise HttpError(400, "images: this model takes text only", "images")
        if body.template:
            raise HttpError(400, "template: custom prompt templates are not supported; the model's chat "
                            "template is used (or send raw=true)", "template")
        if body.suffix:
            raise HttpError(400, "suffix: not supported", "suffix")
        if not body.prompt and not body.context:
            done_reason = "unload" if body.keep_alive in (0, "0", "0s") else "load"
            return JSONResponse({"model": model, "created_at": now_iso(), "response": "", "done": True,
                                 "done_reason": done_reason})
        # The prompt as token ids (so that `context` can be returned and continued): the text as
        # is with raw, else a user turn (after an optional system turn) in the chat template.
        tok = pb.TokenizeRequest()
        if body.raw:
            tok.text = body.prompt or ""
            if body.context:
                tok.add_special_tokens = False
        else:
            turns = ([pb.ChatMessage(role="system", content=body.system)] if body.system else [])
            turns.append(pb.ChatMessage(role="user", content=body.prompt or ""))
            tok.chat.messages.extend(turns)
        ids: list[int] = list(body.context or [])
        if body.prompt:
            tb = RequestBuilder()
            tb.name("text", "prompt")
            tb.name("chat", "prompt")
            resp = await self._unary(request, self.backend.stub.Tokenize(tok, metadata=ctx.metadata), tb)
            ids.extend(resp.token_ids)
        b = RequestBuilder(model)
        b.req.token_ids.SetInParent()
        b.extend("token_ids.ids", ids, "context")
        b.name("token_ids", "prompt")
        self._ollama_sampling(b, body.options, body.format, info, body.logprobs, body.top_logprobs)
        return await self._ollama_run(request, ctx, b, model, bool(body.stream), chat=False, prompt_ids=ids)

    async def ollama_chat(self, body: OllamaChatRequest, request: Request) -> Response:
        ctx = self._ctx(request)
        info = await self._generation_info(ctx, body.model)
        model = info.name
        if not body.messages:   # Ollama: an empty chat loads the model
            return JSONResponse({"model": model, "created_at": now_iso(),
                                 "message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "load"})
        b = RequestBuilder(model)
        b.req.chat.SetInParent()
        b.name("chat", "messages")
        b.name("chat.messages", "messages")
        for i, m in enumerate(body.messages):
            if m.images:
                raise HttpError(400, f"messages[{i}].images: this model takes text only", f"messages[{i}].images")
        b.req.chat.messages.extend(ollama_history(body.messages))
        for i, t in enumerate(body.tools or ()):
            if not isinstance(t, dict) or t.get("type", "function") != "function":
                raise HttpError(400, f"tools[{i}].type: only function tools are supported", f"tools[{i}].type")
            add_tool(b, i, t.get("function"), f"tools[{i}].function")
        self._ollama_sampling(b, body.options, body.format, info, body.logprobs, body.top_logprobs)
        return await self._ollama_run(request, ctx, b, model, bool(body.stream), chat=True, prompt_ids=None)

    async def _ollama_run(self, request: Request, ctx: Ctx, b: RequestBuilder, model: str, stream: bool,
                          chat: bool, prompt_ids: list[int] | None) -> Response:
        want_lp = b.req.HasField("logprobs")

        def final(c: pb.Choice, usage: pb.Usage, t_first: float | None, text: str, out_ids: list[int],
                  calls: Sequence[pb.ToolCall] = ()) -> dict:
            now = time.perf_counter()
            first = t_first if t_first is not None else now
            doc: dict[str, Any] = {"model": model, "created_at": now_iso()}
            if chat:
                doc["message"] = {"role": "assistant", "content": text}
                if calls:
                    doc["message"]["tool_calls"] = ollama_calls(calls)
            else:
                doc["response"] = text
            doc.update({
                "done": True, "done_reason": OLLAMA_DONE.get(FINISH[c.finish_reason] or "stop", "stop"),
                "total_duration": int((now - ctx.t0) * 1e9), "load_duration": 0,
                "prompt_eval_count": usage.prompt_tokens, "prompt_eval_duration": int((first - ctx.t0) * 1e9),
                "eval_count": usage.completion_tokens, "eval_duration": int((now - first) * 1e9)})
            if prompt_ids is not None:
                doc["context"] = prompt_ids + out_ids
            return doc

        if not stream:
            resp = await self._unary(request, self.backend.stub.Generate(b.req, metadata=ctx.metadata), b)
            c = resp.choices[0]
            doc = final(c, resp.usage, None, c.text, list(c.token_ids), c.tool_calls)
            if want_lp:
                doc["logprobs"] = ollama_logprobs(c.logprobs)
            return JSONResponse(doc, headers={"x-request-id": ctx.rid})

        [(call, first)] = await self._open_streams(request, [b.req], [ctx.metadata], b)

        async def lines() -> AsyncIterator[str]:
            out_ids: list[int] = []
            t_first: float | None = None
            calls: dict[int, pb.ToolCall] = {}   # Ollama sends whole calls: gathered, then sent with the final line
            try:
                msg = first
                while msg is not EOF_MSG:
                    c = msg.choice
                    out_ids.extend(c.token_ids)
                    for piece in c.tool_calls:
                        add_tool_call_piece(calls, piece.index, piece)
                    if t_first is None and c.token_ids:
                        t_first = time.perf_counter()
                    if c.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                        doc = final(c, msg.usage, t_first, c.text, out_ids, [calls[i] for i in sorted(calls)])
                    elif c.text or (want_lp and c.logprobs):
                        doc = {"model": model, "created_at": now_iso(), "done": False}
                        if chat:
                            doc["message"] = {"role": "assistant", "content": c.text}
                        else:
                            doc["response"] = c.text
                    else:
                        msg = await call.read()
                        continue
                    if want_lp:
                        doc["logprobs"] = ollama_logprobs(c.logprobs)
                    yield dumps(doc) + "\n"
                    msg = await call.read()
            except grpc.aio.AioRpcError as exc:
                yield dumps(rpc_error(exc, b).ollama()) + "\n"
            finally:
                call.cancel()

        return Stream(lines(), media_type="application/x-ndjson", headers={"x-request-id": ctx.rid})

    def _ollama_details(self, info: pb.ModelInfo) -> dict[str, Any]:
        family = info.architecture.removesuffix("ForCausalLM").removesuffix("Model").lower() or "unknown"
        return {"parent_model": info.parent, "format": "safetensors", "family": family, "families": [family],
                "parameter_size": "", "quantization_level": info.dtype.upper()}

    def _ollama_entry(self, info: pb.ModelInfo) -> dict[str, Any]:
        return {"name": info.name, "model": info.name, "modified_at": now_iso(), "size": 0,
                "digest": hashlib.sha256(info.name.encode()).hexdigest(), "details": self._ollama_details(info)}

    async def ollama_tags(self, request: Request) -> Response:
        ctx = self._ctx(request)
        resp = await self._unary(request, self.backend.stub.ListModels(pb.ListModelsRequest(), metadata=ctx.metadata))
        return JSONResponse({"models": [self._ollama_entry(m) for m in resp.models]})

    async def ollama_ps(self, request: Request) -> Response:
        ctx = self._ctx(request)
        resp = await self._unary(request, self.backend.stub.ListModels(pb.ListModelsRequest(), metadata=ctx.metadata))
        return JSONResponse({"models": [{**self._ollama_entry(m), "expires_at": "9999-12-31T23:59:59Z",
                                         "size_vram": 0, "context_length": m.max_model_len} for m in resp.models]})

    async def ollama_show(self, body: OllamaShowRequest, request: Request) -> Response:
        ctx = self._ctx(request)
        info = await self._ollama_info(ctx, body.model or body.name, await self.backend.model_info(ctx.metadata))
        name = info.name
        caps = [] if info.features.embedding_only else ["completion"]
        if info.features.embeddings:
            caps.append("embedding")
        if info.features.tool_calls:
            caps.append("tools")
        if info.features.guided_decoding:
            caps.append("structured_outputs")
        mf = _modelfile(info)
        params = "\n".join(f"{k} {json.dumps(x) if isinstance(x, str) else x}"
                           for k, v in mf.parameters.items() for x in (v if isinstance(v, list) else [v]))
        return JSONResponse({
            "license": "\n".join(mf.license), "modelfile": info.modelfile or f"# Served by Weft\nFROM {name}\n",
            "parameters": params, "template": mf.template or "", "system": mf.system or "",
            "details": self._ollama_details(info),
            "model_info": {"general.architecture": info.architecture, "general.name": name,
                           "weft.context_length": info.max_model_len, "weft.vocab_size": info.vocab_size,
                           "weft.dtype": info.dtype, "weft.device": info.device},
            "capabilities": caps, "modified_at": now_iso()})

    # ---- the model store ---------------------------------------------------------------------

    async def ollama_create(self, body: OllamaCreateRequest, request: Request) -> Response:
        ctx = self._ctx(request)
        name = body.model or body.name
        if not name:
            raise HttpError(400, "model: required (the new model's name)", "model")
        if body.files:
            raise HttpError(400, "files: uploaded blobs are not supported; send `from` with a store name or a path on "
                            "the server", "files")
        if body.quantize:
            raise HttpError(400, "quantize: re-quantising is not supported", "quantize")
        text = body.modelfile if body.modelfile and not body.from_ else _create_modelfile(body).render()
        b = RequestBuilder()
        b.names.update(name="model", modelfile="modelfile")
        call = self.backend.stub.CreateModel(pb.CreateModelRequest(name=name, modelfile=text), metadata=ctx.metadata)
        await self._unary(request, call, b)
        if body.stream is False:
            return JSONResponse({"status": "success"})

        async def lines() -> AsyncIterator[str]:
            for status in ("reading model metadata", "writing manifest", "success"):
                yield dumps({"status": status}) + "\n"
        return Stream(lines(), media_type="application/x-ndjson")

    async def ollama_delete(self, body: OllamaDeleteRequest, request: Request) -> Response:
        ctx = self._ctx(request)
        b = RequestBuilder()
        b.names.update(name="model")
        req = pb.DeleteModelRequest(name=body.model or body.name or "")
        await self._unary(request, self.backend.stub.DeleteModel(req, metadata=ctx.metadata), b)
        return Response(status_code=200)

    async def ollama_copy(self, body: OllamaCopyRequest, request: Request) -> Response:
        ctx = self._ctx(request)
        req = pb.CopyModelRequest(source=body.source, destination=body.destination)
        await self._unary(request, self.backend.stub.CopyModel(req, metadata=ctx.metadata))
        return Response(status_code=200)

    async def ollama_version(self) -> Response:
        return JSONResponse({"version": OLLAMA_API_VERSION})


def _default(value: Any, name: str, own: dict[str, Any]) -> Any:
    if value is not None or name in own:
        return value
    return OLLAMA_DEFAULTS[name]


def _create_modelfile(body: OllamaCreateRequest) -> Modelfile:
    """/api/create's JSON fields as a Modelfile, each value checked, errors naming the field."""
    if not body.from_:
        raise HttpError(400, "from: required (a store name, or a path on the server)", "from")
    mf = Modelfile(body.from_, body.system, body.template)
    for name, value in (body.parameters or {}).items():
        for v in value if isinstance(value, list) else [value]:
            try:
                set_parameter(mf.parameters, name, v)
            except ValueError as exc:
                raise HttpError(400, f"parameters.{name}: {exc}", f"parameters.{name}") from None
    for i, m in enumerate(body.messages or ()):
        if m.get("role") not in MESSAGE_ROLES or not isinstance(m.get("content"), str):
            raise HttpError(400, f"messages[{i}]: needs a role ({', '.join(MESSAGE_ROLES)}) and content",
                            f"messages[{i}]")
        mf.messages.append({"role": m["role"], "content": m["content"]})
    mf.adapters = list((body.adapters or {}).values())
    mf.license = [body.license] if isinstance(body.license, str) else list(body.license or [])
    return mf


def _modelfile(info: pb.ModelInfo) -> Modelfile:
    """A store model's Modelfile (ModelInfo.modelfile); an empty one for a model served by path."""
    return parse(info.modelfile) if info.modelfile else Modelfile(info.name)
