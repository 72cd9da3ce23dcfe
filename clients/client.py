"""WeftClient (blocking) and AsyncWeftClient (asyncio): thin, typed wrappers over the generated
stubs in clients/weft/v1. They return the protobuf messages themselves (see inference.proto for
every field) and retry only UNAVAILABLE (server loading, draining or unreachable), with bounded
exponential backoff: every other status is the caller's to handle.

    with WeftClient("localhost:50051") as client:
        resp = client.generate("The capital of France is", max_tokens=8, temperature=0)
        print(resp.choices[0].text)
        for msg in client.generate_stream([{"role": "user", "content": "Hi!"}], max_tokens=32):
            print(msg.choice.text, end="", flush=True)
"""
from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.weft.v1 import guided_pb2
from clients.weft.v1 import inference_pb2 as pb
from clients.weft.v1 import inference_pb2_grpc as pb_grpc

__all__ = ["AsyncWeftClient", "RetryPolicy", "WeftClient", "build_embed_request", "build_generate_request", "chat_message",
           "guided_pb2", "pb"]

T = TypeVar("T")
Message = Mapping[str, Any]      # {"role", "content"}, and for tools "tool_calls" / "tool_call_id" / "name"
Prompt = str | Sequence[int] | Sequence[Message] | pb.GenerateRequest
Metadata = tuple[tuple[str, str], ...]
# What to embed: a text, texts, token ids, or lists of token ids.
EmbedInputs = str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]]

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})
_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
             "frequency_penalty", "seed")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retries of UNAVAILABLE: up to max_attempts calls in all, sleeping an exponentially growing,
    jittered delay between them, never past the call's own timeout."""
    max_attempts: int = 4
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0

    def delay(self, retry: int) -> float:
        base = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier**retry)
        return base * (0.5 + random.random() / 2)   # jitter: replicas' clients don't retry in lockstep


NO_RETRY = RetryPolicy(max_attempts=1)


def _load_request(model: str, keep_alive: float | None) -> pb.LoadModelRequest:
    req = pb.LoadModelRequest(model=model)
    if keep_alive is not None:
        req.keep_alive_seconds = keep_alive
    return req


def build_generate_request(
    prompt: Prompt | None = None, *, messages: Sequence[Message] | None = None, model: str = "",
    max_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
    top_k: int | None = None, min_p: float | None = None, repetition_penalty: float | None = None,
    presence_penalty: float | None = None, frequency_penalty: float | None = None, seed: int | None = None,
    stop: Sequence[str] = (), stop_token_ids: Sequence[int] = (), ignore_eos: bool = False,
    include_stop_str_in_output: bool = False, n: int | None = None, logprobs: int | None = None,
    skip_special_tokens: bool | None = None, guided: guided_pb2.GuidedDecoding | None = None,
    num_speculative_tokens: int | None = None, cache_salt: str = "", add_generation_prompt: bool | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None, tool_choice: str | None = None,
    parallel_tool_calls: bool | None = None, logit_bias: Mapping[int, float] | None = None,
    keep_alive: float | None = None,
) -> pb.GenerateRequest:
    """A GenerateRequest from Python values. `prompt` is text, token ids, chat messages
    ({"role", "content"} mappings; an assistant turn may carry "tool_calls", a tool turn
    "tool_call_id") or a ready GenerateRequest (returned as is). `tools` are
    {"name", "description", "parameters"} mappings (or OpenAI's {"type": "function", "function":
    {...}}); `tool_choice` is "none", "auto", "required" or a tool's name; `logit_bias` maps token
    ids to a bias in [-100, 100]; `keep_alive` is how many seconds a store server keeps the model
    loaded once idle (0: unload after this request, negative: keep). None leaves a field unset, so
    the server's documented default applies."""
    if isinstance(prompt, pb.GenerateRequest):
        return prompt
    req = pb.GenerateRequest(model=model, cache_salt=cache_salt)
    if keep_alive is not None:
        req.keep_alive_seconds = keep_alive
    if messages is not None:
        prompt = messages
    if isinstance(prompt, str):
        req.text = prompt
    elif prompt is not None:
        items = list(prompt)
        if messages is None and all(isinstance(t, int) for t in items):
            req.token_ids.SetInParent()   # even when empty: the server then names the field
            req.token_ids.ids.extend(items)  # type: ignore[arg-type]
        else:
            req.chat.SetInParent()
            req.chat.messages.extend(chat_message(m) for m in items)  # type: ignore[arg-type]
            if add_generation_prompt is not None:
                req.chat.add_generation_prompt = add_generation_prompt
    values = dict(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                  repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                  frequency_penalty=frequency_penalty, seed=seed)
    for name in _SAMPLING:
        if values[name] is not None:
            setattr(req.sampling, name, values[name])
    for token, bias in (logit_bias or {}).items():
        req.sampling.logit_bias[token] = bias
    if max_tokens is not None:
        req.stopping.max_tokens = max_tokens
    req.stopping.stop.extend(stop)
    req.stopping.stop_token_ids.extend(stop_token_ids)
    req.stopping.ignore_eos = ignore_eos
    req.stopping.include_stop_str_in_output = include_stop_str_in_output
    for name, value in (("n", n), ("logprobs", logprobs), ("skip_special_tokens", skip_special_tokens),
                        ("num_speculative_tokens", num_speculative_tokens)):
        if value is not None:
            setattr(req, name, value)
    if guided is not None:
        req.guided.CopyFrom(guided)
    for t in tools or ():
        f = t.get("function", t)
        params = f.get("parameters")
        req.tools.append(pb.Tool(name=f.get("name", ""), description=f.get("description") or "",
                                 parameters="" if params is None else (params if isinstance(params, str) else json.dumps(params)),
                                 strict=bool(f.get("strict", False))))
    if tool_choice is not None:
        modes = {"none": pb.ToolChoice.MODE_NONE, "auto": pb.ToolChoice.MODE_AUTO,
                 "required": pb.ToolChoice.MODE_REQUIRED}
        if tool_choice in modes:
            req.tool_choice.mode = modes[tool_choice]
        else:
            req.tool_choice.function_name = tool_choice
    if parallel_tool_calls is not None:
        req.parallel_tool_calls = parallel_tool_calls
    return req


