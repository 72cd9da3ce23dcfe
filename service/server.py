"""The gRPC front end: weft.v1.InferenceService on grpc.aio, beside grpc.health.v1 and reflection.

What lives here: proto <-> engine conversion, status codes (INVALID_ARGUMENT names the field),
request ids, deadlines, cancellation, API-key auth, TLS and the graceful drain. The engine
(`AsyncEngine`) runs its step loop on its own thread; this module only runs on the event loop.

Lifecycle: `WeftServer.start()` listens at once with health NOT_SERVING, so orchestrators see
the process while the model loads (requests get UNAVAILABLE); `attach()`/`load()` flip it to
SERVING; `stop(grace)` flips it back, refuses new calls and lets in-flight ones finish.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from clients.weft.v1 import guided_pb2
from clients.weft.v1 import inference_pb2 as pb
from clients.weft.v1 import inference_pb2_grpc as pb_grpc
from decoding.guided.spec import GuidedSpec
from decoding.sampling import MAX_LOGPROBS, MAX_N, SamplingParams, TokenLogprobs
from service.calls_in_flight import CallsInFlight
from service.config import EngineConfig
from service.encoder_loader import DEFAULT_EMBEDDING_NAME, is_encoder_dir, load_encoder
from service.engine.async_encoder import AsyncEncoder
from service.engine.async_engine import AsyncEngine
from service.engine.core import EngineCore
from service.engine.decoder_embedder import DecoderEmbedder
from service.engine.embedder import Embedder
from service.engine.encoder import EncoderCore
from service.engine.lora_manager import AdapterInfo
from service.model_defaults import apply_defaults, template_renderer
from service.modelfile import Modelfile
from service.store import Manifest, ModelStore
from service.store_views import StoreViews, View
from service.engine.request import RequestOutput
from service.tool_calls import (
    OutputShaper,
    ToolContext,
    chat_history,
    check_tool_schemas,
    render_messages,
    resolve_format,
    tool_request,
)
from decoding.tools import tool_guided_spec
from common.errors import InvalidArgumentError, ModelLoadError, NotFoundError, ResourceExhaustedError, UnavailableError
from service.models.pooling import finish
from service.protocol import (
    DEFAULT_MAX_REQUEST_BYTES,
    INVALID_FIELD_KEY,
    MAX_REQUEST_ID_CHARS,
    REQUEST_ID_KEY,
    bearer_matches,
)

log = logging.getLogger("weft.server")
T = TypeVar("T")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name  # "weft.v1.InferenceService"
DEFAULT_PORT = 50051
CHAT_ROLES = ("system", "user", "assistant", "tool")
MAX_CACHE_SALT_CHARS = 256
ADAPTER_NAME = re.compile(r"[A-Za-z0-9._:/-]{1,128}")
MAX_EMBED_INPUTS = 2048   # inputs per Embed call (OpenAI's limit per request)

_FINISH = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    "length": pb.FINISH_REASON_LENGTH,
    "stop": pb.FINISH_REASON_STOP,
    "eos": pb.FINISH_REASON_EOS,
    "cancelled": pb.FINISH_REASON_CANCELLED,
    "error": pb.FINISH_REASON_ERROR,
    "tool_calls": pb.FINISH_REASON_TOOL_CALLS,
}
# Engine field names -> their path in GenerateRequest (engine errors name SamplingParams fields).
_SAMPLING_FIELDS = frozenset(
    ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "seed",
     "logit_bias")
)
_STOPPING_FIELDS = frozenset(("max_tokens", "stop", "stop_token_ids", "ignore_eos", "include_stop_str_in_output"))

# Called once per Generate/GenerateStream call as it ends: (request id, outcome), outcome one of
# "ok", "cancelled", "deadline_exceeded" or a lower-case status code name ("invalid_argument", ...).
RequestEndHook = Callable[[str, str], None]


class RequestTrace(Protocol):
    """Follows one Generate/GenerateStream call (metrics): every engine delta, then the outcome."""

    def output(self, out: RequestOutput) -> None: ...
    def ended(self, outcome: str) -> None: ...


class RequestObserver(Protocol):
    """Called as each Generate/GenerateStream call starts and as each Embed call ends
    (service.metrics.WeftMetrics is one)."""

    def request_started(self, request_id: str) -> RequestTrace: ...
    def embedding_ended(self, outcome: str, inputs: int, tokens: int, seconds: float) -> None: ...


class StatusError(Exception):
    """A status to end the call with (other than the engine's own errors)."""

    def __init__(self, code: grpc.StatusCode, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.field = code, message, field


@dataclass(slots=True)
class ServerOptions:
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT                # 0 picks a free port (see WeftServer.port)
    api_key: str | None = None              # require `authorization: Bearer <key>` (health stays open)
    tls_cert: str | None = None             # PEM files; both or neither
    tls_key: str | None = None
    served_model_name: str | None = None    # the name requests use; default: the model's own name
    grace_s: float = 30.0                   # drain time for in-flight calls on stop()
    tool_call_format: str = "auto"          # how calls are written: auto (from the chat template) | hermes | ...
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES   # larger messages: RESOURCE_EXHAUSTED naming the limit
    defaults: Modelfile | None = None       # a store model's Modelfile: the defaults of its requests
    model_adapter: str | None = None        # the LoRA adapter every request of the served model runs with
    store: bool = False                     # serve the store's models of the loaded weights, and its admin RPCs
    embedding_model: str | None = None      # a sentence-transformers directory served beside the model (None: none)
    embedding_model_name: str = DEFAULT_EMBEDDING_NAME   # ... under this name (Ollama's for all-MiniLM-L6-v2)
    pooling: str = "last"                   # how a generation model's hidden states become an embedding: last | mean


# ---- proto -> engine ------------------------------------------------------------------------


def _opt(msg: Any, name: str, default: Any) -> Any:
    return getattr(msg, name) if msg.HasField(name) else default


def sampling_params(req: pb.GenerateRequest) -> SamplingParams:
    """The engine's parameters for a request; unset fields take the documented defaults."""
    s, t = req.sampling, req.stopping
    return SamplingParams(
        n=_opt(req, "n", 1),
        max_tokens=_opt(t, "max_tokens", 16),
        temperature=_opt(s, "temperature", 1.0),
        top_k=_opt(s, "top_k", 0),
        top_p=_opt(s, "top_p", 1.0),
        min_p=_opt(s, "min_p", 0.0),
        repetition_penalty=_opt(s, "repetition_penalty", 1.0),
        presence_penalty=_opt(s, "presence_penalty", 0.0),
        frequency_penalty=_opt(s, "frequency_penalty", 0.0),
        seed=_opt(s, "seed", None),
        stop=list(t.stop),
        stop_token_ids=list(t.stop_token_ids),
        ignore_eos=t.ignore_eos,
        include_stop_str_in_output=t.include_stop_str_in_output,
        logprobs=_opt(req, "logprobs", None),
        skip_special_tokens=_opt(req, "skip_special_tokens", True),
        guided=guided_spec(req),
        num_speculative_tokens=_opt(req, "num_speculative_tokens", None),
        logit_bias=dict(s.logit_bias) or None,
    )


def guided_spec(req: pb.GenerateRequest) -> GuidedSpec | None:
    """The `guided` oneof as the engine's GuidedSpec (None when unset)."""
    kind = req.guided.WhichOneof("kind") if req.HasField("guided") else None
    if kind is None:
        return None
    g = req.guided
    # Unset means true: close the output before max_tokens would cut it.
    close = g.close_before_max_tokens if g.HasField("close_before_max_tokens") else True
    if kind == "json_schema":
        return GuidedSpec("json_schema", g.json_schema, close_before_max_tokens=close)
    if kind == "regex":
        return GuidedSpec("regex", g.regex, close_before_max_tokens=close)
    if kind == "choice":
        return GuidedSpec("choice", list(g.choice.choices), close_before_max_tokens=close)
    if kind == "grammar":
        syntax = "gbnf" if g.grammar.syntax == guided_pb2.Grammar.GBNF else "lark"
        return GuidedSpec("grammar", g.grammar.definition, grammar_syntax=syntax, close_before_max_tokens=close)
    return GuidedSpec("json_object", close_before_max_tokens=close)


def field_path(engine_field: str, prompt_kind: str | None) -> str:
    """Where an engine-side field lives in GenerateRequest ("temperature" -> "sampling.temperature")."""
    if engine_field in _SAMPLING_FIELDS:
        return f"sampling.{engine_field}"
    if engine_field in _STOPPING_FIELDS:
        return f"stopping.{engine_field}"
    if engine_field in ("prompt", "prompt_token_ids"):
        return prompt_kind or "prompt"
    if engine_field == "messages":
        return "chat.messages"
    if engine_field == "request_id":
        return REQUEST_ID_KEY
    return engine_field


def chat_messages(chat: pb.Chat) -> list[dict]:
    """The conversation as dicts (tool calls and tool results included), roles checked."""
    if not chat.messages:
        raise InvalidArgumentError("chat.messages", "must hold at least one message")
    for i, m in enumerate(chat.messages):
        if m.role not in CHAT_ROLES:
            raise InvalidArgumentError(
                f"chat.messages[{i}].role", f"must be one of {', '.join(CHAT_ROLES)}; got {m.role!r}"
            )
    return chat_history(chat)


def check_unsupported(req: pb.GenerateRequest) -> None:
    """Request fields checked before the engine sees the request."""
    if len(req.cache_salt) > MAX_CACHE_SALT_CHARS:
        raise InvalidArgumentError("cache_salt", f"at most {MAX_CACHE_SALT_CHARS} characters, got {len(req.cache_salt)}")


# ---- the servicer ---------------------------------------------------------------------------


def grpc_handler(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Turn Weft errors into statuses; anything unexpected is INTERNAL (and logged)."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await fn(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - every error must leave as a status
            code, message, field = _status_of(exc)
            if code is grpc.StatusCode.INTERNAL:
                log.exception("%s failed", fn.__name__)
            metadata = ((INVALID_FIELD_KEY, field),) if field else ()
            await context.abort(code, message, trailing_metadata=metadata)

    return wrapper


def _status_of(exc: Exception) -> tuple[grpc.StatusCode, str, str | None]:
    if isinstance(exc, StatusError):
        return exc.code, exc.message, exc.field
    if isinstance(exc, InvalidArgumentError):
        return grpc.StatusCode.INVALID_ARGUMENT, f"{exc.field}: {exc.message}", exc.field
    if isinstance(exc, NotFoundError):
        return grpc.StatusCode.NOT_FOUND, exc.message, exc.field
    if isinstance(exc, ResourceExhaustedError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), None
    if isinstance(exc, UnavailableError):
        return grpc.StatusCode.UNAVAILABLE, str(exc), None
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded; the request was aborted", None
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}", None


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    def __init__(self, served_model_name: str | None = None, on_request_end: RequestEndHook | None = None,
                 observer: RequestObserver | None = None, tool_call_format: str = "auto",
                 defaults: Modelfile | None = None, model_adapter: str | None = None, store: bool = False) -> None:
        self.engine: AsyncEngine | None = None
        self._store = store
        self._views: StoreViews | None = None   # the store's models of the loaded weights (store mode)
        self._defaults = defaults
        self._model_adapter = model_adapter
        self._template = template_renderer(defaults.template) if defaults is not None and defaults.template else None
        self._tool_call_format = tool_call_format
        self._observer = observer
        self.draining = False
        self._served_name = served_model_name
        self._on_request_end = on_request_end
        self._model_info: pb.ModelInfo | None = None
        self._adapters: dict[str, pb.ModelInfo] = {}   # LoRA adapters served as models, by name
        # Embedding models by served name (an encoder-only server has one and no engine), their
        # ModelInfo, and the generation model's own embedder (prefill-only requests on its engine).
        self.embedders: dict[str, Embedder] = {}
        self._embedder_infos: dict[str, pb.ModelInfo] = {}
        self._decoder_embedder: Embedder | None = None
        self._loaded = False                   # an engine or the main embedding model is attached
        self._token_text: dict[int, str] = {}  # id -> its text alone, for logprobs
        self._calls = CallsInFlight()                    # generation and Embed calls running (the drain waits on them)

    # ---- state --------------------------------------------------------------------------

    def attach(self, engine: AsyncEngine, embedder: Embedder | None = None, views: StoreViews | None = None) -> None:
        """Serve generation with `engine`; `embedder` (if any) answers Embed for the same model;
        `views` (store mode) the store models it serves, by default those of its weights."""
        self.engine = engine
        self._chat_template = getattr(engine.core.tokenizer.hf, "chat_template", None)
        if self._template is not None:
            self._chat_template = self._defaults.template   # type: ignore[union-attr]
        self._tool_format = resolve_format(self._tool_call_format, self._chat_template)
        self._decoder_embedder = embedder
        self._model_info = _model_info(engine.core, self.model_name, self._tool_format.name, embedder)
        if self._defaults is not None:
            self._model_info.modelfile = self._defaults.render()
        if views is not None:
            self._views = views
        elif self._store:
            self._views = StoreViews(ModelStore(), engine.core.loaded.source, self.model_name)
        if engine.core.lora is not None:   # --lora adapters, registered as the core was built
            for a in engine.core.lora.infos():
                if a.name != self._model_adapter:   # the Modelfile's ADAPTER is part of the model
                    self._adapters[a.name] = self._adapter_info(a)
        self._loaded = True

    def attach_embedder(self, name: str, embedder: Embedder, main: bool = False) -> None:
        """Serve an embedding model under `name`; `main` when it is this server's only model
        (`weft serve --model <sentence-transformers dir>`): then the server is ready."""
        self.embedders[name] = embedder
        self._embedder_infos[name] = _embedder_info(name, embedder)
        if main:
            self._loaded = True

    @property
    def model_info(self) -> pb.ModelInfo | None:
        """The first served model's description (None until it is attached)."""
        if self._model_info is not None:
            return self._model_info
        return next(iter(self._embedder_infos.values()), None) if self._loaded else None

    @property
    def in_flight(self) -> int:
        return self._calls.count

    async def wait_idle(self) -> None:
        """Return once no generation call is running."""
        await self._calls.wait_idle()

    async def close(self) -> None:
        """Nothing to release here: WeftServer shuts down the engines it owns."""

    @property
    def model_name(self) -> str:
        return self._served_name or (self.engine.core.model_name if self.engine else "")

    @property
    def served_names(self) -> list[str]:
        """Every name ListModels lists, the generation model's first."""
        return ([self.model_name, *self._adapters] if self.engine is not None else []) + list(self.embedders)

    def _up(self) -> None:
        if self.draining:
            raise StatusError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry on another replica")
        if not self._loaded:
            raise StatusError(grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry shortly")
        if self.engine is not None and self.engine.dead is not None:
            raise StatusError(grpc.StatusCode.UNAVAILABLE, f"{self.engine.dead}; retry on another replica")

    def _not_found(self, model: str) -> StatusError:
        names = ", ".join(repr(n) for n in self.served_names)
        return StatusError(grpc.StatusCode.NOT_FOUND, f"model {model!r} is not served here; this server serves {names}",
                           field="model")

    def _embedding_model(self, model: str) -> str | None:
        """The served name of the embedding model `model` names ("name" or Ollama's "name:latest");
        with `model` empty, the main model when this server serves an embedding model only."""
        if not model:
            return next(iter(self.embedders), None) if self.engine is None else None
        for name in (model, model.removesuffix(":latest")):
            if name in self.embedders:
                return name
        return None

    def _ready(self, model: str = "") -> AsyncEngine:
        """The generation engine for a request naming `model` (generation, tokens, cache admin)."""
        self._up()
        embedding = self._embedding_model(model)
        if embedding is not None:
            raise StatusError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"model: {embedding!r} is an embedding model: it answers Embed (OpenAI /v1/embeddings, Ollama "
                "/api/embed), not generation or tokenization", field="model")
        assert self.engine is not None
        if model and model not in (self.model_name, self.engine.core.model_name) and model not in self._adapters \
                and self._view_of(model) is None:
            raise self._not_found(model)
        return self.engine

    def _view_of(self, model: str) -> View | None:
        """The store model `model` names when it is a view of the loaded engine (store mode)."""
        if self._views is None or not model or model in self._adapters or self.engine is None \
                or model.removesuffix(":latest") in (self.model_name, self.engine.core.model_name):
            return None
        return self._views.get(model)

    def _view_info(self, view: View) -> pb.ModelInfo:
        assert self._model_info is not None
        info = pb.ModelInfo()
        info.CopyFrom(self._model_info)
        info.name, info.modelfile = view.name, view.modelfile.render()
        return info

    def _adapter_info(self, a: AdapterInfo) -> pb.ModelInfo:
        assert self._model_info is not None
        info = pb.ModelInfo()
        info.CopyFrom(self._model_info)
        info.name, info.parent, info.source, info.lora_rank = a.name, self._model_info.name, a.path, a.rank
        return info

    def _embedder(self, model: str) -> tuple[str, Embedder]:
        """(served name, embedder) for an Embed request naming `model`."""
        self._up()
        embedding = self._embedding_model(model)
        if embedding is not None:
            return embedding, self.embedders[embedding]
        if self.engine is None or (model and model not in (self.model_name, self.engine.core.model_name)
                                   and self._view_of(model) is None):
            raise self._not_found(model)
        if self._decoder_embedder is None:
            raise StatusError(grpc.StatusCode.UNIMPLEMENTED, f"model {self.model_name!r} cannot embed on this server")
        return self.model_name, self._decoder_embedder

    # ---- generation -----------------------------------------------------------------------

    async def _prepare(self, req: pb.GenerateRequest, engine: AsyncEngine, view: View | None = None,
                       ) -> tuple[str | list[int], SamplingParams, ToolContext | None]:
        kind = req.WhichOneof("prompt")
        try:
            check_unsupported(req)
            defaults = view.modelfile if view is not None else self._defaults
            if defaults is not None and not (req.model and req.model in self._adapters):
                apply_defaults(req, defaults)
            params = sampling_params(req)
            tools = tool_request(req)
            if kind is None:
                raise InvalidArgumentError("prompt", "set one of text, token_ids or chat")
            if tools is not None and kind != "chat":
                raise InvalidArgumentError("tools", "need a chat prompt (the tools are shown in the conversation)")
            if kind == "text":
                if not req.text:
                    raise InvalidArgumentError("text", "must not be empty")
                return req.text, params, None
            if kind == "token_ids":
                if not req.token_ids.ids:
                    raise InvalidArgumentError("token_ids", "must hold at least one token id")
                return list(req.token_ids.ids), params, None
            ctx = None
            if tools is not None:
                ctx = ToolContext(tools, self._tool_format)
                if tools.constrained:
                    await check_tool_schemas(tools, ctx.fmt, engine.core.guide_compiler)
                    params = dataclasses.replace(params, guided=tool_guided_spec(tools, ctx.fmt))
            return self._render_chat(req.chat, engine, add_special_tokens=False, tools=ctx, view=view), params, ctx
        except InvalidArgumentError as exc:
            raise _renamed(exc, kind) from None

    def _render_chat(self, chat: pb.Chat, engine: AsyncEngine, add_special_tokens: bool,
                     tools: ToolContext | None = None, view: View | None = None) -> list[int]:
        tok = engine.core.tokenizer
        template = view.template if view is not None and view.template is not None else self._template
        chat_template = view.modelfile.template if view is not None and view.template is not None else self._chat_template
        messages, tool_list = render_messages(chat_messages(chat), tools.request if tools else None,
                                              tools.fmt if tools else self._tool_format, chat_template)
        if template is not None:   # the Modelfile's TEMPLATE: tools come as Weft's tool prompt
            text = template([{"role": m["role"], "content": m.get("content") or ""} for m in messages])
        else:
            text = tok.apply_chat_template(messages, add_generation_prompt=_opt(chat, "add_generation_prompt", True),
                                           tools=tool_list)
        return tok.encode(text, add_special_tokens=add_special_tokens)

    async def _generate(
        self, req: pb.GenerateRequest, context: grpc.aio.ServicerContext, rid: str,
        on_output: Callable[[RequestOutput], Awaitable[None]],
    ) -> None:
        """Run one request, handing every delta to on_output; report how it ended."""
        outcome = "internal"
        trace = self._observer.request_started(rid) if self._observer is not None else None
        self._calls.enter()
        try:
            engine = self._ready(req.model)
            # Resolved now: an adapter unloaded while the prompt is prepared must not turn this
            # request into a base-model one (the engine then refuses it instead).
            lora = req.model if req.model in self._adapters else self._model_adapter
            prompt, params, tools = await self._prepare(req, engine, self._view_of(req.model))
            shaper = OutputShaper(tools)
            kind = req.WhichOneof("prompt")
            try:
                # asyncio.timeout(None) never fires; the deadline aborts the request like a cancel.
                async with asyncio.timeout(context.time_remaining()):
                    # aclosing: a cancel or deadline closes the engine stream at once, which aborts
                    # the request and frees its KV blocks within a step.
                    gen = engine.generate(prompt, params, rid, cache_salt=req.cache_salt or None, lora=lora)
                    async with contextlib.aclosing(gen) as stream:  # type: ignore[type-var]
                        async for out in stream:
                            if trace is not None:
                                trace.output(out)
                            await on_output(out, shaper)
            except InvalidArgumentError as exc:
                raise _renamed(exc, kind) from None
            outcome = "ok"
        except asyncio.CancelledError:
            remaining = context.time_remaining()
            outcome = "deadline_exceeded" if remaining is not None and remaining <= 0 else "cancelled"
            raise
        except Exception as exc:
            outcome = _status_of(exc)[0].name.lower()
            raise
        finally:
            self._calls.leave()
            if trace is not None:
                trace.ended(outcome)
            if self._on_request_end is not None:
                self._on_request_end(rid, outcome)

    @grpc_handler
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        rid = _request_id(context)
        choices: dict[int, pb.Choice] = {}
        usage = _UsageCounter()
        error: str | None = None

        async def collect(out: RequestOutput, shaper: OutputShaper) -> None:
            nonlocal error
            choice = choices.get(out.index)
            if choice is None:
                choice = choices[out.index] = pb.Choice(index=out.index)
            text, _ = shaper.shape(out.index, out.text, out.finished)
            choice.text += text
            choice.token_ids.extend(out.token_ids)
            if out.logprobs:
                choice.logprobs.extend(self._logprobs(out.logprobs))
            if out.finished:
                choice.tool_calls.extend(shaper.calls(out.index))
                _set_finish(choice, out, has_calls=bool(choice.tool_calls))
                usage.add(out)
                error = error or out.error

        await self._generate(request, context, rid, collect)
        if error:
            raise StatusError(grpc.StatusCode.INTERNAL, f"generation failed: {error}")
        await context.send_initial_metadata(((REQUEST_ID_KEY, rid),))
        return pb.GenerateResponse(
            request_id=rid, model=request.model or self.model_name,
            choices=[choices[i] for i in sorted(choices)], usage=usage.proto()
        )

    @grpc_handler
    async def GenerateStream(  # type: ignore[override]  # writes with context.write, returns nothing
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> None:
        rid = _request_id(context)
        n = request.n if request.HasField("n") else 1
        usage = _UsageCounter()
        started = False
        error: str | None = None

        async def send(out: RequestOutput, shaper: OutputShaper) -> None:
            nonlocal started, error
            if not started:
                # Headers go out with the first token, so that refusals stay trailers-only.
                await context.send_initial_metadata(((REQUEST_ID_KEY, rid),))
                started = True
            text, calls = shaper.shape(out.index, out.text, out.finished)
            choice = pb.Choice(index=out.index, text=text, token_ids=out.token_ids, tool_calls=calls)
            if out.logprobs:
                choice.logprobs.extend(self._logprobs(out.logprobs))
            msg = pb.GenerateStreamResponse(request_id=rid, choice=choice)
            if out.finished:
                _set_finish(msg.choice, out, has_calls=bool(shaper.calls(out.index)))
                usage.add(out)
                error = error or out.error
                if usage.finished == n:
                    msg.usage.CopyFrom(usage.proto())
            await context.write(msg)

        await self._generate(request, context, rid, send)
        if error:
            raise StatusError(grpc.StatusCode.INTERNAL, f"generation failed: {error}")

    def _logprobs(self, items: Sequence[TokenLogprobs]) -> list[pb.TokenLogprob]:
        text = self._token_str
        return [
            pb.TokenLogprob(
                token_id=lp.token_id, logprob=lp.logprob, token=text(lp.token_id),
                top_logprobs=[pb.TopLogprob(token_id=t, logprob=v, token=text(t)) for t, v in lp.top],
            )
            for lp in items
        ]

    def _token_str(self, token_id: int) -> str:
        s = self._token_text.get(token_id)
        if s is None:
            assert self.engine is not None
            s = self._token_text[token_id] = self.engine.core.tokenizer.decode([token_id], skip_special_tokens=False)
        return s

    # ---- tokens and models ----------------------------------------------------------------

    @grpc_handler
    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        engine = self._ready(request.model)
        tok = engine.core.tokenizer
        kind = request.WhichOneof("input")
        if kind is None:
            raise InvalidArgumentError("input", "set text or chat")
        if kind == "text":
            ids = tok.encode(request.text, add_special_tokens=_opt(request, "add_special_tokens", True))
        else:
            view = self._view_of(request.model)
            # A chat is tokenized as generation renders it: with the model's Modelfile system
            # prompt and few-shot messages first (Ollama's /api/generate tokenizes this way).
            rendered = pb.GenerateRequest(chat=request.chat)
            defaults = view.modelfile if view is not None else self._defaults
            if defaults is not None and not (request.model and request.model in self._adapters):
                apply_defaults(rendered, defaults)
            try:
                ids = self._render_chat(rendered.chat, engine, _opt(request, "add_special_tokens", False), view=view)
            except InvalidArgumentError as exc:
                raise _renamed(exc, kind) from None
        resp = pb.TokenizeResponse(token_ids=ids, count=len(ids), max_model_len=engine.core.max_model_len)
        if request.return_tokens:
            resp.tokens.extend(tok.convert_ids_to_tokens(ids))
        return resp

    @grpc_handler
    async def Detokenize(self, request: pb.DetokenizeRequest, context: grpc.aio.ServicerContext) -> pb.DetokenizeResponse:
        engine = self._ready(request.model)
        tok = engine.core.tokenizer
        limit = min(engine.core.vocab_size, tok.vocab_size)
        bad = next((t for t in request.token_ids if not 0 <= t < limit), None)
        if bad is not None:
            raise InvalidArgumentError("token_ids", f"every id must be in [0, {limit}), got {bad}")
        text = tok.decode(list(request.token_ids), skip_special_tokens=_opt(request, "skip_special_tokens", True))
        return pb.DetokenizeResponse(text=text)

    @grpc_handler
    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        self._up()
        models = ([self._model_info, *self._adapters.values()] if self._model_info is not None else []) + list(
            self._embedder_infos.values())
        if self._views is not None:
            taken = {m.name for m in models}
            models += [self._view_info(v) for n in self._views.names()
                       if n not in taken and (v := self._views.get(n)) is not None]
        return pb.ListModelsResponse(models=models)

    @grpc_handler
    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        return pb.GetModelInfoResponse(model=self.describe(request.model))

    def describe(self, model: str) -> pb.ModelInfo:
        """The ModelInfo of the served model `model` names (GetModelInfo's answer)."""
        self._up()
        embedding = self._embedding_model(model)
        if embedding is not None:
            return self._embedder_infos[embedding]
        self._ready(model)
        view = self._view_of(model)
        if view is not None:
            return self._view_info(view)
        info = self._adapters.get(model, self._model_info)
        assert info is not None
        return info

    def _store_views(self) -> StoreViews:
        self._up()
        if self._views is None:
            raise StatusError(grpc.StatusCode.FAILED_PRECONDITION, "this server serves a model by path, without the "
                              "model store: start it with a store model (`weft serve --model NAME`) to manage models")
        return self._views

    @grpc_handler
    async def CreateModel(self, request: pb.CreateModelRequest,
                          context: grpc.aio.ServicerContext) -> pb.CreateModelResponse:
        views = self._store_views()
        # The store reads files (hashing a GGUF): off the event loop.
        name, served = await asyncio.to_thread(views.create, request.name, request.modelfile)
        view = views.get(name) if served else None
        info = self._view_info(view) if view is not None else pb.ModelInfo(name=name)
        return pb.CreateModelResponse(model=info, served=served)

    @grpc_handler
    async def DeleteModel(self, request: pb.DeleteModelRequest,
                          context: grpc.aio.ServicerContext) -> pb.DeleteModelResponse:
        self._store_views().delete(request.name)
        return pb.DeleteModelResponse()

    @grpc_handler
    async def CopyModel(self, request: pb.CopyModelRequest, context: grpc.aio.ServicerContext) -> pb.CopyModelResponse:
        self._store_views().copy(request.source, request.destination)
        return pb.CopyModelResponse()

    @grpc_handler
    async def PullModel(self, request: pb.PullModelRequest,  # type: ignore[override]
                        context: grpc.aio.ServicerContext) -> None:
        views = self._store_views()
        async for msg in pull_progress(views.store, request):
            await context.write(msg)

    @grpc_handler
    async def ListLoadedModels(self, request: pb.ListLoadedModelsRequest,
                               context: grpc.aio.ServicerContext) -> pb.ListLoadedModelsResponse:
        """The one model this server was started with: loaded, never expiring."""
        self._up()
        info = self.model_info
        assert info is not None
        return pb.ListLoadedModelsResponse(models=[pb.LoadedModel(model=info, names=self.served_names)])

    @grpc_handler
    async def LoadModel(self, request: pb.LoadModelRequest, context: grpc.aio.ServicerContext) -> pb.LoadModelResponse:
        """A served model is loaded already (and stays: keep_alive does not apply here)."""
        return pb.LoadModelResponse(model=pb.LoadedModel(model=self.describe(request.model)))

    @grpc_handler
    async def UnloadModel(self, request: pb.UnloadModelRequest,
                          context: grpc.aio.ServicerContext) -> pb.UnloadModelResponse:
        """The model this server was started with is never unloaded (Ollama clients unloading
        it get an answer, not an error)."""
        self.describe(request.model)   # NOT_FOUND for a name not served here
        return pb.UnloadModelResponse(unloading=False)

    @grpc_handler
    async def LoadAdapter(self, request: pb.LoadAdapterRequest,
                          context: grpc.aio.ServicerContext) -> pb.LoadAdapterResponse:
        engine = self._ready()
        name = request.name
        if not ADAPTER_NAME.fullmatch(name) or name in (self.model_name, engine.core.model_name):
            raise InvalidArgumentError("name", f"must be 1 to 128 of [A-Za-z0-9._:/-] and not the base model's name, "
                                       f"got {name!r}")
        if not request.path:
            raise InvalidArgumentError("path", "required: a PEFT adapter directory or a LoRA .gguf file")
        try:
            a = await engine.load_adapter(name, request.path)
        except ModelLoadError as exc:
            raise InvalidArgumentError("path", str(exc)) from None
        self._adapters[name] = info = self._adapter_info(a)
        return pb.LoadAdapterResponse(model=info, load_seconds=a.load_s)

    @grpc_handler
    async def UnloadAdapter(self, request: pb.UnloadAdapterRequest,
                            context: grpc.aio.ServicerContext) -> pb.UnloadAdapterResponse:
        engine = self._ready()
        if request.name not in self._adapters:
            raise StatusError(grpc.StatusCode.NOT_FOUND, f"no LoRA adapter {request.name!r} is loaded", field="name")
        # Refused to new requests before the engine lets go of it.
        info = self._adapters.pop(request.name)
        try:
            await engine.unload_adapter(request.name)
        except BaseException:
            self._adapters[request.name] = info
            raise
        return pb.UnloadAdapterResponse()

    # ---- embeddings -----------------------------------------------------------------------

    @grpc_handler
    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        t0 = time.perf_counter()
        outcome, tokens = "internal", 0
        self._calls.enter()     # a drain lets it finish, like a generation
        try:
            rid = _request_id(context)
            name, embedder = self._embedder(request.model)
            dimensions = _opt(request, "dimensions", None)
            if dimensions is not None and not 1 <= dimensions <= embedder.dimension:
                raise InvalidArgumentError("dimensions", f"must be in [1, {embedder.dimension}], got {dimensions}")
            normalize = _opt(request, "normalize", embedder.normalize)
            seqs = embed_inputs(request, embedder)
            tokens = sum(len(s) for s in seqs)
            async with asyncio.timeout(context.time_remaining()):
                vectors = await embedder.embed(seqs, rid)
            vectors = finish(vectors, dimensions, normalize)
            resp = pb.EmbedResponse(request_id=rid, model=name, usage=pb.Usage(prompt_tokens=tokens, total_tokens=tokens))
            resp.embeddings.extend(pb.Embedding(index=i, values=v, prompt_tokens=len(s))
                                   for i, (v, s) in enumerate(zip(vectors.tolist(), seqs)))
            await context.send_initial_metadata(((REQUEST_ID_KEY, rid),))
            outcome = "ok"
            return resp
        except asyncio.CancelledError:
            remaining = context.time_remaining()
            outcome = "deadline_exceeded" if remaining is not None and remaining <= 0 else "cancelled"
            raise
        except Exception as exc:
            outcome = _status_of(exc)[0].name.lower()
            raise
        finally:
            self._calls.leave()
            if self._observer is not None:
                self._observer.embedding_ended(outcome, len(request.inputs), tokens, time.perf_counter() - t0)

    @grpc_handler
    async def ResetPrefixCache(
        self, request: pb.ResetPrefixCacheRequest, context: grpc.aio.ServicerContext
    ) -> pb.ResetPrefixCacheResponse:
        engine = self._ready(request.model)
        stats = await engine.reset_prefix_cache()
        return pb.ResetPrefixCacheResponse(queried_tokens=stats.prefix_queried_tokens, hit_tokens=stats.prefix_hit_tokens)


async def pull_progress(store: ModelStore, req: pb.PullModelRequest) -> AsyncIterator[pb.PullModelProgress]:
    """PullModel: store.pull on a thread (it copies and hashes files), its steps as messages
    while it runs; the last one ("success") carries the model."""
    loop = asyncio.get_running_loop()
    steps: asyncio.Queue[pb.PullModelProgress | None] = asyncio.Queue()
    last = [0.0]

    def progress(status: str, digest: str, total: int, completed: int) -> None:
        # Copy steps come every chunk: a few a second are enough for a progress bar.
        now = time.monotonic()
        if status.startswith("pulling ") and 0 < completed < total and now - last[0] < 0.1:
            return
        last[0] = now
        loop.call_soon_threadsafe(steps.put_nowait, pb.PullModelProgress(status=status, digest=digest, total=total,
                                                                         completed=completed))

    def run() -> Manifest:
        try:
            return store.pull(req.source, req.name or None, progress)
        finally:
            loop.call_soon_threadsafe(steps.put_nowait, None)

    if not req.source:
        raise InvalidArgumentError("source", "required: a .gguf file, an HF directory or an installed package")
    work = asyncio.ensure_future(asyncio.to_thread(run))
    while (msg := await steps.get()) is not None:
        if msg.status == "success":
            m = await work
            msg.model.CopyFrom(pb.ModelInfo(name=m.name.removesuffix(":latest"), modelfile=m.modelfile().render(),
                                            size_bytes=m.size, digest=m.digest))
        yield msg
    await work   # raises what the pull raised (before "success")


def embed_inputs(req: pb.EmbedRequest, embedder: Embedder) -> list[list[int]]:
    """The request's inputs as token lists the model can take, or InvalidArgumentError naming the
    input: empty, an id out of range, or longer than the model takes without `truncate`."""
    n = len(req.inputs)
    if not n:
        raise InvalidArgumentError("inputs", "must hold at least one input")
    if n > MAX_EMBED_INPUTS:
        raise InvalidArgumentError("inputs", f"at most {MAX_EMBED_INPUTS} inputs per request, got {n}")
    limit = embedder.max_input_tokens
    seqs: list[list[int] | None] = [None] * n
    texts: list[tuple[int, str]] = []
    for i, item in enumerate(req.inputs):
        kind = item.WhichOneof("input")
        if kind is None:
            raise InvalidArgumentError(f"inputs[{i}]", "set text or token_ids")
        if kind == "text":
            if not item.text:
                raise InvalidArgumentError(f"inputs[{i}].text", "must not be empty")
            texts.append((i, item.text))
            continue
        ids = list(item.token_ids.ids)
        if not ids:
            raise InvalidArgumentError(f"inputs[{i}].token_ids", "must hold at least one token id")
        bad = next((t for t in ids if not 0 <= t < embedder.vocab_size), None)
        if bad is not None:
            raise InvalidArgumentError(f"inputs[{i}].token_ids", f"every id must be in [0, {embedder.vocab_size}), got {bad}")
        seqs[i] = ids[:limit] if req.truncate else ids
    if texts:
        for (i, _), ids in zip(texts, embedder.tokenize([t for _, t in texts], req.truncate)):
            seqs[i] = ids
    for i, ids in enumerate(seqs):
        assert ids is not None
        if len(ids) > limit:
            raise InvalidArgumentError(
                f"inputs[{i}]", f"is {len(ids)} tokens; the model takes at most {limit} (set truncate to cut it)")
        if not ids:
            raise InvalidArgumentError(f"inputs[{i}]", "has no tokens")
    return seqs  # type: ignore[return-value]


def _renamed(exc: InvalidArgumentError, prompt_kind: str | None) -> InvalidArgumentError:
    return InvalidArgumentError(field_path(exc.field, prompt_kind), exc.message)


def _request_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and value:
            if len(value) > MAX_REQUEST_ID_CHARS:
                raise InvalidArgumentError(REQUEST_ID_KEY, f"at most {MAX_REQUEST_ID_CHARS} characters")
            return value
    return uuid.uuid4().hex


def _set_finish(choice: pb.Choice, out: RequestOutput, has_calls: bool = False) -> None:
    reason = "tool_calls" if has_calls and out.finish_reason in ("stop", "eos") else out.finish_reason
    choice.finish_reason = _FINISH.get(reason, pb.FINISH_REASON_UNSPECIFIED)
    if out.finish_reason == "stop":
        if isinstance(out.stop_reason, str):
            choice.stop_string = out.stop_reason
        elif isinstance(out.stop_reason, int):
            choice.stop_token_id = out.stop_reason
    if out.error:
        choice.error = out.error
    if out.spec is not None:
        choice.spec_decode.CopyFrom(pb.SpecDecodeStats(
            num_drafts=out.spec["num_drafts"], num_draft_tokens=out.spec["num_draft_tokens"],
            num_accepted_tokens=out.spec["num_accepted_tokens"],
            accepted_per_position=out.spec["accepted_per_position"],
            mean_acceptance_length=out.spec["mean_acceptance_length"],
        ))


class _UsageCounter:
    """Usage over the n sequences of one request, from each one's final delta."""

    __slots__ = ("prompt", "completion", "cached", "finished")

    def __init__(self) -> None:
        self.prompt = self.completion = self.cached = self.finished = 0

    def add(self, out: RequestOutput) -> None:
        self.finished += 1
        self.prompt = out.num_prompt_tokens
        self.completion += out.num_output_tokens
        self.cached = max(self.cached, out.num_cached_tokens)   # the n share one prompt

    def proto(self) -> pb.Usage:
        return pb.Usage(
            prompt_tokens=self.prompt, completion_tokens=self.completion, cached_prompt_tokens=self.cached,
            total_tokens=self.prompt + self.completion,
        )


def _embedder_info(name: str, embedder: Embedder) -> pb.ModelInfo:
    """An embedding model's description: what Embed needs, and no generation feature."""
    info = pb.ModelInfo(
        name=name, max_model_len=embedder.max_input_tokens, vocab_size=embedder.vocab_size,
        architecture=embedder.architecture, dtype=str(embedder.dtype).removeprefix("torch."),
        device=str(embedder.device), features=pb.Features(embeddings=True, embedding_only=True),
        embedding_dimension=embedder.dimension, max_embed_inputs=MAX_EMBED_INPUTS,
    )
    return info


def _model_info(core: EngineCore, name: str, tool_call_format: str, embedder: Embedder | None = None
                ) -> pb.ModelInfo:
    cfg = core.config
    tok = core.tokenizer
    arch = (getattr(core.loaded.config, "architectures", None) or [""])[0]
    info = pb.ModelInfo(
        name=name,
        max_model_len=core.max_model_len,
        vocab_size=core.vocab_size,
        eos_token_ids=list(core.eos_token_ids),
        architecture=arch,
        dtype=str(cfg.torch_dtype()).removeprefix("torch."),
        device=str(core.device),
        max_logprobs=MAX_LOGPROBS,
        max_n=MAX_N,
        kv_cache_tokens=core.num_blocks * cfg.block_size,
        features=pb.Features(
            chat_template=tok.has_chat_template,
            logprobs=True,
            guided_decoding=True,
            speculative_decoding=True,   # n-gram on request always; the server's default per its config
            # Reported from the engine config once prefix caching lands there.
            prefix_caching=bool(getattr(cfg, "enable_prefix_caching", False)),
            tool_calls=tok.has_chat_template,
            tool_call_format=tool_call_format,
            lora=core.lora is not None,
        ),
    )
    if tok.bos_token_id is not None:
        info.bos_token_id = tok.bos_token_id
    if embedder is not None:
        info.features.embeddings = True
        info.embedding_dimension = embedder.dimension
        info.max_embed_inputs = MAX_EMBED_INPUTS
    return info


# ---- auth -----------------------------------------------------------------------------------


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Require `authorization: Bearer <key>` on every call except health checks (load balancers
    and orchestrators probe without credentials)."""

    OPEN_PREFIXES = ("/grpc.health.v1.Health/",)

    def __init__(self, api_key: str) -> None:
        self._api_key = api_key

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(self.OPEN_PREFIXES) or self._authorized(details):
            return handler
        return _deny_handler(handler)

    def _authorized(self, details: grpc.HandlerCallDetails) -> bool:
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                return bearer_matches(value, self._api_key)
        return False


def _deny_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that only answers UNAUTHENTICATED."""
    message = "missing or wrong API key: send metadata `authorization: Bearer <key>`"

    async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def deny_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    serdes = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(deny, **serdes)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(deny_stream, **serdes)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(deny, **serdes)
    return grpc.stream_stream_rpc_method_handler(deny_stream, **serdes)


# ---- the server -----------------------------------------------------------------------------


async def in_daemon_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) on a daemon thread. Unlike asyncio.to_thread, a process told to stop while a
    big model is still loading exits at once instead of waiting for the load to finish."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not future.done():
            future.set_result(value) if ok else future.set_exception(value)

    def work() -> None:
        try:
            result: tuple[bool, Any] = (True, fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            result = (False, exc)
        with contextlib.suppress(RuntimeError):  # the loop may be closed by now
            loop.call_soon_threadsafe(settle, *result)

    threading.Thread(target=work, name="weft-load", daemon=True).start()
    return await future


def load_encoder_engine(path: str, config: EngineConfig, beside_engine: bool) -> AsyncEncoder:
    """An embedding model on its own thread; `beside_engine`: a generation engine shares the CPU."""
    core = EncoderCore(load_encoder(path, dtype=config.torch_dtype()), device=config.device, dtype=config.torch_dtype())
    return AsyncEncoder(core, release_pool=beside_engine)


def _bind_address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6 literal
    return f"{host}:{port}"


class Servicer(Protocol):
    """What WeftServer needs of the servicer it serves: InferenceServicer (one model), or the
    store's router (service/store_router.py: several models, each an InferenceServicer)."""

    draining: bool

    @property
    def engine(self) -> AsyncEngine | None: ...
    @property
    def in_flight(self) -> int: ...
    async def wait_idle(self) -> None: ...
    async def close(self) -> None: ...


class WeftServer:
    """grpc.aio server with InferenceService, health and reflection. Run on one event loop."""

    def __init__(
        self, options: ServerOptions | None = None, engine: AsyncEngine | None = None,
        on_request_end: RequestEndHook | None = None, observer: RequestObserver | None = None,
        servicer: Servicer | None = None,
    ) -> None:
        """`servicer`: serve that one instead of an InferenceServicer of `options` (attach() and
        load() are then not for this server: the servicer loads its models itself)."""
        self.options = options or ServerOptions()
        self.servicer: Any = servicer or InferenceServicer(
            self.options.served_model_name, on_request_end, observer, self.options.tool_call_format,
            self.options.defaults, self.options.model_adapter, self.options.store)
        self.health = health_aio.HealthServicer()
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._engine_to_attach = engine
        self._encoders: list[AsyncEncoder] = []
        self._owns_engine = False
        self._stopped = asyncio.Event()

    @property
    def engine(self) -> AsyncEngine | None:
        return self.servicer.engine

    async def start(self) -> int:
        """Listen (health NOT_SERVING until an engine is attached); returns the bound port."""
        o = self.options
        interceptors = [ApiKeyInterceptor(o.api_key)] if o.api_key else []
        server = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", o.max_request_bytes)])
        pb_grpc.add_InferenceServiceServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            server,
        )
        address = _bind_address(o.host, o.port)
        if bool(o.tls_cert) != bool(o.tls_key):
            raise ValueError("TLS needs both a certificate and a key (--tls-cert and --tls-key)")
        if o.tls_cert and o.tls_key:
            with open(o.tls_key, "rb") as k, open(o.tls_cert, "rb") as c:
                creds = grpc.ssl_server_credentials([(k.read(), c.read())])
            self.port = server.add_secure_port(address, creds)
        else:
            self.port = server.add_insecure_port(address)
        if not self.port:
            raise OSError(f"cannot listen on {address}")
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        self._server = server
        if self._engine_to_attach is not None:
            await self.attach(self._engine_to_attach)
        return self.port

    async def attach(self, engine: AsyncEngine, owned: bool = False) -> None:
        """Serve requests with this engine (its loop is this server's loop); health -> SERVING.
        An `owned` engine is shut down by stop()."""
        self._owns_engine = owned
        # An engine that can no longer serve (a lost tensor-parallel rank) takes health down with it.
        engine.on_dead = lambda reason: asyncio.ensure_future(
            self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING))
        engine.start()
        self.servicer.attach(engine, DecoderEmbedder(engine, self.options.pooling))
        await self.set_serving()

    async def set_serving(self) -> None:
        """Health SERVING (unless draining): the models to serve at start are ready."""
        if not self.servicer.draining:
            await self._set_health(health_pb2.HealthCheckResponse.SERVING)

    async def load(self, config: EngineConfig) -> AsyncEngine | None:
        """Load the model off the event loop (health and UNAVAILABLE answers keep flowing), then attach.
        A sentence-transformers / BERT directory is served as an embedding model alone (returns
        None); options.embedding_model, if set, is loaded first and served beside the model."""
        o = self.options
        if is_encoder_dir(config.model):
            assert config.model is not None
            encoder = await in_daemon_thread(load_encoder_engine, config.model, config, False)
            self.add_embedder(o.served_model_name or encoder.name, encoder, main=True)
            await self.set_serving()
            return None
        if o.embedding_model:
            encoder = await in_daemon_thread(load_encoder_engine, o.embedding_model, config, True)
            self.add_embedder(o.embedding_model_name, encoder)
        core = await in_daemon_thread(EngineCore, config)
        engine = AsyncEngine(core)
        await self.attach(engine, owned=True)
        return engine

    def add_embedder(self, name: str, encoder: AsyncEncoder, main: bool = False) -> None:
        """Serve an embedding model under `name` (shut down by stop())."""
        encoder.start()
        self._encoders.append(encoder)
        self.servicer.attach_embedder(name, encoder, main)

    async def stop(self, grace: float | None = None) -> None:
        """Drain: health NOT_SERVING, new calls UNAVAILABLE (clients retry elsewhere), in-flight
        generations get `grace` seconds (default options.grace_s) to finish, then the rest are
        cancelled (their requests aborted) and the engine stops."""
        if self.servicer.draining:
            await self._stopped.wait()
            return
        self.servicer.draining = True
        grace = self.options.grace_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        # The listener stays open while draining: a call that arrives now gets a clear
        # UNAVAILABLE from the servicer rather than a refused connection or a bare CANCELLED.
        if self.servicer.in_flight:
            log.info("draining %d in-flight call(s), up to %.0fs", self.servicer.in_flight, grace)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.servicer.wait_idle(), grace)
        if self._server is not None:
            await self._server.stop(0.5)   # short: only unary side calls (tokenize, info) are left
        if self._owns_engine and self.engine is not None:
            await self.engine.shutdown()
        for encoder in self._encoders:
            await encoder.shutdown()
        await self.servicer.close()
        self._stopped.set()

    async def force_stop(self) -> None:
        """Cancel every in-flight call now (a second SIGTERM or Ctrl-C during a drain)."""
        if self._server is not None:
            await self._server.stop(0)

    async def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)


