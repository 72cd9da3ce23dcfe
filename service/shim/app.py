"""The REST shim: OpenAI- and Ollama-compatible HTTP in front of the gRPC API.

A thin translation layer: every request becomes a weft.v1 call on a gRPC channel (to the same
process for `weft serve`, to a remote server for `weft shim --target`), and every answer or
status comes back as OpenAI's or Ollama's JSON. It never touches the engine. The routes live by
protocol (service/shim/openai.py, ollama.py); this module is the app: routing, errors, auth, ops.

    OpenAI   POST /v1/chat/completions, /v1/completions, /v1/responses, /v1/embeddings, /v1/tokenize,
             /v1/detokenize; GET /v1/models, /v1/models/{model}; GET, DELETE /v1/responses/{id}
    vLLM     POST /v1/load_lora_adapter, /v1/unload_lora_adapter
    Ollama   POST /api/generate, /api/chat, /api/embed, /api/embeddings, /api/show, /api/create, /api/copy;
             DELETE /api/delete; GET /api/tags, /api/ps, /api/version
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
import logging
import socket
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.protocol import DEFAULT_MAX_REQUEST_BYTES, bearer_matches, weft_version
from service.shim.backend import ClientGone, GrpcBackend
from service.shim.embeddings import EmbeddingRoutes
from service.shim.ollama import OllamaRoutes
from service.shim.openai import OpenAIRoutes
from service.shim.response_store import ResponseStore
from service.shim.responses import ResponsesRoutes
from service.shim.translate import HttpError

log = logging.getLogger("weft.http")

DEFAULT_HTTP_PORT = 8000


class Shim(OpenAIRoutes, ResponsesRoutes, OllamaRoutes, EmbeddingRoutes):
    """The routes of both protocols, bound to one GrpcBackend. `app` is the ASGI application."""

    def __init__(self, backend: GrpcBackend, *, api_key: str | None = None, metrics: Any = None,
                 max_body_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> None:
        super().__init__(backend, api_key=api_key, metrics=metrics)
        self.max_body_bytes = max_body_bytes
        self.response_store = ResponseStore()
        self.app = self._build()

    def _build(self) -> FastAPI:
        app = FastAPI(title="Weft REST API", version=weft_version(),
                      description="OpenAI- and Ollama-compatible HTTP API of a Weft inference server "
                                  "(a thin layer over its gRPC API, weft.v1).")
        app.add_exception_handler(HttpError, self._on_http_error)  # type: ignore[arg-type]
        app.add_exception_handler(RequestValidationError, self._on_validation_error)  # type: ignore[arg-type]
        app.add_exception_handler(StarletteHTTPException, self._on_starlette_error)  # type: ignore[arg-type]
        app.add_exception_handler(ClientGone, self._on_client_gone)  # type: ignore[arg-type]
        app.add_exception_handler(Exception, self._on_bug)

        app.post("/v1/chat/completions", tags=["openai"])(self.chat_completions)
        app.post("/v1/completions", tags=["openai"])(self.completions)
        app.post("/v1/responses", tags=["openai"])(self.create_response)
        app.get("/v1/responses/{response_id}", tags=["openai"])(self.get_response)
        app.delete("/v1/responses/{response_id}", tags=["openai"])(self.delete_response)
        app.post("/v1/embeddings", tags=["openai"])(self.openai_embeddings)
        app.post("/v1/load_lora_adapter", tags=["openai"])(self.load_lora_adapter)
        app.post("/v1/unload_lora_adapter", tags=["openai"])(self.unload_lora_adapter)
        app.get("/v1/models", tags=["openai"])(self.list_models)
        app.get("/v1/models/{model_id:path}", tags=["openai"])(self.get_model)
        for prefix in ("/v1", ""):
            app.post(f"{prefix}/tokenize", tags=["openai"], include_in_schema=bool(prefix))(self.tokenize)
            app.post(f"{prefix}/detokenize", tags=["openai"], include_in_schema=bool(prefix))(self.detokenize)
        app.post("/api/generate", tags=["ollama"])(self.ollama_generate)
        app.post("/api/chat", tags=["ollama"])(self.ollama_chat)
        app.post("/api/embed", tags=["ollama"])(self.ollama_embed)
        app.post("/api/embeddings", tags=["ollama"])(self.ollama_embeddings)
        app.get("/api/tags", tags=["ollama"])(self.ollama_tags)
        app.post("/api/show", tags=["ollama"])(self.ollama_show)
        app.post("/api/create", tags=["ollama"])(self.ollama_create)
        app.delete("/api/delete", tags=["ollama"])(self.ollama_delete)
        app.post("/api/copy", tags=["ollama"])(self.ollama_copy)
        app.get("/api/ps", tags=["ollama"])(self.ollama_ps)
        app.get("/api/version", tags=["ollama"])(self.ollama_version)
        app.get("/health", tags=["ops"])(self.health)
        app.get("/metrics", tags=["ops"])(self.prometheus)
        app.get("/version", tags=["ops"])(self.version)
        return app

    def asgi(self) -> ASGIApp:
        """The app with API-key checks and request counting in front."""
        return _Gate(self.app, self.api_key, self.metrics, self.max_body_bytes)

    # ---- errors -------------------------------------------------------------------------------

    @staticmethod
    def _error_response(request: Request, err: HttpError) -> JSONResponse:
        return JSONResponse(_error_body(request.url.path, err), status_code=err.status, headers=err.headers)

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

    async def _on_client_gone(self, request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)   # nobody reads it: the client has gone

    async def _on_bug(self, request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error serving %s", request.url.path)
        return self._error_response(request, HttpError(500, f"internal error: {type(exc).__name__}: {exc}"))

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
        return JSONResponse({"version": weft_version()})



class _Gate:
    """ASGI middleware: API-key check on /v1 and /api routes (health, metrics and the OpenAPI
    document stay open, like the gRPC health service) and a request counter by route and status."""

    PROTECTED = ("/v1/", "/api/", "/tokenize", "/detokenize")

    def __init__(self, app: ASGIApp, api_key: str | None, metrics: Any, max_body_bytes: int) -> None:
        self.app = app
        self.api_key = api_key
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes

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
            if self.api_key and path.startswith(self.PROTECTED) and not self._authorized(scope):
                err = HttpError(401, "missing or wrong API key: send `Authorization: Bearer <key>`",
                                code="invalid_api_key")
                await JSONResponse(_error_body(path, err), status_code=401,
                                   headers={"WWW-Authenticate": "Bearer"})(scope, receive, send_status)
                return
            if scope.get("method") in ("POST", "DELETE"):   # the methods with a JSON body here
                scope = _as_json(scope)
                body = await _read_body(receive, self.max_body_bytes)
                if body is None:
                    err = HttpError(413, f"request body larger than the server's limit of {self.max_body_bytes} bytes "
                                    "(--max-request-bytes)", code="request_too_large")
                    await JSONResponse(_error_body(path, err), status_code=413,
                                       headers={"Connection": "close"})(scope, receive, send_status)
                    return
                receive = _replay(body, receive)
            await self.app(scope, receive, send_status)
        finally:
            if self.metrics is not None:
                route = path if path in _ROUTES else _ROUTE_PREFIXES.get(path[:path.find("/", 4) + 1], "other")
                self.metrics.http_requests.labels(route, str(status)).inc()

    def _authorized(self, scope: Scope) -> bool:
        for key, value in scope.get("headers", ()):
            if key == b"authorization":
                return bearer_matches(value, self.api_key or "")
        return False


def _error_body(path: str, err: HttpError) -> dict[str, Any]:
    """Ollama's error shape on /api/ routes, OpenAI's everywhere else."""
    return err.ollama() if path.startswith("/api/") else err.openai()


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body, or None as soon as it passes `limit` bytes (the rest is never
    read: a client that announces or sends 30 MB costs the server at most `limit`)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break   # the client went away: what came so far (the route then sees the disconnect)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives the body read already, then the client's own (disconnects)."""
    sent = False

    async def again() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return again


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
    "/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings", "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter", "/v1/models", "/v1/tokenize", "/v1/detokenize", "/tokenize", "/detokenize",
    "/api/generate", "/api/chat", "/api/embed", "/api/embeddings", "/api/tags", "/api/show", "/api/ps", "/api/version",
    "/api/create", "/api/delete", "/api/copy",
    "/health",
    "/metrics", "/version", "/openapi.json", "/docs"))


# Routes with an id in the path, counted under one label each.
_ROUTE_PREFIXES = {"/v1/models/": "/v1/models/{model}", "/v1/responses/": "/v1/responses/{id}"}


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


def create_app(target: str, *, api_key: str | None = None, metrics: Any = None, tls: bool = False,
               root_certificates: bytes | None = None,
               max_body_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> tuple[ASGIApp, Shim]:
    """The ASGI app in front of the gRPC server at `target`. Call on the serving event loop."""
    shim = Shim(GrpcBackend(target, api_key=api_key, tls=tls, root_certificates=root_certificates),
                api_key=api_key, metrics=metrics, max_body_bytes=max_body_bytes)
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
                 root_certificates: bytes | None = None, max_body_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> None:
        self.target, self.host, self.requested_port = target, host, port
        self._kw = dict(api_key=api_key, metrics=metrics, tls=tls, root_certificates=root_certificates,
                        max_body_bytes=max_body_bytes)
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
