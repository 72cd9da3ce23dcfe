"""The REST shim's gRPC side and its streaming plumbing: one channel to a Weft server
(`GrpcBackend`), the per-request context (`Ctx`), calls that a client disconnect cancels, SSE /
NDJSON bodies that watch for the client going away, and merging several streams."""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from datetime import datetime, timezone
from typing import Any, TypeVar

import anyio
import grpc
from fastapi import Request
from fastapi.responses import StreamingResponse
from grpc_health.v1 import health_pb2, health_pb2_grpc
from starlette.types import Receive, Scope, Send

from clients.weft.v1 import inference_pb2 as pb
from clients.weft.v1 import inference_pb2_grpc as pb_grpc
from service.protocol import REQUEST_ID_KEY
from service.shim.translate import rpc_error

T = TypeVar("T")

MODEL_INFO_TTL_S = 10.0
EOF_MSG = grpc.aio.EOF
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


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
        self._info: dict[str, tuple[float, pb.ModelInfo]] = {}   # model name -> (when fetched, its info)

    async def model_info(self, metadata: Sequence[tuple[str, str]], model: str = "") -> pb.ModelInfo:
        """The description of the model a request names (empty: the default one), cached for a
        few seconds; errors are HttpErrors. Per name: a server of the model store serves models
        of different limits (and describing one loads it, as the request naming it will)."""
        now = time.monotonic()
        cached = self._info.get(model)
        if cached is None or now - cached[0] > MODEL_INFO_TTL_S:
            try:
                resp = await self.stub.GetModelInfo(pb.GetModelInfoRequest(model=model), metadata=metadata, timeout=30)
            except grpc.aio.AioRpcError as exc:
                raise rpc_error(exc) from None
            if len(self._info) > 1024:   # names are the server's models; bound it all the same
                self._info.clear()
            cached = self._info[model] = (now, resp.model)
        return cached[1]

    async def serving(self) -> str:
        try:
            resp = await self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        except grpc.aio.AioRpcError as exc:
            return f"unreachable ({exc.code().name})"
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    async def close(self) -> None:
        await self.channel.close()


class ClientGone(Exception):
    """The HTTP client disconnected while its request was running."""


async def _until_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def guarded(request: Request, awaitable: Awaitable[T]) -> T:
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
    raise ClientGone()


class Stream(StreamingResponse):
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


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def sse(obj: Any) -> str:
    return f"data: {dumps(obj)}\n\n"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


class Ctx:
    """Per HTTP request: its id, the gRPC metadata to send, when it arrived."""

    __slots__ = ("rid", "metadata", "created", "t0")

    def __init__(self, rid: str, metadata: tuple[tuple[str, str], ...]) -> None:
        self.rid, self.metadata = rid, metadata
        self.created = int(time.time())
        self.t0 = time.perf_counter()

    def with_id(self, rid: str) -> tuple[tuple[str, str], ...]:
        return tuple((k, rid if k == REQUEST_ID_KEY else v) for k, v in self.metadata)


async def gather_all(aws: Sequence[Awaitable[T]]) -> list[T]:
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


async def merge(opened: Sequence[tuple[Any, Any]]) -> AsyncIterator[tuple[int, Any]]:
    """Messages of several GenerateStream calls as they arrive, tagged with the call's index."""
    if len(opened) == 1:
        call, msg = opened[0]
        while msg is not EOF_MSG:
            yield 0, msg
            msg = await call.read()
        return
    queue: asyncio.Queue[tuple[int, Any] | BaseException | None] = asyncio.Queue()

    async def pump(i: int, call: Any, msg: Any) -> None:
        try:
            while msg is not EOF_MSG:
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