class BackgroundServer:
    """A WeftServer on its own event loop in a daemon thread: for tests, benchmarks and notebooks
    that want a real server on a loopback port without a subprocess."""

    def __init__(
        self, options: ServerOptions | None = None, config: EngineConfig | None = None,
        core: EngineCore | None = None, on_request_end: RequestEndHook | None = None,
        observer: RequestObserver | None = None,
    ) -> None:
        if (config is None) == (core is None):
            raise ValueError("pass exactly one of config or core")
        self.options = options or ServerOptions(host="127.0.0.1", port=0)
        self._config, self._core, self._hook, self._observer = config, core, on_request_end, observer
        self.loop = asyncio.new_event_loop()
        self.server: WeftServer | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, name="weft-grpc", daemon=True)

    def start(self, timeout: float = 300.0) -> BackgroundServer:
        self._thread.start()
        self.call(self._start(), timeout)
        return self

    async def _start(self) -> None:
        self.server = WeftServer(self.options, on_request_end=self._hook, observer=self._observer)
        await self.server.start()
        if self._core is not None:
            await self.server.attach(AsyncEngine(self._core), owned=True)
        else:
            assert self._config is not None
            await self.server.load(self._config)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run a coroutine on the server's loop from another thread and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def port(self) -> int:
        assert self.server is not None and self.server.port is not None, "not started"
        return self.server.port

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def engine(self) -> AsyncEngine:
        assert self.server is not None and self.server.engine is not None, "not started"
        return self.server.engine

    @property
    def core(self) -> EngineCore:
        return self.engine.core

    def stop(self, grace: float = 0.0) -> None:
        if self.server is not None and self._thread.is_alive():
            self.call(self.server.stop(grace), timeout=grace + 60)
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
