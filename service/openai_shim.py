"""The REST shim: OpenAI- and Ollama-compatible HTTP in front of the gRPC API.

A thin translation layer: every request becomes a weft.v1 call on a gRPC channel (to the same
process for `weft serve`, to a remote server for `weft shim --target`), and every answer or
status comes back as OpenAI's or Ollama's JSON. It never touches the engine.

    OpenAI   POST /v1/chat/completions, /v1/completions, /v1/tokenize, /v1/detokenize;
             GET /v1/models, /v1/models/{model}
    Ollama   POST /api/generate, /api/chat, /api/show; GET /api/tags, /api/ps, /api/version
    Ops      GET /health (503 while loading or draining), /metrics (Prometheus), /version,
             /openapi.json, /docs

Streaming is SSE ending with `data: [DONE]` (OpenAI) or NDJSON (Ollama, streaming by default).
An error before the first token is an HTTP status with OpenAI's error JSON; one after it is an
SSE `data: {"error": ...}` event (an `{"error": ...}` line for Ollama). A client that
disconnects cancels its gRPC call, which aborts the request and frees its KV blocks.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import datetime, timezone
from typing import Any, TypeVar

import anyio
import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from grpc_health.v1 import health_pb2, health_pb2_grpc
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clients.weft.v1 import inference_pb2 as pb
from clients.weft.v1 import inference_pb2_grpc as pb_grpc
from service.shim.models import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DetokenizeRequest,
    OllamaChatRequest,
    OllamaGenerateRequest,
    OllamaOptions,
    OllamaShowRequest,
    TokenizeRequest,
)
from service.shim.translate import (
    FINISH,
    OLLAMA_DONE,
    HttpError,
    RequestBuilder,
    add_usage,
    apply_sampling,
    chat_logprobs,
    completion_logprobs,
    ollama_guided,
    ollama_logprobs,
    rpc_error,
    spec_json,
    stop_reason,
    usage_json,
)

log = logging.getLogger("weft.http")
T = TypeVar("T")

DEFAULT_HTTP_PORT = 8000
WEFT_VERSION = "0.1.0"
OLLAMA_API_VERSION = "0.12.0"     # the Ollama API this shim follows (GET /api/version)
OLLAMA_DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9}   # Ollama's defaults when options omit them
MODEL_INFO_TTL_S = 10.0
MAX_REQUEST_ID_CHARS = 256
_EOF = grpc.aio.EOF
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# ---- the gRPC side ----------------------------------------------------------------------------


class GrpcBackend:
    """One channel to a Weft gRPC server. Create it on the event loop that serves HTTP."""

    def __init__(self, target: str, *, api_key: str | None = None, tls: bool = False,
                 root_certificates: bytes | None = None) -> None:
        self.target = target
        self.api_key = api_key
        options = [("grpc.max_receive_message_length", 64 * 1024 * 1024),
                   ("grpc.max_send_message_length", 64 * 1024 * 1024)]
        if tls or root_certificates:
            creds = grpc.ssl_channel_credentials(root_certificates)
            self.channel = grpc.aio.secure_channel(target, creds, options=options)
        else:
            self.channel = grpc.aio.insecure_channel(target, options=options)
        self.stub = pb_grpc.InferenceServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self._info: pb.ModelInfo | None = None
        self._info_at = 0.0

    async def model_info(self, metadata: Sequence[tuple[str, str]]) -> pb.ModelInfo:
        """The served model's description (cached for a few seconds; errors are HttpErrors)."""
        now = time.monotonic()
        if self._info is None or now - self._info_at > MODEL_INFO_TTL_S:
            try:
                resp = await self.stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=metadata, timeout=30)
            except grpc.aio.AioRpcError as exc:
                raise rpc_error(exc) from None
            self._info, self._info_at = resp.model, now
        return self._info

    async def serving(self) -> str:
        try:
            resp = await self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        except grpc.aio.AioRpcError as exc:
            return f"unreachable ({exc.code().name})"
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    async def close(self) -> None:
        await self.channel.close()


