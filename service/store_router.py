"""`weft serve` over the model store: several models of different weights in one process, Ollama's
way. A request's `model` names a store model; the router finds the engine that serves it in the
pool (service/model_pool.py: loaded on first use, unloaded after keep_alive idle or when
another needs room, never while in flight) and hands the call to that engine's
InferenceServicer, so every per-model rule (validation, Modelfile defaults, tools, streaming)
is the one-model server's.

One engine per (weights, ADAPTER, num_ctx): store models that agree on all three are views of
one engine (service/store_views.py), each with its own Modelfile defaults, as Ollama reuses a
runner for every name of one blob. Each engine is named internally by a name no store model can
take, so that every store name is a view whose Modelfile is read afresh (a model re-created
while loaded serves its new defaults at once).
"""
from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import torch

from clients.weft.v1 import inference_pb2 as pb
from clients.weft.v1 import inference_pb2_grpc as pb_grpc
from common.errors import InvalidArgumentError, ModelLoadError, NotFoundError
from service.calls_in_flight import CallsInFlight
from service.config import EngineConfig
from service.engine.async_encoder import AsyncEncoder
from service.engine.async_engine import AsyncEngine
from service.engine.core import EngineCore
from service.engine.decoder_embedder import DecoderEmbedder
from service.model_pool import FOREVER, Clock, Loaded, ModelPool, ModelTooLargeError
from service.modelfile import parse
from service.server import (
    InferenceServicer,
    RequestEndHook,
    RequestObserver,
    ServerOptions,
    StatusError,
    grpc_handler,
    in_daemon_thread,
    load_encoder_engine,
    pull_progress,
)
from service.store import DEFAULT_NAME, Manifest, ModelStore, full_name
from service.store_views import StoreViews

log = logging.getLogger("weft.store")
T = TypeVar("T")

ModelKey = tuple[str, tuple[str, ...], int | None]   # (weights digest, adapters, num_ctx): one engine each


def model_key(m: Manifest) -> ModelKey:
    return m.digest, tuple(m.adapters), m.parameters.get("num_ctx")


def short_name(name: str) -> str:
    return name.removesuffix(":latest")


def engine_config(config: EngineConfig, m: Manifest, served: str) -> tuple[EngineConfig, str | None]:
    """The engine config of store model `m` (its weights, num_ctx as the context, its one
    ADAPTER served under `served+adapter`) and that adapter's name (None without one)."""
    mf = m.modelfile()
    if len(mf.adapters) > 1:
        raise InvalidArgumentError("model", f"{m.name}: one ADAPTER per model is served")
    changes: dict[str, Any] = {"model": m.weights}
    if "num_ctx" in mf.parameters:
        changes["max_model_len"] = mf.parameters["num_ctx"]
    adapter = f"{served}+adapter" if mf.adapters else None
    if adapter is not None:
        changes["lora"] = (*config.lora, f"{adapter}={mf.adapters[0]}")
    return dataclasses.replace(config, **changes), adapter


def estimated_bytes(m: Manifest, config: EngineConfig) -> int:
    """Memory a store model will hold, before it is loaded (to make room first): its weights'
    size on disk and the KV pool's budget. Under the truth for quantised files (dequantised on
    load) and over it with --num-blocks: the pool measures each model once loaded and evicts
    or refuses then."""
    kv = int(config.kv_cache_gb * 2**30) if config.num_blocks is None else 0
    return m.size + kv


def loaded_bytes(core: EngineCore) -> int:
    """Memory a loaded engine holds: its weights and its KV cache."""
    weights = sum(t.nbytes for t in core.model.parameters()) + sum(t.nbytes for t in core.model.buffers())
    return weights + core.runner.kv_tensor.nbytes


@dataclass(slots=True)
class Engine:
    """One loaded model: its engine and the servicer that answers its calls."""
    servicer: InferenceServicer
    engine: AsyncEngine
    views: StoreViews
    name: str            # the store model it was loaded for (logs)