def build_embed_request(inputs: EmbedInputs, *, model: str = "", truncate: bool = False,
                        dimensions: int | None = None, normalize: bool | None = None) -> pb.EmbedRequest:
    """An EmbedRequest: `inputs` is a text, a list of texts, a list of token ids (one input) or a
    list of token-id lists. None leaves dimensions / normalize unset (the model's defaults)."""
    req = pb.EmbedRequest(model=model, truncate=truncate)
    items: list[Any] = [inputs] if isinstance(inputs, str) else list(inputs)
    if items and all(isinstance(t, int) for t in items):
        items = [items]   # one token-id list
    for item in items:
        if isinstance(item, str):
            req.inputs.append(pb.EmbedInput(text=item))
        else:
            req.inputs.append(pb.EmbedInput(token_ids=pb.TokenIds(ids=list(item))))
    if dimensions is not None:
        req.dimensions = dimensions
    if normalize is not None:
        req.normalize = normalize
    return req


def add_tool_call_piece(calls: dict[Any, pb.ToolCall], key: Any, piece: pb.ToolCall) -> None:
    """Fold one streamed `Choice.tool_calls` piece into `calls[key]` (key: the piece's index, or
    (choice index, piece index) across choices): id and name come with a call's first piece, its
    arguments in pieces after."""
    call = calls.setdefault(key, pb.ToolCall(index=piece.index))
    call.id, call.name = call.id or piece.id, call.name or piece.name
    call.arguments += piece.arguments


def chat_message(m: Message) -> pb.ChatMessage:
    """One chat turn as a ChatMessage. Tool calls may be given as {"id", "name", "arguments"} or
    in OpenAI's shape ({"id", "type": "function", "function": {"name", "arguments"}}); arguments
    as JSON text or as an object."""
    msg = pb.ChatMessage(role=m["role"], content=m.get("content") or "", tool_call_id=m.get("tool_call_id") or "",
                         name=m.get("name") or "")
    for i, call in enumerate(m.get("tool_calls") or ()):
        f = call.get("function", call)
        args = f.get("arguments", "{}")
        msg.tool_calls.append(pb.ToolCall(id=call.get("id") or "", name=f.get("name", ""), index=i,
                                          arguments=args if isinstance(args, str) else json.dumps(args)))
    return msg


def _tokenize_request(
    text: str | None, messages: Sequence[Message] | None, model: str,
    add_special_tokens: bool | None, return_tokens: bool,
) -> pb.TokenizeRequest:
    req = pb.TokenizeRequest(model=model, return_tokens=return_tokens)
    if messages is not None:
        req.chat.messages.extend(chat_message(m) for m in messages)
    elif text is not None:
        req.text = text
    if add_special_tokens is not None:
        req.add_special_tokens = add_special_tokens
    return req