class _ClientGone(Exception):
    """The HTTP client disconnected while its request was running."""


async def _until_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _guarded(request: Request, awaitable: Awaitable[T]) -> T:
    """Await `awaitable` unless the client disconnects first: then cancel it (which cancels the
    gRPC call and so aborts the request on the server) and raise _ClientGone."""
    task = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:   # this handler itself was cancelled (shutdown)
        task.cancel()
        watch.cancel()
        raise
    watch.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    raise _ClientGone()


class _Stream(StreamingResponse):
    """A streamed body that also watches for the client going away, whatever the ASGI server's
    spec version: a disconnect cancels the body iterator (its `finally` cancels the gRPC call)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as tg:
            async def body() -> None:
                with contextlib.suppress(OSError):
                    await self.stream_response(send)
                tg.cancel_scope.cancel()

            tg.start_soon(body)
            await self.listen_for_disconnect(receive)
            tg.cancel_scope.cancel()


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _sse(obj: Any) -> str:
    return f"data: {_dumps(obj)}\n\n"


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


# ---- the app ----------------------------------------------------------------------------------


class _Ctx:
    """Per HTTP request: its id, the gRPC metadata to send, when it arrived."""

    __slots__ = ("rid", "metadata", "created", "t0")

    def __init__(self, rid: str, metadata: tuple[tuple[str, str], ...]) -> None:
        self.rid, self.metadata = rid, metadata
        self.created = int(time.time())
        self.t0 = time.perf_counter()

    def with_id(self, rid: str) -> tuple[tuple[str, str], ...]:
        return tuple((k, rid if k == "x-request-id" else v) for k, v in self.metadata)


class Shim:
    """The routes, bound to one GrpcBackend. `app` is the ASGI application."""

    def __init__(self, backend: GrpcBackend, *, api_key: str | None = None, metrics: Any = None) -> None:
        self.backend = backend
        self.api_key = api_key
        self.metrics = metrics      # service.metrics.WeftMetrics or None
        self.app = self._build()

    # ---- plumbing -----------------------------------------------------------------------------

    def _ctx(self, request: Request) -> _Ctx:
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        if len(rid) > MAX_REQUEST_ID_CHARS or not _printable(rid):
            raise HttpError(400, f"x-request-id: at most {MAX_REQUEST_ID_CHARS} printable ASCII characters",
                            "x-request-id")
        metadata: list[tuple[str, str]] = [("x-request-id", rid)]
        if self.api_key:
            metadata.append(("authorization", f"Bearer {self.api_key}"))
        elif (auth := request.headers.get("authorization")) and _printable(auth):
            metadata.append(("authorization", auth))   # let the target server judge the key
        return _Ctx(rid, tuple(metadata))

    async def _unary(self, request: Request, call: Awaitable[T], builder: RequestBuilder | None = None) -> T:
        try:
            return await _guarded(request, call)
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(exc, builder) from None

    async def _open_streams(self, request: Request, reqs: Sequence[pb.GenerateRequest],
                            metadata: Sequence[Sequence[tuple[str, str]]], builder: RequestBuilder,
                            ) -> list[tuple[Any, Any]]:
        """Start GenerateStream calls and wait for each one's first message, so that a refusal is
        still an HTTP status. Returns [(call, first message)]; on any failure all are cancelled."""
        calls = [self.backend.stub.GenerateStream(r, metadata=m) for r, m in zip(reqs, metadata)]
        try:
            if len(calls) == 1:
                firsts = [await _guarded(request, calls[0].read())]
            else:
                firsts = await _guarded(request, asyncio.gather(*(c.read() for c in calls)))
        except grpc.aio.AioRpcError as exc:
            for c in calls:
                c.cancel()
            raise rpc_error(exc, builder) from None
        except BaseException:
            for c in calls:
                c.cancel()
            raise
        if any(f is _EOF for f in firsts):   # not from a well-behaved server: a stream ends after a finish
            for c in calls:
                c.cancel()
            raise HttpError(500, "the server ended the stream without a result")
        return list(zip(calls, firsts))

    def _build(self) -> FastAPI:
        app = FastAPI(title="Weft REST API", version=WEFT_VERSION,
                      description="OpenAI- and Ollama-compatible HTTP API of a Weft inference server "
                                  "(a thin layer over its gRPC API, weft.v1).")
        app.add_exception_handler(HttpError, self._on_http_error)  # type: ignore[arg-type]
        app.add_exception_handler(RequestValidationError, self._on_validation_error)  # type: ignore[arg-type]
        app.add_exception_handler(StarletteHTTPException, self._on_starlette_error)  # type: ignore[arg-type]
        app.add_exception_handler(_ClientGone, self._on_client_gone)  # type: ignore[arg-type]
        app.add_exception_handler(Exception, self._on_bug)

        app.post("/v1/chat/completions", tags=["openai"])(self.chat_completions)
        app.post("/v1/completions", tags=["openai"])(self.completions)
        app.get("/v1/models", tags=["openai"])(self.list_models)
        app.get("/v1/models/{model_id:path}", tags=["openai"])(self.get_model)
        for prefix in ("/v1", ""):
            app.post(f"{prefix}/tokenize", tags=["openai"], include_in_schema=bool(prefix))(self.tokenize)
            app.post(f"{prefix}/detokenize", tags=["openai"], include_in_schema=bool(prefix))(self.detokenize)
        app.post("/api/generate", tags=["ollama"])(self.ollama_generate)
        app.post("/api/chat", tags=["ollama"])(self.ollama_chat)
        app.get("/api/tags", tags=["ollama"])(self.ollama_tags)
        app.post("/api/show", tags=["ollama"])(self.ollama_show)
        app.get("/api/ps", tags=["ollama"])(self.ollama_ps)
        app.get("/api/version", tags=["ollama"])(self.ollama_version)
        app.get("/health", tags=["ops"])(self.health)
        app.get("/metrics", tags=["ops"])(self.prometheus)
        app.get("/version", tags=["ops"])(self.version)
        return app

    def asgi(self) -> ASGIApp:
        """The app with API-key checks and request counting in front."""
        return _Gate(self.app, self.api_key, self.metrics)

    # ---- errors -------------------------------------------------------------------------------

    @staticmethod
    def _error_response(request: Request, err: HttpError) -> JSONResponse:
        body = err.ollama() if request.url.path.startswith("/api/") else err.openai()
        return JSONResponse(body, status_code=err.status, headers=err.headers)

    async def _on_http_error(self, request: Request, exc: HttpError) -> JSONResponse:
        return self._error_response(request, exc)

    async def _on_validation_error(self, request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [p for p in first.get("loc", ()) if p != "body"]
        param = _loc_param(loc)
        msg = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            param, msg = None, "the body is not valid JSON"
        message = f"{param}: {msg}" if param else msg
        return self._error_response(request, HttpError(400, message, param))

    async def _on_starlette_error(self, request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return self._error_response(request, HttpError(exc.status_code, str(exc.detail)))

    async def _on_client_gone(self, request: Request, exc: _ClientGone) -> Response:
        return Response(status_code=499)   # nobody reads it: the client has gone

    async def _on_bug(self, request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error serving %s", request.url.path)
        return self._error_response(request, HttpError(500, f"internal error: {type(exc).__name__}: {exc}"))

    # ---- OpenAI: chat -------------------------------------------------------------------------

    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        ctx = self._ctx(request)
        b = RequestBuilder(body.model)
        b.req.chat.SetInParent()
        b.name("chat", "messages")
        b.name("chat.messages", "messages")
        b.req.chat.messages.extend(_chat_messages(body.messages))
        b.set("chat.add_generation_prompt", body.add_generation_prompt, "add_generation_prompt")
        if body.tools and body.tool_choice != "none":
            raise HttpError(400, "tools: tool calling is not supported", "tools")
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
        model = info.name
        token_ids = bool(body.return_token_ids)
        if not body.stream:
            resp = await self._unary(request, self.backend.stub.Generate(b.req, metadata=ctx.metadata), b)
            choices = []
            for c in resp.choices:
                item: dict[str, Any] = {
                    "index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": {"content": chat_logprobs(c.logprobs, top)} if body.logprobs else None,
                    "finish_reason": FINISH[c.finish_reason], "stop_reason": stop_reason(c)}
                if token_ids:
                    item["token_ids"] = list(c.token_ids)
                if (spec := spec_json(c)) is not None:
                    item["spec_decode"] = spec
                choices.append(item)
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
                while msg is not _EOF:
                    c = msg.choice
                    if msg.HasField("usage"):
                        usage = msg.usage
                    delta: dict[str, Any] = {}
                    if c.index not in started:
                        started.add(c.index)
                        delta["role"] = "assistant"
                    fr = FINISH[c.finish_reason]
                    if c.text or delta or fr or c.logprobs or (token_ids and c.token_ids):
                        delta["content"] = c.text
                        item: dict[str, Any] = {"index": c.index, "delta": delta, "logprobs": None,
                                                "finish_reason": fr}
                        if fr:
                            item["stop_reason"] = stop_reason(c)
                            if (spec := spec_json(c)) is not None:
                                item["spec_decode"] = spec
                        if body.logprobs:
                            item["logprobs"] = {"content": chat_logprobs(c.logprobs, top)}
                        if token_ids:
                            item["token_ids"] = list(c.token_ids)
                        chunk = {**base, "choices": [item]}
                        if include_usage:
                            chunk["usage"] = None
                        yield _sse(chunk)
                    msg = await call.read()
                if include_usage and usage is not None:
                    yield _sse({**base, "choices": [], "usage": usage_json(usage)})
            except grpc.aio.AioRpcError as exc:
                yield _sse(rpc_error(exc, b).openai())
            finally:
                call.cancel()
            yield "data: [DONE]\n\n"

        return _Stream(events(), media_type="text/event-stream", headers={**_SSE_HEADERS, "x-request-id": ctx.rid})

    # ---- OpenAI: completions ------------------------------------------------------------------

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

            resps = await _guarded(request, _gather([one(i) for i in range(len(builders))]))
            choices = []
            usage = pb.Usage()
            for i, resp in enumerate(resps):
                add_usage(usage, resp.usage)
                for c in resp.choices:
                    item: dict[str, Any] = {
                        "index": i * n + c.index, "text": echoes[i] + c.text,
                        "logprobs": completion_logprobs(c.logprobs, len(echoes[i])) if want_lp else None,
                        "finish_reason": FINISH[c.finish_reason], "stop_reason": stop_reason(c)}
                    if token_ids:
                        item["token_ids"] = list(c.token_ids)
                    if (spec := spec_json(c)) is not None:
                        item["spec_decode"] = spec
                    choices.append(item)
            return JSONResponse({"id": cid, "object": "text_completion", "created": ctx.created, "model": info.name,
                                 "choices": choices, "usage": usage_json(usage)}, headers={"x-request-id": ctx.rid})

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        opened = await self._open_streams(request, [b.req for b in builders], mds, builders[0])

        async def events() -> AsyncIterator[str]:
            base = {"id": cid, "object": "text_completion", "created": ctx.created, "model": info.name}
            offsets: dict[int, int] = {}
            usage = pb.Usage()
            try:
                async for i, msg in _merge(opened):
                    c = msg.choice
                    if msg.HasField("usage"):
                        add_usage(usage, msg.usage)
                    index = i * n + c.index
                    text = c.text
                    if index not in offsets:
                        text = echoes[i] + text
                        offsets[index] = 0
                    fr = FINISH[c.finish_reason]
                    if not (text or fr or c.logprobs or (token_ids and c.token_ids)):
                        continue
                    item: dict[str, Any] = {"index": index, "text": text, "logprobs": None, "finish_reason": fr}
                    if fr:
                        item["stop_reason"] = stop_reason(c)
                        if (spec := spec_json(c)) is not None:
                            item["spec_decode"] = spec
                    if want_lp:
                        item["logprobs"] = completion_logprobs(c.logprobs, offsets[index] + len(text) - len(c.text))
                    if token_ids:
                        item["token_ids"] = list(c.token_ids)
                    offsets[index] += len(text)
                    chunk = {**base, "choices": [item]}
                    if include_usage:
                        chunk["usage"] = None
                    yield _sse(chunk)
                if include_usage:
                    yield _sse({**base, "choices": [], "usage": usage_json(usage)})
            except grpc.aio.AioRpcError as exc:
                yield _sse(rpc_error(exc, builders[0]).openai())
            finally:
                for call, _ in opened:
                    call.cancel()
            yield "data: [DONE]\n\n"

        return _Stream(events(), media_type="text/event-stream", headers={**_SSE_HEADERS, "x-request-id": ctx.rid})

    async def _echo_text(self, request: Request, ctx: _Ctx, prompt: str | list[int]) -> str:
        if isinstance(prompt, str):
            return prompt
        req = pb.DetokenizeRequest(token_ids=prompt, skip_special_tokens=False)
        resp = await self._unary(request, self.backend.stub.Detokenize(req, metadata=ctx.metadata))
        return resp.text

    # ---- OpenAI: models and tokens ------------------------------------------------------------

    def _model_json(self, info: pb.ModelInfo) -> dict[str, Any]:
        return {"id": info.name, "object": "model", "created": 0, "owned_by": "weft", "root": info.name,
                "max_model_len": info.max_model_len}

    async def list_models(self, request: Request) -> Response:
        ctx = self._ctx(request)
        resp = await self._unary(request, self.backend.stub.ListModels(pb.ListModelsRequest(), metadata=ctx.metadata))
        return JSONResponse({"object": "list", "data": [self._model_json(m) for m in resp.models]})

    async def get_model(self, model_id: str, request: Request) -> Response:
        ctx = self._ctx(request)
        call = self.backend.stub.GetModelInfo(pb.GetModelInfoRequest(model=model_id), metadata=ctx.metadata)
        resp = await self._unary(request, call)
        return JSONResponse(self._model_json(resp.model))

    async def tokenize(self, body: TokenizeRequest, request: Request) -> Response:
        ctx = self._ctx(request)
        req = pb.TokenizeRequest(model=body.model or "", return_tokens=bool(body.return_token_strs))
        b = RequestBuilder()
        if (body.prompt is None) == (body.messages is None):
            raise HttpError(400, "prompt: set exactly one of prompt or messages", "prompt")
        if body.messages is not None:
            req.chat.messages.extend(_chat_messages(body.messages))
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

    # ---- Ollama -------------------------------------------------------------------------------

    def _ollama_model(self, name: str | None, info: pb.ModelInfo) -> str:
        """Ollama names carry a tag (`name:latest`); the served model answers to both."""
        name = name or ""
        if name.endswith(":latest"):
            name = name[: -len(":latest")]
        if name and name != info.name:
            raise HttpError(404, f"model {name!r} not found; this server serves {info.name!r}", "model")
        return info.name

    def _ollama_sampling(self, b: RequestBuilder, opts: OllamaOptions | None, fmt: Any, info: pb.ModelInfo,
                         logprobs: bool | None, top_logprobs: int | None) -> None:
        o = opts or OllamaOptions()
        b.set("sampling.temperature", _default(o.temperature, "temperature"), "options.temperature")
        b.set("sampling.top_p", _default(o.top_p, "top_p"), "options.top_p")
        b.set("sampling.top_k", _default(o.top_k, "top_k"), "options.top_k")
        b.set("sampling.min_p", o.min_p, "options.min_p")
        b.set("sampling.seed", o.seed, "options.seed")
        b.set("sampling.repetition_penalty", o.repeat_penalty, "options.repeat_penalty")
        b.set("sampling.presence_penalty", o.presence_penalty, "options.presence_penalty")
        b.set("sampling.frequency_penalty", o.frequency_penalty, "options.frequency_penalty")
        if o.stop is not None:
            b.extend("stopping.stop", [o.stop] if isinstance(o.stop, str) else o.stop, "options.stop")
        num_predict = o.num_predict
        if num_predict is None or num_predict < 0:   # -1: unlimited, -2: fill the context
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
        info = await self.backend.model_info(ctx.metadata)
        model = self._ollama_model(body.model, info)
        if body.images:
            raise HttpError(400, "images: this model takes text only", "images")
        if body.template:
            raise HttpError(400, "template: custom prompt templates are not supported; the model's chat "
                            "template is used (or send raw=true)", "template")
        if body.suffix:
            raise HttpError(400, "suffix: not supported", "suffix")
        if not body.prompt and not body.context:
            done_reason = "unload" if body.keep_alive in (0, "0", "0s") else "load"
            return JSONResponse({"model": model, "created_at": _now_iso(), "response": "", "done": True,
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
        info = await self.backend.model_info(ctx.metadata)
        model = self._ollama_model(body.model, info)
        if not body.messages:   # Ollama: an empty chat loads the model
            return JSONResponse({"model": model, "created_at": _now_iso(),
                                 "message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "load"})
        if body.tools:
            raise HttpError(400, "tools: tool calling is not supported", "tools")
        b = RequestBuilder(model)
        b.req.chat.SetInParent()
        b.name("chat", "messages")
        b.name("chat.messages", "messages")
        for i, m in enumerate(body.messages):
            if m.images:
                raise HttpError(400, f"messages[{i}].images: this model takes text only", f"messages[{i}].images")
            b.req.chat.messages.append(pb.ChatMessage(role=m.role, content=m.content or ""))
        self._ollama_sampling(b, body.options, body.format, info, body.logprobs, body.top_logprobs)
        return await self._ollama_run(request, ctx, b, model, bool(body.stream), chat=True, prompt_ids=None)

    async def _ollama_run(self, request: Request, ctx: _Ctx, b: RequestBuilder, model: str, stream: bool,
                          chat: bool, prompt_ids: list[int] | None) -> Response:
        want_lp = b.req.HasField("logprobs")

        def final(c: pb.Choice, usage: pb.Usage, t_first: float | None, text: str, out_ids: list[int]) -> dict:
            now = time.perf_counter()
            first = t_first if t_first is not None else now
            doc: dict[str, Any] = {"model": model, "created_at": _now_iso()}
            if chat:
                doc["message"] = {"role": "assistant", "content": text}
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
            doc = final(c, resp.usage, None, c.text, list(c.token_ids))
            if want_lp:
                doc["logprobs"] = ollama_logprobs(c.logprobs)
            return JSONResponse(doc, headers={"x-request-id": ctx.rid})

        [(call, first)] = await self._open_streams(request, [b.req], [ctx.metadata], b)

        async def lines() -> AsyncIterator[str]:
            out_ids: list[int] = []
            t_first: float | None = None
            try:
                msg = first
                while msg is not _EOF:
                    c = msg.choice
                    out_ids.extend(c.token_ids)
                    if t_first is None and c.token_ids:
                        t_first = time.perf_counter()
                    if c.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                        doc = final(c, msg.usage, t_first, c.text, out_ids)
                    elif c.text or (want_lp and c.logprobs):
                        doc = {"model": model, "created_at": _now_iso(), "done": False}
                        if chat:
                            doc["message"] = {"role": "assistant", "content": c.text}
                        else:
                            doc["response"] = c.text
                    else:
                        msg = await call.read()
                        continue
                    if want_lp:
                        doc["logprobs"] = ollama_logprobs(c.logprobs)
                    yield _dumps(doc) + "\n"
                    msg = await call.read()
            except grpc.aio.AioRpcError as exc:
                yield _dumps(rpc_error(exc, b).ollama()) + "\n"
            finally:
                call.cancel()

        return _Stream(lines(), media_type="application/x-ndjson", headers={"x-request-id": ctx.rid})

    def _ollama_details(self, info: pb.ModelInfo) -> dict[str, Any]:
        family = info.architecture.removesuffix("ForCausalLM").lower() or "unknown"
        return {"parent_model": "", "format": "safetensors", "family": family, "families": [family],
                "parameter_size": "", "quantization_level": info.dtype.upper()}

    def _ollama_entry(self, info: pb.ModelInfo) -> dict[str, Any]:
        return {"name": info.name, "model": info.name, "modified_at": _now_iso(), "size": 0,
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
        info = await self.backend.model_info(ctx.metadata)
        name = self._ollama_model(body.model or body.name, info)
        caps = ["completion"]
        if info.features.guided_decoding:
            caps.append("structured_outputs")
        return JSONResponse({
            "license": "", "modelfile": f"# Served by Weft\nFROM {name}\n", "parameters": "", "template": "",
            "details": self._ollama_details(info),
            "model_info": {"general.architecture": info.architecture, "general.name": name,
                           "weft.context_length": info.max_model_len, "weft.vocab_size": info.vocab_size,
                           "weft.dtype": info.dtype, "weft.device": info.device},
            "capabilities": caps, "modified_at": _now_iso()})

    async def ollama_version(self) -> Response:
        return JSONResponse({"version": OLLAMA_API_VERSION})

    # ---- ops ----------------------------------------------------------------------------------

    async def health(self) -> Response:
        status = await self.backend.serving()
        if status == "SERVING":
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": status.lower()}, status_code=503, headers={"Retry-After": "1"})

    async def prometheus(self) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        if self.metrics is None:
            return Response("", media_type=CONTENT_TYPE_LATEST)
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def version(self) -> Response:
        return JSONResponse({"version": WEFT_VERSION})


class _Gate:
    """ASGI middleware: API-key check on /v1 and /api routes (health, metrics and the OpenAPI
    document stay open, like the gRPC health service) and a request counter by route and status."""

    PROTECTED = ("/v1/", "/api/", "/tokenize", "/detokenize")

    def __init__(self, app: ASGIApp, api_key: str | None, metrics: Any) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self.expected is not None and path.startswith(self.PROTECTED) and not self._authorized(scope):
                err = HttpError(401, "missing or wrong API key: send `Authorization: Bearer <key>`",
                                code="invalid_api_key")
                body = err.ollama() if path.startswith("/api/") else err.openai()
                await JSONResponse(body, status_code=401,
                                   headers={"WWW-Authenticate": "Bearer"})(scope, receive, send_status)
                return
            if scope.get("method") == "POST":
                scope = _as_json(scope)
            await self.app(scope, receive, send_status)
        finally:
            if self.metrics is not None:
                route = path if path in _ROUTES else "/v1/models/{model}" if path.startswith("/v1/models/") else "other"
                self.metrics.http_requests.labels(route, str(status)).inc()

    def _authorized(self, scope: Scope) -> bool:
        for key, value in scope.get("headers", ()):
            if key == b"authorization":
                return hmac.compare_digest(value, self.expected or b"")
        return False


def _as_json(scope: Scope) -> Scope:
    """Every POST body here is JSON: read it as JSON whatever Content-Type the client sent (curl
    and Ollama's examples send none)."""
    headers = scope.get("headers", [])
    for key, value in headers:
        if key == b"content-type" and b"json" in value.lower():
            return scope
    headers = [(k, v) for k, v in headers if k != b"content-type"] + [(b"content-type", b"application/json")]
    return {**scope, "headers": headers}


_ROUTES = frozenset((
    "/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/tokenize", "/v1/detokenize", "/tokenize",
    "/detokenize", "/api/generate", "/api/chat", "/api/tags", "/api/show", "/api/ps", "/api/version", "/health",
    "/metrics", "/version", "/openapi.json", "/docs"))


# ---- request helpers --------------------------------------------------------------------------


def _printable(s: str) -> bool:
    return s.isascii() and s.isprintable()


def _default(value: Any, name: str) -> Any:
    return OLLAMA_DEFAULTS[name] if value is None else value


def _loc_param(loc: Sequence[Any]) -> str | None:
    """pydantic's error location as a JSON path: ("messages", 0, "content") -> messages[0].content."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part) in _TYPE_NAMES or "[" in str(part) or "(" in str(part):
            continue   # pydantic names the union member it tried: not part of the path
        else:
            out += ("." if out else "") + str(part)
    return out or None


_TYPE_NAMES = frozenset(("str", "int", "float", "bool", "dict", "list", "none", "ContentPart", "literal"))


def _chat_messages(messages: Sequence[ChatMessage]) -> list[pb.ChatMessage]:
    out = []
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
        out.append(pb.ChatMessage(role=role, content=text))
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


async def _gather(aws: Sequence[Awaitable[T]]) -> list[T]:
    """Run all; the first failure cancels the rest and is raised."""
    if len(aws) == 1:
        return [await aws[0]]
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        raise


async def _merge(opened: Sequence[tuple[Any, Any]]) -> AsyncIterator[tuple[int, Any]]:
    """Messages of several GenerateStream calls as they arrive, tagged with the call's index."""
    if len(opened) == 1:
        call, msg = opened[0]
        while msg is not _EOF:
            yield 0, msg
            msg = await call.read()
        return
    queue: asyncio.Queue[tuple[int, Any] | BaseException | None] = asyncio.Queue()

    async def pump(i: int, call: Any, msg: Any) -> None:
        try:
            while msg is not _EOF:
                await queue.put((i, msg))
                msg = await call.read()
            await queue.put(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put(exc)

    tasks = [asyncio.ensure_future(pump(i, call, msg)) for i, (call, msg) in enumerate(opened)]
    try:
        left = len(tasks)
        while left:
            item = await queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()


# ---- running it -------------------------------------------------------------------------------


def create_app(target: str, *, api_key: str | None = None, metrics: Any = None, tls: bool = False,
               root_certificates: bytes | None = None) -> tuple[ASGIApp, Shim]:
    """The ASGI app in front of the gRPC server at `target`. Call on the serving event loop."""
    shim = Shim(GrpcBackend(target, api_key=api_key, tls=tls, root_certificates=root_certificates),
                api_key=api_key, metrics=metrics)
    return shim.asgi(), shim


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket. Made with proto=IPPROTO_TCP (socket.create_server leaves it 0):
    asyncio sets TCP_NODELAY only on connections of such sockets, and without it Nagle holds each
    stream's first SSE event behind the response headers until the client's delayed ACK (~40 ms
    of extra time to first token on a kept-alive connection)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


class HttpServer:
    """uvicorn serving the shim on the current event loop, beside whatever else runs there (the
    gRPC server in `weft serve`). Signals are left to the caller (weft serve drains on SIGTERM)."""

    def __init__(self, target: str, host: str = "0.0.0.0", port: int = DEFAULT_HTTP_PORT, *,
                 api_key: str | None = None, metrics: Any = None, tls: bool = False,
                 root_certificates: bytes | None = None) -> None:
        self.target, self.host, self.requested_port = target, host, port
        self._kw = dict(api_key=api_key, metrics=metrics, tls=tls, root_certificates=root_certificates)
        self.port: int | None = None
        self.shim: Shim | None = None
        self._server: Any = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Bind (OSError if the address is taken), then serve in a task; returns the bound port."""
        import uvicorn

        # Bound here rather than by uvicorn, whose bind failure is a sys.exit() inside the loop.
        sock = _listen(self.host, self.requested_port)
        self.port = sock.getsockname()[1]
        app, self.shim = create_app(self.target, **self._kw)  # type: ignore[arg-type]
        config = uvicorn.Config(app, lifespan="off", log_config=None, access_log=False,
                                timeout_graceful_shutdown=5, timeout_keep_alive=30)

        class _Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):  # type: ignore[no-untyped-def]
                yield   # the caller owns SIGINT/SIGTERM

        self._server = _Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                sock.close()
                raise OSError(f"cannot serve HTTP on {self.host}:{self.port}: {self._task.exception()!r}")
            await asyncio.sleep(0.005)
        return self.port

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            with contextlib.suppress(BaseException):
                await self._task
        if self.shim is not None:
            await self.shim.backend.close()
