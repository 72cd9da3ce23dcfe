"""What every route of the shim shares: the backend, the per-request context (id, metadata),
unary calls and opened streams whose gRPC errors become HTTP errors."""
from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

import grpc
from fastapi import Request

from clients.weft.v1 import inference_pb2 as pb
from service.model_pool import FOREVER, parse_keep_alive
from service.protocol import MAX_REQUEST_ID_CHARS, REQUEST_ID_KEY
from service.shim.backend import EOF_MSG, Ctx, GrpcBackend, guarded
from service.shim.translate import HttpError, RequestBuilder, rpc_error

T = TypeVar("T")


class ShimBase:
    def __init__(self, backend: GrpcBackend, *, api_key: str | None = None, metrics: Any = None) -> None:
        self.backend = backend
        self.api_key = api_key
        self.metrics = metrics      # service.metrics.WeftMetrics or None

    async def load_or_unload(self, request: Request, ctx: Ctx, model: str | None, keep_alive: float | None
                              ) -> str:
        """Ollama's request with nothing to generate: load the model (and set its keep_alive), or
        with keep_alive 0 unload it (not loading it first). Returns the done_reason."""
        name = (model or "").removesuffix(":latest")
        if keep_alive == 0:
            await self._unary(request, self.backend.stub.UnloadModel(pb.UnloadModelRequest(model=name),
                                                                      metadata=ctx.metadata), RequestBuilder())
            return "unload"
        await self.set_keep_alive(request, ctx, name, keep_alive)
        return "load"

    async def set_keep_alive(self, request: Request, ctx: Ctx, model: str, keep_alive: float | None) -> None:
        """Load `model` if need be and set how long it stays (LoadModel)."""
        req = pb.LoadModelRequest(model=model)
        if keep_alive is not None:
            req.keep_alive_seconds = keep_alive
        await self._unary(request, self.backend.stub.LoadModel(req, metadata=ctx.metadata), RequestBuilder())

    def _ctx(self, request: Request) -> Ctx:
        rid = request.headers.get(REQUEST_ID_KEY) or uuid.uuid4().hex
        if len(rid) > MAX_REQUEST_ID_CHARS or not printable(rid):
            raise HttpError(400, f"{REQUEST_ID_KEY}: at most {MAX_REQUEST_ID_CHARS} printable ASCII characters",
                            REQUEST_ID_KEY)
        metadata: list[tuple[str, str]] = [(REQUEST_ID_KEY, rid)]
        if self.api_key:
            metadata.append(("authorization", f"Bearer {self.api_key}"))
        elif (auth := request.headers.get("authorization")) and printable(auth):
            metadata.append(("authorization", auth))   # let the target server judge the key
        return Ctx(rid, tuple(metadata))

    async def _unary(self, request: Request, call: Awaitable[T], builder: RequestBuilder | None = None) -> T:
        try:
            return await guarded(request, call)
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
                firsts = [await guarded(request, calls[0].read())]
            else:
                firsts = await guarded(request, asyncio.gather(*(c.read() for c in calls)))
        except grpc.aio.AioRpcError as exc:
            for c in calls:
                c.cancel()
            raise rpc_error(exc, builder) from None
        except BaseException:
            for c in calls:
                c.cancel()
            raise
        if any(f is EOF_MSG for f in firsts):   # not from a well-behaved server: a stream ends after a finish
            for c in calls:
                c.cancel()
            raise HttpError(500, "the server ended the stream without a result")
        return list(zip(calls, firsts))


def printable(s: str) -> bool:
    return s.isascii() and s.isprintable()


def keep_alive_seconds(value: str | float | None) -> float | None:
    """Ollama's keep_alive ("5m", "1h", seconds; negative: forever) as GenerateRequest's
    keep_alive_seconds (-1 for forever); None when unset; 400 naming the field otherwise."""
    try:
        seconds = parse_keep_alive(value)
    except ValueError as exc:
        raise HttpError(400, f"keep_alive: {exc}", "keep_alive") from None
    return -1.0 if seconds == FOREVER else seconds