class _Base:
    def __init__(self, target: str, api_key: str | None, retry: RetryPolicy, timeout: float | None) -> None:
        self.target = target
        self.retry = retry
        self.timeout = timeout
        self._auth: Metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    def _metadata(self, request_id: str | None) -> Metadata:
        return self._auth + ((("x-request-id", request_id),) if request_id else ())

    def _deadline(self, timeout: float | None) -> float | None:
        timeout = self.timeout if timeout is None else timeout
        return None if timeout is None else time.monotonic() + timeout

    def _next_try(self, exc: grpc.RpcError, retry: int, deadline: float | None) -> float | None:
        """Seconds to wait before the next attempt, or None to give up and raise `exc`."""
        if exc.code() not in RETRYABLE or retry + 1 >= self.retry.max_attempts:
            return None
        delay = self.retry.delay(retry)
        if deadline is not None and time.monotonic() + delay >= deadline:
            return None
        return delay


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _channel_args(target: str, tls: bool, root_certificates: bytes | None, options: Sequence[tuple[str, Any]],
                  aio: bool) -> grpc.Channel | grpc.aio.Channel:
    mod = grpc.aio if aio else grpc
    if tls or root_certificates:
        return mod.secure_channel(target, grpc.ssl_channel_credentials(root_certificates), options=options)
    return mod.insecure_channel(target, options=options)