class StoreRouter(pb_grpc.InferenceServiceServicer):
    def __init__(self, config: EngineConfig, options: ServerOptions, store: ModelStore | None = None,
                 default_model: str = DEFAULT_NAME, *, max_loaded: int | None = None,
                 memory_bytes: int | None = None, keep_alive: float = 300.0, clock: Clock = time.monotonic,
                 on_request_end: RequestEndHook | None = None, observer: RequestObserver | None = None) -> None:
        """`config`: the engine flags every model is loaded with (its `model` is ignored)."""
        self.config, self.options = config, options
        self.store = store or ModelStore()
        self.default_model = full_name(default_model)
        self.pool: ModelPool[Engine] = ModelPool(self._load, self._unload, max_loaded=max_loaded,
                                                 memory_bytes=memory_bytes, keep_alive=keep_alive, clock=clock,
                                                 released=self._released)
        self._on_request_end, self._observer = on_request_end, observer
        self.embeddings: InferenceServicer | None = None   # an embedding model served beside the store
        self._encoder: AsyncEncoder | None = None
        self.draining = False
        self._calls = CallsInFlight()

    # ---- what WeftServer needs ------------------------------------------------------------

    @property
    def engine(self) -> AsyncEngine | None:
        return None   # several engines: /metrics has no one engine's KV state to show

    @property
    def in_flight(self) -> int:
        return self._calls.count

    async def wait_idle(self) -> None:
        await self._calls.wait_idle()

    async def close(self) -> None:
        await self.pool.close()
        if self._encoder is not None:
            await self._encoder.shutdown()

    async def load_embedding_model(self, path: str, name: str) -> None:
        """Serve a sentence-transformers model beside the store under `name` (always loaded:
        it is small, and Ollama's embedding calls name it)."""
        encoder = await in_daemon_thread(load_encoder_engine, path, self.config, True)
        encoder.start()
        self._encoder = encoder
        servicer = InferenceServicer(name)
        servicer.attach_embedder(name, encoder, main=True)
        self.embeddings = servicer

    # ---- loading ----------------------------------------------------------------------------

    async def _load(self, key: Any, name: str) -> tuple[Engine, int]:
        m = self.store.get(name)
        internal = f"_weights-{m.digest[:12]}"   # never a store name (those start with a letter or digit)
        config, adapter = engine_config(self.config, m, internal)
        t0 = time.perf_counter()
        core = await in_daemon_thread(EngineCore, config)   # off the event loop: the others keep serving
        engine = AsyncEngine(core)
        engine.start()
        try:
            servicer = InferenceServicer(internal, self._on_request_end, self._observer,
                                         self.options.tool_call_format, None, adapter, store=True)
            views = StoreViews(self.store, core.loaded.source, internal,
                               accept=lambda other: model_key(other) == key)
            servicer.attach(engine, DecoderEmbedder(engine, self.options.pooling), views=views)
        except BaseException:
            await engine.shutdown()   # not left running with no one to stop it
            raise
        size = loaded_bytes(core)
        log.info("loaded %s (%s, %.1f MB) in %.1fs", short_name(m.name), m.weights, size / 1e6,
                 time.perf_counter() - t0)
        return Engine(servicer, engine, views, short_name(m.name)), size

    async def _unload(self, loaded: Engine) -> None:
        loaded.servicer.draining = True
        await loaded.engine.shutdown()
        log.info("unloaded %s", loaded.name)

    def _released(self) -> None:
        """An unloaded engine is no longer referenced: reference cycles (modules, closures)
        would keep its tensors until some later collection, so collect now, and hand a GPU's
        freed blocks back to the device rather than keep them in torch's cache."""
        gc.collect()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()

    async def preload(self, names: list[str]) -> None:
        """Load these store models now (`weft serve --model NAME ...`), with the default keep_alive."""
        for name in names:
            if full_name(name) == DEFAULT_NAME and DEFAULT_NAME not in self.store.builtins():
                from service.loader import default_model_path
                default_model_path()   # raises ModelLoadError saying which package to install
            m = self.store.get(name)   # NotFoundError: `weft serve` says so and exits
            entry = await self.pool.acquire(model_key(m), m.name, estimated_bytes(m, self.config),
                                            self.pool.keep_alive)
            self.pool.release(entry)

    # ---- routing ----------------------------------------------------------------------------

    def _up(self) -> None:
        if self.draining:
            raise StatusError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry on another replica")

    def _manifest(self, model: str) -> Manifest:
        try:
            return self.store.get(model or self.default_model)
        except (NotFoundError, InvalidArgumentError):
            raise StatusError(grpc.StatusCode.NOT_FOUND, f"model {model!r} not found: not in this server's store "
                              "(`weft list`, GET /api/tags); add it with `weft create` or `weft pull`",
                              field="model") from None

    def _embedding_servicer(self, model: str) -> InferenceServicer | None:
        if self.embeddings is None or not model:
            return None
        return self.embeddings if short_name(model) in self.embeddings.embedders else None

    async def _with_model(self, model: str, context: grpc.aio.ServicerContext, keep_alive: float | None,
                          call: Callable[[InferenceServicer, str], Awaitable[T]]) -> T:
        """call(servicer, name) on the engine of store model `model` (loaded first if need be),
        counted in flight on it until the call ends. `keep_alive` None leaves it as it was."""
        self._up()
        embedding = self._embedding_servicer(model)
        if embedding is not None:
            return await call(embedding, model)
        m = self._manifest(model)
        name = model or short_name(m.name)
        self._calls.enter()
        try:
            try:
                # Waiting for room ends at the call's deadline, like the request itself would.
                async with asyncio.timeout(context.time_remaining()):
                    entry = await self.pool.acquire(model_key(m), m.name, estimated_bytes(m, self.config), keep_alive)
            except ModelTooLargeError as exc:
                raise StatusError(grpc.StatusCode.FAILED_PRECONDITION, str(exc), field="model") from None
            except (ModelLoadError, OSError) as exc:   # the store names weights that do not load (any more)
                raise StatusError(grpc.StatusCode.FAILED_PRECONDITION, f"model {short_name(m.name)!r} cannot be "
                                  f"loaded from {m.weights}: {exc}", field="model") from None
            try:
                assert entry.value is not None
                return await call(entry.value.servicer, name)
            finally:
                self.pool.release(entry)
        finally:
            self._calls.leave()

    def _keep_alive(self, msg: Any) -> float:
        """A request's keep_alive_seconds: negative is forever; unset, the server's default."""
        if not msg.HasField("keep_alive_seconds"):
            return self.pool.keep_alive
        value = msg.keep_alive_seconds
        if value != value:   # NaN
            raise InvalidArgumentError("keep_alive_seconds", "must be a number of seconds, got NaN")
        return FOREVER if value < 0 else value

    # ---- generation, tokens, embeddings: the model's own servicer answers ----------------------

    async def _forward(self, method: str, request: Any, context: grpc.aio.ServicerContext,
                       keep_alive: float | None) -> Any:
        """The same call on the servicer of the engine that serves `request.model`."""
        def run(s: InferenceServicer, name: str) -> Awaitable[Any]:
            request.model = name   # the default model's name for an empty one: responses name it
            return getattr(s, method)(request, context)
        return await self._with_model(request.model, context, keep_alive, run)

    @grpc_handler
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        return await self._forward("Generate", request, context, self._keep_alive(request))

    @grpc_handler
    async def GenerateStream(self, request: pb.GenerateRequest,  # type: ignore[override]
                             context: grpc.aio.ServicerContext) -> None:
        await self._forward("GenerateStream", request, context, self._keep_alive(request))

    @grpc_handler
    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        return await self._forward("Embed", request, context, self.pool.keep_alive)

    # Side calls leave the model's keep_alive as it was (None).

    @grpc_handler
    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        return await self._forward("Tokenize", request, context, None)

    @grpc_handler
    async def Detokenize(self, request: pb.DetokenizeRequest,
                         context: grpc.aio.ServicerContext) -> pb.DetokenizeResponse:
        return await self._forward("Detokenize", request, context, None)

    @grpc_handler
    async def ResetPrefixCache(self, request: pb.ResetPrefixCacheRequest,
                               context: grpc.aio.ServicerContext) -> pb.ResetPrefixCacheResponse:
        return await self._forward("ResetPrefixCache", request, context, None)

    @grpc_handler
    async def GetModelInfo(self, request: pb.GetModelInfoRequest,
                           context: grpc.aio.ServicerContext) -> pb.GetModelInfoResponse:
        """Describing a store model loads it: its limits and features are the loaded engine's."""
        async def run(s: InferenceServicer, name: str) -> pb.GetModelInfoResponse:
            return pb.GetModelInfoResponse(model=self._stamped(s.describe(name), name))
        return await self._with_model(request.model, context, None, run)

    # ---- the store and what is loaded ---------------------------------------------------------

    def _stamped(self, info: pb.ModelInfo, name: str) -> pb.ModelInfo:
        """`info` with the store's size and digest of `name`, and loaded."""
        out = pb.ModelInfo()
        out.CopyFrom(info)
        out.loaded = True
        try:
            m = self.store.get(name)
        except (NotFoundError, InvalidArgumentError):
            return out   # an embedding model beside the store
        out.size_bytes, out.digest = m.size, m.digest
        return out

    def _store_info(self, m: Manifest) -> pb.ModelInfo:
        name = short_name(m.name)
        entry = self.pool.get(model_key(m))
        if entry is not None and entry.value is not None:
            return self._stamped(entry.value.servicer.describe(name), name)
        return pb.ModelInfo(name=name, modelfile=m.modelfile().render(), size_bytes=m.size, digest=m.digest)

    @grpc_handler
    async def ListModels(self, request: pb.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        self._up()
        models = [self._store_info(m) for m in await asyncio.to_thread(self.store.list)]
        if self.embeddings is not None:
            models += [self._stamped(self.embeddings.describe(n), n) for n in self.embeddings.embedders]
        return pb.ListModelsResponse(models=models)

    def _loaded(self, entry: Loaded[Engine]) -> pb.LoadedModel:
        assert entry.value is not None
        servicer, names = entry.value.servicer, entry.value.views.names()
        name = short_name(entry.name)
        info = self._stamped(servicer.describe(name if name in names else ""), name)
        info.name = name
        out = pb.LoadedModel(model=info, size_bytes=entry.size, in_flight=entry.in_flight, names=names)
        expires_in = self.pool.expires_in(entry)
        if expires_in is not None:
            out.expires_at = time.time() + expires_in
        return out

    @grpc_handler
    async def ListLoadedModels(self, request: pb.ListLoadedModelsRequest,
                               context: grpc.aio.ServicerContext) -> pb.ListLoadedModelsResponse:
        self._up()
        return pb.ListLoadedModelsResponse(models=[self._loaded(e) for e in self.pool.loaded()])

    @grpc_handler
    async def LoadModel(self, request: pb.LoadModelRequest, context: grpc.aio.ServicerContext) -> pb.LoadModelResponse:
        t0 = time.perf_counter()
        keep_alive = self._keep_alive(request)
        embedding = self._embedding_servicer(request.model)
        if embedding is not None:   # always loaded
            return pb.LoadModelResponse(model=pb.LoadedModel(model=embedding.describe(request.model)))

        async def run(s: InferenceServicer, name: str) -> None:
            return None
        m = self._manifest(request.model)
        await self._with_model(request.model, context, keep_alive, run)
        entry = self.pool.get(model_key(m))
        if entry is None:   # keep_alive 0: loaded and gone again
            return pb.LoadModelResponse(model=pb.LoadedModel(model=pb.ModelInfo(name=short_name(m.name))),
                                        load_seconds=time.perf_counter() - t0)
        return pb.LoadModelResponse(model=self._loaded(entry), load_seconds=time.perf_counter() - t0)

    @grpc_handler
    async def UnloadModel(self, request: pb.UnloadModelRequest,
                          context: grpc.aio.ServicerContext) -> pb.UnloadModelResponse:
        self._up()
        if self._embedding_servicer(request.model) is not None:
            return pb.UnloadModelResponse(unloading=False)   # the embedding model beside the store stays
        m = self._manifest(request.model)
        return pb.UnloadModelResponse(unloading=self.pool.expire(model_key(m)))

    @grpc_handler
    async def CreateModel(self, request: pb.CreateModelRequest,
                          context: grpc.aio.ServicerContext) -> pb.CreateModelResponse:
        self._up()
        # Reading and hashing a GGUF takes a while: off the event loop.
        m = await asyncio.to_thread(self.store.create, request.name, parse(request.modelfile))
        return pb.CreateModelResponse(model=self._store_info(m), served=True)

    @grpc_handler
    async def DeleteModel(self, request: pb.DeleteModelRequest,
                          context: grpc.aio.ServicerContext) -> pb.DeleteModelResponse:
        self._up()
        m = self.store.get(request.name)
        key = model_key(m)
        entry = self.pool.get(key)
        if entry is not None and entry.in_flight:
            raise InvalidArgumentError("name", f"{short_name(m.name)!r} is in use: {entry.in_flight} request(s) are "
                                       "running on it; delete it once they end")
        self.store.delete(request.name)
        if not any(model_key(other) == key for other in self.store.list()):
            self.pool.expire(key)   # no store model runs on it any more
        return pb.DeleteModelResponse()

    @grpc_handler
    async def PullModel(self, request: pb.PullModelRequest,  # type: ignore[override]
                        context: grpc.aio.ServicerContext) -> None:
        self._up()
        async for msg in pull_progress(self.store, request):
            await context.write(msg)

    @grpc_handler
    async def CopyModel(self, request: pb.CopyModelRequest, context: grpc.aio.ServicerContext) -> pb.CopyModelResponse:
        self._up()
        self.store.copy(request.source, request.destination)
        return pb.CopyModelResponse()

    @grpc_handler
    async def LoadAdapter(self, request: pb.LoadAdapterRequest,
                          context: grpc.aio.ServicerContext) -> pb.LoadAdapterResponse:
        raise StatusError(grpc.StatusCode.FAILED_PRECONDITION, "a server of the model store takes its adapters from "
                          "Modelfiles: `ADAPTER PATH` in a Modelfile (weft create, /api/create) serves it as a model")

    @grpc_handler
    async def UnloadAdapter(self, request: pb.UnloadAdapterRequest,
                            context: grpc.aio.ServicerContext) -> pb.UnloadAdapterResponse:
        raise StatusError(grpc.StatusCode.FAILED_PRECONDITION, "a server of the model store has no adapters loaded at "
                          "run time: delete the store model whose Modelfile names it")