class WeftClient(_Base):
    """Blocking client. `timeout` (seconds) is the default deadline of each call, retries included."""

    def __init__(
        self, target: str = "localhost:50051", *, api_key: str | None = None, tls: bool = False,
        root_certificates: bytes | None = None, timeout: float | None = None,
        retry: RetryPolicy = RetryPolicy(), options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        super().__init__(target, api_key, retry, timeout)
        self.channel: grpc.Channel = _channel_args(target, tls, root_certificates, options, aio=False)
        self.stub = pb_grpc.InferenceServiceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def _unary(self, method: Callable[..., T], request: Any, timeout: float | None, request_id: str | None = None) -> T:
        deadline = self._deadline(timeout)
        retry = 0
        while True:
            try:
                return method(request, timeout=_remaining(deadline), metadata=self._metadata(request_id))
            except grpc.RpcError as exc:
                delay = self._next_try(exc, retry, deadline)
                if delay is None:
                    raise
                time.sleep(delay)
                retry += 1

    def generate(self, prompt: Prompt | None = None, *, timeout: float | None = None, request_id: str | None = None,
                 **params: Any) -> pb.GenerateResponse:
        """All n completions at once. `params` are build_generate_request's keywords."""
        return self._unary(self.stub.Generate, build_generate_request(prompt, **params), timeout, request_id)

    def generate_stream(self, prompt: Prompt | None = None, *, timeout: float | None = None,
                        request_id: str | None = None, **params: Any) -> Iterator[pb.GenerateStreamResponse]:
        """Deltas as they are produced. Leaving the loop early (break, close()) cancels the call,
        which aborts the request on the server. Retried only before the first delta arrived."""
        request = build_generate_request(prompt, **params)
        deadline = self._deadline(timeout)
        retry = 0
        while True:
            call = self.stub.GenerateStream(request, timeout=_remaining(deadline), metadata=self._metadata(request_id))
            received = False
            try:
                for msg in call:
                    received = True
                    yield msg
                return
            except grpc.RpcError as exc:
                delay = None if received else self._next_try(exc, retry, deadline)
                if delay is None:
                    raise
            finally:
                call.cancel()   # no-op once the call has ended; cancels it when the caller stops early
            time.sleep(delay)
            retry += 1

    def tokenize(self, text: str | None = None, *, messages: Sequence[Message] | None = None,
                 model: str = "", add_special_tokens: bool | None = None, return_tokens: bool = False,
                 timeout: float | None = None) -> pb.TokenizeResponse:
        req = _tokenize_request(text, messages, model, add_special_tokens, return_tokens)
        return self._unary(self.stub.Tokenize, req, timeout)

    def embed(self, inputs: EmbedInputs, *, model: str = "", truncate: bool = False, dimensions: int | None = None,
              normalize: bool | None = None, timeout: float | None = None,
              request_id: str | None = None) -> pb.EmbedResponse:
        """One vector per input (`resp.embeddings[i].values`); see build_embed_request."""
        req = build_embed_request(inputs, model=model, truncate=truncate, dimensions=dimensions, normalize=normalize)
        return self._unary(self.stub.Embed, req, timeout, request_id)

    def detokenize(self, token_ids: Sequence[int], *, model: str = "", skip_special_tokens: bool | None = None,
                   timeout: float | None = None) -> str:
        req = pb.DetokenizeRequest(model=model, token_ids=token_ids)
        if skip_special_tokens is not None:
            req.skip_special_tokens = skip_special_tokens
        return self._unary(self.stub.Detokenize, req, timeout).text

    def models(self, *, timeout: float | None = None) -> list[pb.ModelInfo]:
        return list(self._unary(self.stub.ListModels, pb.ListModelsRequest(), timeout).models)

    def model_info(self, model: str = "", *, timeout: float | None = None) -> pb.ModelInfo:
        return self._unary(self.stub.GetModelInfo, pb.GetModelInfoRequest(model=model), timeout).model

    def reset_prefix_cache(self, model: str = "", *, timeout: float | None = None) -> pb.ResetPrefixCacheResponse:
        return self._unary(self.stub.ResetPrefixCache, pb.ResetPrefixCacheRequest(model=model), timeout)

    def load_adapter(self, name: str, path: str, *, timeout: float | None = None) -> pb.LoadAdapterResponse:
        """Serve the LoRA adapter at `path` (on the server: a PEFT directory or a LoRA .gguf) as
        model `name`."""
        return self._unary(self.stub.LoadAdapter, pb.LoadAdapterRequest(name=name, path=path), timeout)

    def unload_adapter(self, name: str, *, timeout: float | None = None) -> None:
        self._unary(self.stub.UnloadAdapter, pb.UnloadAdapterRequest(name=name), timeout)

    def load_model(self, model: str = "", keep_alive: float | None = None, *,
                   timeout: float | None = None) -> pb.LoadModelResponse:
        """Load a store model now (store mode) and set its keep_alive in seconds."""
        return self._unary(self.stub.LoadModel, _load_request(model, keep_alive), timeout)

    def unload_model(self, model: str, *, timeout: float | None = None) -> bool:
        """Unload a store model (once its running requests end); False if it was not loaded."""
        return self._unary(self.stub.UnloadModel, pb.UnloadModelRequest(model=model), timeout).unloading

    def loaded_models(self, *, timeout: float | None = None) -> list[pb.LoadedModel]:
        """What is loaded now (Ollama's ps), most recently used first."""
        return list(self._unary(self.stub.ListLoadedModels, pb.ListLoadedModelsRequest(), timeout).models)

    def pull_model(self, source: str, name: str = "", *, timeout: float | None = None
                   ) -> Iterator[pb.PullModelProgress]:
        """Add a model to the server's store from its machine; progress as it goes."""
        call = self.stub.PullModel(pb.PullModelRequest(source=source, name=name), timeout=timeout,
                                   metadata=self._metadata(None))
        try:
            yield from call
        finally:
            call.cancel()

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """"SERVING", "NOT_SERVING", ... (grpc.health.v1; needs no API key)."""
        resp = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until the server answers health SERVING (the model is loaded): follows the
        health Watch stream, so it returns the moment the status flips, without polling."""
        grpc.channel_ready_future(self.channel).result(timeout=timeout)
        watch = self.health_stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        try:
            for resp in watch:
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        finally:
            watch.cancel()
        raise TimeoutError(f"{self.target} did not become SERVING")

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> WeftClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncWeftClient(_Base):
    """asyncio client (grpc.aio). Create it inside the event loop that uses it."""

    def __init__(
        self, target: str = "localhost:50051", *, api_key: str | None = None, tls: bool = False,
        root_certificates: bytes | None = None, timeout: float | None = None,
        retry: RetryPolicy = RetryPolicy(), options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        super().__init__(target, api_key, retry, timeout)
        self.channel: grpc.aio.Channel = _channel_args(target, tls, root_certificates, options, aio=True)
        self.stub = pb_grpc.InferenceServiceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    async def _unary(self, method: Callable[..., Awaitable[T]], request: Any, timeout: float | None,
                     request_id: str | None = None) -> T:
        deadline = self._deadline(timeout)
        retry = 0
        while True:
            try:
                return await method(request, timeout=_remaining(deadline), metadata=self._metadata(request_id))
            except grpc.RpcError as exc:
                delay = self._next_try(exc, retry, deadline)
                if delay is None:
                    raise
                await asyncio.sleep(delay)
                retry += 1

    async def generate(self, prompt: Prompt | None = None, *, timeout: float | None = None,
                       request_id: str | None = None, **params: Any) -> pb.GenerateResponse:
        return await self._unary(self.stub.Generate, build_generate_request(prompt, **params), timeout, request_id)

    async def generate_stream(self, prompt: Prompt | None = None, *, timeout: float | None = None,
                              request_id: str | None = None, **params: Any) -> AsyncIterator[pb.GenerateStreamResponse]:
        """Deltas as they are produced; leaving early (break, aclose(), task cancelled) cancels
        the call. Retried only before the first delta arrived."""
        request = build_generate_request(prompt, **params)
        deadline = self._deadline(timeout)
        retry = 0
        while True:
            call = self.stub.GenerateStream(request, timeout=_remaining(deadline), metadata=self._metadata(request_id))
            received = False
            try:
                async for msg in call:
                    received = True
                    yield msg
                return
            except grpc.RpcError as exc:
                delay = None if received else self._next_try(exc, retry, deadline)
                if delay is None:
                    raise
            finally:
                call.cancel()
            await asyncio.sleep(delay)
            retry += 1

    async def tokenize(self, text: str | None = None, *, messages: Sequence[Message] | None = None,
                       model: str = "", add_special_tokens: bool | None = None, return_tokens: bool = False,
                       timeout: float | None = None) -> pb.TokenizeResponse:
        req = _tokenize_request(text, messages, model, add_special_tokens, return_tokens)
        return await self._unary(self.stub.Tokenize, req, timeout)

    async def embed(self, inputs: EmbedInputs, *, model: str = "", truncate: bool = False,
                    dimensions: int | None = None, normalize: bool | None = None, timeout: float | None = None,
                    request_id: str | None = None) -> pb.EmbedResponse:
        req = build_embed_request(inputs, model=model, truncate=truncate, dimensions=dimensions, normalize=normalize)
        return await self._unary(self.stub.Embed, req, timeout, request_id)

    async def detokenize(self, token_ids: Sequence[int], *, model: str = "", skip_special_tokens: bool | None = None,
                         timeout: float | None = None) -> str:
        req = pb.DetokenizeRequest(model=model, token_ids=token_ids)
        if skip_special_tokens is not None:
            req.skip_special_tokens = skip_special_tokens
        return (await self._unary(self.stub.Detokenize, req, timeout)).text

    async def models(self, *, timeout: float | None = None) -> list[pb.ModelInfo]:
        return list((await self._unary(self.stub.ListModels, pb.ListModelsRequest(), timeout)).models)

    async def model_info(self, model: str = "", *, timeout: float | None = None) -> pb.ModelInfo:
        return (await self._unary(self.stub.GetModelInfo, pb.GetModelInfoRequest(model=model), timeout)).model

    async def load_adapter(self, name: str, path: str, *, timeout: float | None = None) -> pb.LoadAdapterResponse:
        return await self._unary(self.stub.LoadAdapter, pb.LoadAdapterRequest(name=name, path=path), timeout)

    async def unload_adapter(self, name: str, *, timeout: float | None = None) -> None:
        await self._unary(self.stub.UnloadAdapter, pb.UnloadAdapterRequest(name=name), timeout)

    async def load_model(self, model: str = "", keep_alive: float | None = None, *,
                         timeout: float | None = None) -> pb.LoadModelResponse:
        return await self._unary(self.stub.LoadModel, _load_request(model, keep_alive), timeout)

    async def unload_model(self, model: str, *, timeout: float | None = None) -> bool:
        return (await self._unary(self.stub.UnloadModel, pb.UnloadModelRequest(model=model), timeout)).unloading

    async def loaded_models(self, *, timeout: float | None = None) -> list[pb.LoadedModel]:
        return list((await self._unary(self.stub.ListLoadedModels, pb.ListLoadedModelsRequest(), timeout)).models)

    async def pull_model(self, source: str, name: str = "", *, timeout: float | None = None
                         ) -> AsyncIterator[pb.PullModelProgress]:
        call = self.stub.PullModel(pb.PullModelRequest(source=source, name=name), timeout=timeout,
                                   metadata=self._metadata(None))
        try:
            async for msg in call:
                yield msg
        finally:
            call.cancel()

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        resp = await self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    async def wait_ready(self, timeout: float = 60.0) -> None:
        async def watch() -> None:
            await self.channel.channel_ready()
            async for resp in self.health_stub.Watch(health_pb2.HealthCheckRequest(service="")):
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            raise ConnectionError(f"{self.target}: health stream ended before SERVING")

        await asyncio.wait_for(watch(), timeout)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncWeftClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
