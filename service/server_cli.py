"""`weft serve` (the gRPC server, with the REST shim beside it), `weft shim` (the REST shim alone,
in front of a remote server) and `weft client ...` (manual calls against one).

service/cli.py calls `add_commands(sub, engine_args, engine_config)` when this module exists.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from common import env
from common.errors import InvalidArgumentError
from service.config import EngineConfig
from service.protocol import DEFAULT_MAX_REQUEST_BYTES

if TYPE_CHECKING:  # the server pulls in grpc and torch: load it only for the commands that use it
    from clients.client import WeftClient
    from service.model_pool import Clock
    from service.server import ServerOptions, WeftServer
    from service.store_router import StoreRouter

log = logging.getLogger("weft.serve")

EngineArgs = Callable[..., None]   # (parser, repeatable=frozenset of field names)
EngineConfigFn = Callable[..., EngineConfig]


def add_commands(sub: argparse._SubParsersAction, engine_args: EngineArgs, engine_config: EngineConfigFn) -> None:
    _add_serve(sub, engine_args, engine_config)
    _add_shim(sub)
    _add_client(sub)


# ---- weft serve -----------------------------------------------------------------------------


def _add_serve(sub: argparse._SubParsersAction, engine_args: EngineArgs, engine_config: EngineConfigFn) -> None:
    from decoding.tools.formats import FORMATS
    from service.encoder_loader import DEFAULT_EMBEDDING_NAME
    from service.server import DEFAULT_PORT

    s = sub.add_parser("serve", help="serve the model store (or one model by path) over gRPC and HTTP",
                       description="Without --model, or with store names: serve every model of the store "
                                   "(`weft list`), each loaded on first use and unloaded after --keep-alive idle. "
                                   "--model PATH: serve exactly that model (production).")
    engine_args(s, repeatable=frozenset({"model"}))
    s.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all interfaces)")
    s.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"gRPC port (default {DEFAULT_PORT}; 0 = any free port)")
    s.add_argument("--api-key", default=env.api_key(),
                   help="require `authorization: Bearer KEY` metadata (default: $WEFT_API_KEY; health checks stay open)")
    s.add_argument("--tls-cert", default=None, help="PEM certificate chain: serve TLS (with --tls-key)")
    s.add_argument("--tls-key", default=None, help="PEM private key for --tls-cert")
    s.add_argument("--served-model-name", default=None, help="the name clients use in `model` (default: the model's own)")
    s.add_argument("--grace", type=float, default=30.0, help="seconds in-flight calls get to finish on SIGTERM")
    s.add_argument("--http-port", type=int, default=None,
                   help="OpenAI/Ollama-compatible HTTP API and /metrics on this port (default 8000, skipped with "
                        "a warning if taken; 0 = off)")
    s.add_argument("--http-host", default=None, help="address of the HTTP API (default: --host)")
    s.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                   help="largest gRPC message and HTTP body read (default 16 MiB): beyond it RESOURCE_EXHAUSTED / 413 "
                        "naming the limit")
    s.add_argument("--tool-call-format", default="auto", choices=["auto", *FORMATS],
                   help="how tool calls are written and parsed (default auto: from the chat template, else hermes)")
    s.add_argument("--embedding-model", default=None, metavar="PATH",
                   help="a sentence-transformers directory to serve beside the model for embeddings, under "
                        "--embedding-model-name (default: the packaged all-MiniLM-L6-v2 when installed; none = off)")
    s.add_argument("--embedding-model-name", default=DEFAULT_EMBEDDING_NAME,
                   help=f"the name requests use for it (default {DEFAULT_EMBEDDING_NAME!r}, Ollama's name; "
                        "NAME:latest works too)")
    s.add_argument("--pooling", default="last", choices=("last", "mean"),
                   help="how the generation model's last hidden states become an embedding (default last: the "
                        "last token's; mean: the average over the input); vectors are L2-normalised")
    s.add_argument("--keep-alive", default="5m", metavar="DURATION",
                   help="store mode: how long a model stays loaded once idle (Ollama's OLLAMA_KEEP_ALIVE: \"5m\", "
                        "\"1h\", seconds; 0 = unload after each request; negative = until its room is needed)")
    s.add_argument("--max-loaded-models", type=int, default=None, metavar="N",
                   help="store mode: at most N models loaded at once; loading another unloads the least recently "
                        "used idle one (default: no limit but --memory-gb)")
    s.add_argument("--memory-gb", type=float, default=None, metavar="GB",
                   help="store mode: memory the loaded models may hold in all (weights and KV caches); a model "
                        "alone larger than this is refused (default: no limit)")
    s.set_defaults(func=lambda a: cmd_serve(a, engine_config))


@dataclasses.dataclass(slots=True)
class StoreSettings:
    """`weft serve` over the model store: which models to load at start, and the pool's limits."""
    preload: list[str]
    keep_alive: float = 300.0
    max_loaded: int | None = None
    memory_bytes: int | None = None


def serve_mode(models: list[str]) -> str | None:
    """The one path `weft serve --model PATH` serves (production), or None for store mode
    (no --model, or store names only). InvalidArgumentError for a path among several models."""
    from pathlib import Path

    from service.store import NAME

    paths = [m for m in models if Path(m).expanduser().exists() or not NAME.fullmatch(m)]
    if not paths:
        return None
    if len(models) > 1:
        raise InvalidArgumentError("model", f"{paths[0]} is a path: a path is served alone (production); name store "
                                   "models (`weft list`) to serve several")
    return paths[0]


def cmd_serve(a: argparse.Namespace, engine_config: EngineConfigFn) -> int:
    from service.server import ServerOptions

    if bool(a.tls_cert) != bool(a.tls_key):
        print("weft: error: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    from service.model_pool import parse_keep_alive

    models = a.model or []
    path = serve_mode(models)
    config = engine_config(a, model=path)
    options = ServerOptions(host=a.host, port=a.port, api_key=a.api_key, tls_cert=a.tls_cert, tls_key=a.tls_key,
                            served_model_name=a.served_model_name, grace_s=a.grace,
                            tool_call_format=a.tool_call_format, max_request_bytes=a.max_request_bytes,
                            embedding_model_name=a.embedding_model_name, pooling=a.pooling)
    if int((env.rendezvous() or {}).get("RANK", "0")) > 0:
        # torchrun (or a hand-made rendezvous) started this process as a tensor-parallel rank
        # other than 0: it serves no API, it runs its shard of every step rank 0 sends.
        if path is None:
            raise InvalidArgumentError("--model", "a tensor-parallel rank other than 0 needs the model's path")
        from service.engine.tp_worker import run_rank
        run_rank(config)
    options = dataclasses.replace(options, embedding_model=resolve_embedding_model(a.embedding_model, config.model))
    store = None
    if path is not None and (a.max_loaded_models is not None or a.memory_gb is not None):
        raise InvalidArgumentError("--model", f"{path} is a path: served alone and never unloaded; "
                                   "--max-loaded-models and --memory-gb are for the store (name store models)")
    if path is None:
        from service.store import DEFAULT_NAME

        if a.served_model_name:
            raise InvalidArgumentError("--served-model-name", "the store names its models (`weft cp` to add a name)")

        try:
            keep_alive = parse_keep_alive(a.keep_alive)
        except ValueError as exc:
            raise InvalidArgumentError("--keep-alive", str(exc)) from None
        if a.max_loaded_models is not None and a.max_loaded_models < 1:
            raise InvalidArgumentError("--max-loaded-models", f"must be at least 1, got {a.max_loaded_models}")
        if a.memory_gb is not None and not a.memory_gb > 0:
            raise InvalidArgumentError("--memory-gb", f"must be > 0, got {a.memory_gb}")
        store = StoreSettings(models or [DEFAULT_NAME], keep_alive if keep_alive is not None else 300.0,
                              a.max_loaded_models, int(a.memory_gb * 1e9) if a.memory_gb is not None else None)
    http_host = a.http_host if a.http_host is not None else a.host
    return asyncio.run(serve(options, config, http_host=http_host, http_port=a.http_port, store=store))


def from_store(config: EngineConfig, options: ServerOptions) -> tuple[EngineConfig, ServerOptions]:
    """`--model NAME` of a store model (`weft create`, `weft list`) rather than a path: its weights,
    served under its name, its Modelfile the defaults of its requests (num_ctx the context, an
    ADAPTER applied to every request of the model)."""
    from pathlib import Path

    from service.store import NAME, ModelStore
    from service.store_router import engine_config as store_engine_config

    name = config.model
    if name is None:   # the default model: the store's models of its weights are served too (smollm2:135m ...)
        return config, dataclasses.replace(options, store=True)
    if Path(name).expanduser().exists() or not NAME.fullmatch(name):
        return config, options   # production: exactly the model at that path
    m = ModelStore().get(name)
    served = options.served_model_name or m.name.removesuffix(":latest")
    config, adapter = store_engine_config(config, m, served)
    options = dataclasses.replace(options, served_model_name=served, defaults=m.modelfile(), store=True,
                                  model_adapter=adapter)
    return config, options


def resolve_embedding_model(flag: str | None, model: str | None) -> str | None:
    """--embedding-model: a path, "none", or unset for the packaged all-MiniLM-L6-v2 (when it is
    installed; a server whose --model is itself an embedding model serves no second one)."""
    from service.encoder_loader import default_embedding_model_path, is_encoder_dir

    if flag is not None:
        return None if flag.lower() == "none" else flag
    if is_encoder_dir(model):
        return None
    path = default_embedding_model_path()
    return str(path) if path is not None else None


async def serve(options: ServerOptions, config: EngineConfig, http_host: str = "0.0.0.0",
                http_port: int | None = 0, store: StoreSettings | None = None, clock: Clock | None = None) -> int:
    """Listen at once (health NOT_SERVING, calls UNAVAILABLE; HTTP /health 503), load the model,
    serve until SIGTERM/SIGINT, then drain: a second signal cancels what is still running.
    `http_port` 0 leaves the REST shim off; None means the default port, skipped (with a warning)
    when another process holds it, whereas a port asked for explicitly must be free. With
    `store`, serve the model store (service/store_router.py), `clock` its pool's clock."""
    from service.metrics import WeftMetrics
    from service.shim.app import DEFAULT_HTTP_PORT
    from service.server import WeftServer

    metrics = WeftMetrics()
    router = store_router(options, config, store, metrics, clock) if store is not None else None
    server = WeftServer(options, observer=metrics, servicer=router)
    metrics.bind(lambda: server.engine)
    port = await server.start()
    where = f"{options.host}:{port}"
    log.info("listening on %s (gRPC); loading the model, health NOT_SERVING until it is ready", where)
    # The REST shim starts with the gRPC listener, not after the load, so that its /health answers
    # 503 while the model loads (as gRPC health says NOT_SERVING); it reaches the engine only
    # through this server's gRPC port.
    http = None
    if http_port != 0:
        try:
            http = await _start_http(options, port, http_host, http_port or DEFAULT_HTTP_PORT, metrics)
        except OSError as exc:
            if http_port is not None:
                await server.stop(0)
                raise
            log.warning("HTTP API off: cannot listen on %s:%d (%s); pass --http-port", http_host,
                        DEFAULT_HTTP_PORT, exc)

    stop = asyncio.Event()
    _install_signal_handlers(stop, server)
    loading = asyncio.create_task(server.load(config) if router is None
                                  else load_store(server, router, store.preload))
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not loading.done():
        log.info("stopped while loading the model")
        await server.stop(0)
        await _stop_http(http)
        return 0
    stopping.cancel()
    error = loading.exception()
    if error is not None:
        await server.stop(0)
        await _stop_http(http)
        raise error
    if router is None:
        _log_serving(server, where)
    else:
        log.info("serving the model store (%s) on %s; loaded: %s", router.store.home, where,
                 ", ".join(e.name for e in router.pool.loaded()) or "none")

    # The REST shim (OpenAI / Ollama JSON) started with the listener above (see _start_http).

    await stop.wait()
    log.info("draining: health NOT_SERVING, refusing new calls, up to %.0fs for in-flight ones",
             server.options.grace_s)
    # The HTTP side stays up while gRPC drains: its new requests get 503 (the servicer's
    # UNAVAILABLE), its in-flight streams finish through gRPC; then it closes.
    await server.stop()
    await _stop_http(http)
    log.info("stopped")
    return 0


def store_router(options: ServerOptions, config: EngineConfig, store: StoreSettings, observer: object = None,
                 clock: Clock | None = None) -> StoreRouter:
    """The servicer of `weft serve` over the model store, its first --model the default model
    (else the built-in one); `clock` the pool's (tests drive keep_alive with their own)."""
    import time

    from service.store import DEFAULT_NAME
    from service.store_router import StoreRouter

    return StoreRouter(config, options, default_model=store.preload[0] if store.preload else DEFAULT_NAME,
                       max_loaded=store.max_loaded, memory_bytes=store.memory_bytes, keep_alive=store.keep_alive,
                       clock=clock or time.monotonic, observer=observer)  # type: ignore[arg-type]


async def load_store(server: WeftServer, router: StoreRouter, preload: list[str]) -> None:
    """The embedding model beside the store, then the --model store models; health SERVING."""
    o = server.options
    if o.embedding_model:
        await router.load_embedding_model(o.embedding_model, o.embedding_model_name)
    await router.preload(preload)
    await server.set_serving()


async def _start_http(options: ServerOptions, grpc_port: int, host: str, port: int, metrics: object):
    """The REST shim on this event loop, talking to this process's gRPC port over loopback."""
    from service.shim.app import HttpServer

    tls, root, target = False, None, f"127.0.0.1:{grpc_port}"
    if options.tls_cert:
        # Loopback TLS trusting the server's own certificate (which must name localhost).
        tls, target = True, f"localhost:{grpc_port}"
        with open(options.tls_cert, "rb") as f:
            root = f.read()
    http = HttpServer(target, host, port, api_key=options.api_key, metrics=metrics, tls=tls, root_certificates=root,
                      max_body_bytes=options.max_request_bytes)
    bound = await http.start()
    log.info("HTTP on %s:%d (OpenAI /v1, Ollama /api, /health, /metrics)", host, bound)
    return http


async def _stop_http(http: object) -> None:
    if http is not None:
        await http.stop()  # type: ignore[attr-defined]


# ---- weft shim ------------------------------------------------------------------------------


def _add_shim(sub: argparse._SubParsersAction) -> None:
    from service.shim.app import DEFAULT_HTTP_PORT

    s = sub.add_parser("shim", help="serve the OpenAI/Ollama-compatible HTTP API in front of a remote Weft server")
    s.add_argument("--target", default="localhost:50051", help="host:port of the Weft gRPC server")
    s.add_argument("--host", default="0.0.0.0", help="HTTP address to listen on (default: all interfaces)")
    s.add_argument("--port", type=int, default=DEFAULT_HTTP_PORT, help=f"HTTP port (default {DEFAULT_HTTP_PORT})")
    s.add_argument("--api-key", default=env.api_key(),
                   help="require `Authorization: Bearer KEY` from HTTP clients and send it to the target "
                        "(default: $WEFT_API_KEY; without it a client's own header is passed through)")
    s.add_argument("--tls", action="store_true", help="connect to the target with TLS (system roots, or --ca-cert)")
    s.add_argument("--ca-cert", default=None, help="PEM root certificate to trust for the target (implies --tls)")
    s.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                   help="largest HTTP body read (default 16 MiB): beyond it 413")
    s.set_defaults(func=cmd_shim)


def cmd_shim(a: argparse.Namespace) -> int:
    return asyncio.run(shim(a.target, a.host, a.port, api_key=a.api_key, tls=a.tls or bool(a.ca_cert),
                            ca_cert=a.ca_cert, max_body_bytes=a.max_request_bytes))


async def shim(target: str, host: str, port: int, api_key: str | None = None, tls: bool = False,
               ca_cert: str | None = None, max_body_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> int:
    """The REST shim alone until SIGTERM/SIGINT. Its /metrics has only the HTTP request counts
    (engine metrics are on the `weft serve` process's own HTTP port)."""
    from service.metrics import WeftMetrics
    from service.shim.app import HttpServer

    root = open(ca_cert, "rb").read() if ca_cert else None
    http = HttpServer(target, host, port, api_key=api_key, metrics=WeftMetrics(), tls=tls, root_certificates=root,
                      max_body_bytes=max_body_bytes)
    bound = await http.start()
    log.info("HTTP on %s:%d in front of %s (OpenAI /v1, Ollama /api, /health)", host, bound, target)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await http.stop()
    log.info("stopped")
    return 0


def _install_signal_handlers(stop: asyncio.Event, server: WeftServer) -> None:
    loop = asyncio.get_running_loop()

    def on_signal(signame: str) -> None:
        if not stop.is_set():
            log.info("%s received", signame)
            stop.set()
        else:
            log.warning("%s received again: cancelling in-flight calls", signame)
            asyncio.ensure_future(server.force_stop())

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)


def _log_serving(server: WeftServer, where: str) -> None:
    o = server.options
    info = server.servicer.model_info
    assert info is not None
    embedders = [n for n in server.servicer.served_names if n != info.name]
    log.info(
        "serving %s%s on %s (gRPC weft.v1.InferenceService + grpc.health.v1 + reflection; %s; %s); "
        "context %d tokens, KV cache %d tokens",
        info.name, f" (embeddings: {', '.join(embedders)})" if embedders else "", where,
        "TLS" if o.tls_cert else "plaintext", "API key required" if o.api_key else "no API key",
        info.max_model_len, info.kv_cache_tokens,
    )


# ---- weft client ----------------------------------------------------------------------------


def _add_client(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("client", help="call a running Weft server (generate, tokenize, models, health)")
    c.add_argument("--target", default="localhost:50051", help="host:port of the server")
    c.add_argument("--api-key", default=env.api_key(), help="default: $WEFT_API_KEY")
    c.add_argument("--tls", action="store_true", help="connect with TLS (system roots, or --ca-cert)")
    c.add_argument("--ca-cert", default=None, help="PEM root certificate to trust (implies --tls)")
    c.add_argument("--timeout", type=float, default=None, help="deadline per call, in seconds")
    csub = c.add_subparsers(dest="client_cmd", required=True)

    g = csub.add_parser("generate", help="complete a prompt")
    g.add_argument("prompt")
    g.add_argument("--chat", action="store_true", help="send the prompt as a user message (chat template)")
    g.add_argument("--system", default=None, help="with --chat: a system message first")
    g.add_argument("--model", default="")
    g.add_argument("--max-tokens", type=int, default=None)
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--min-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--n", type=int, default=None)
    g.add_argument("--logprobs", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--num-speculative-tokens", type=int, default=None,
                   help="draft tokens per step (0 = off; default: the server's setting)")
    g.add_argument("--tool", action="append", default=[], metavar="JSON",
                   help='a tool the model may call (implies --chat), as JSON: {"name", "description", "parameters"} '
                        'or OpenAI\'s {"type": "function", "function": {...}}; repeatable')
    g.add_argument("--tools-file", default=None, metavar="PATH", help="a JSON list of tools (as --tool), added to --tool")
    g.add_argument("--tool-choice", default=None,
                   help="none | auto (the default with tools) | required | the name of a tool to call")
    g.add_argument("--no-parallel-tool-calls", action="store_true", help="at most one call per answer")
    g.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    g.add_argument("--json", action="store_true", help="print the response message(s) as JSON")
    g.add_argument("--request-id", default=None)
    g.set_defaults(func=cmd_client_generate)

    t = csub.add_parser("tokenize", help="text to token ids")
    t.add_argument("text")
    t.add_argument("--tokens", action="store_true", help="also print each token's text")
    t.set_defaults(func=cmd_client_tokenize)

    d = csub.add_parser("detokenize", help="token ids to text")
    d.add_argument("token_ids", type=int, nargs="+")
    d.set_defaults(func=cmd_client_detokenize)

    e = csub.add_parser("embed", help="embedding vectors of texts (one JSON array per line)")
    e.add_argument("texts", nargs="+", metavar="TEXT")
    e.add_argument("--model", default="", help="e.g. all-minilm (default: the first served model)")
    e.add_argument("--dimensions", type=int, default=None, help="keep the first N components (re-normalised)")
    e.add_argument("--no-normalize", action="store_true", help="raw pooled vectors, not L2-normalised")
    e.add_argument("--truncate", action="store_true", help="cut inputs longer than the model takes instead of failing")
    e.add_argument("--json", action="store_true", help="print the whole response message as JSON")
    e.set_defaults(func=cmd_client_embed)

    m = csub.add_parser("models", help="the served model(s) and their limits")
    m.set_defaults(func=cmd_client_models)

    h = csub.add_parser("health", help="grpc.health.v1 status")
    h.set_defaults(func=cmd_client_health)


def _client(a: argparse.Namespace) -> WeftClient:
    from clients.client import WeftClient

    root = open(a.ca_cert, "rb").read() if a.ca_cert else None
    return WeftClient(a.target, api_key=a.api_key, tls=a.tls or bool(root), root_certificates=root, timeout=a.timeout)


def _to_json(msg: object) -> str:
    from google.protobuf.json_format import MessageToJson

    return MessageToJson(msg, preserving_proto_field_name=True, indent=None)  # type: ignore[arg-type]


def _run_client(fn: Callable[[], int]) -> int:
    import grpc

    try:
        return fn()
    except grpc.RpcError as exc:
        print(f"weft client: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1


def _tools(a: argparse.Namespace) -> list[dict] | None:
    """--tool and --tools-file as a list of tool mappings (None when neither is given)."""
    tools = []
    try:
        for text in a.tool:
            tools.append(json.loads(text))
        if a.tools_file:
            with open(a.tools_file) as f:
                more = json.load(f)
            if not isinstance(more, list):
                raise ValueError(f"{a.tools_file} must hold a JSON list of tools")
            tools += more
    except ValueError as exc:   # JSONDecodeError included
        raise SystemExit(f"weft client: error: tools: {exc}") from None
    if not all(isinstance(t, dict) for t in tools):
        raise SystemExit("weft client: error: tools: each tool is a JSON object")
    return tools or None


def _print_calls(calls, prefix: str = "") -> None:
    for call in calls:
        print(f"{prefix}tool call {call.index}: {call.name}({call.arguments})  [{call.id}]")


def cmd_client_generate(a: argparse.Namespace) -> int:
    tools = _tools(a)
    messages = None
    if a.chat or tools:
        messages = ([{"role": "system", "content": a.system}] if a.system else []) + [{"role": "user", "content": a.prompt}]
    params = dict(model=a.model, max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                  min_p=a.min_p, seed=a.seed, n=a.n, logprobs=a.logprobs, stop=a.stop, ignore_eos=a.ignore_eos,
                  num_speculative_tokens=a.num_speculative_tokens, tools=tools, tool_choice=a.tool_choice,
                  parallel_tool_calls=False if a.no_parallel_tool_calls else None)
    prompt = messages if messages is not None else a.prompt

    def run() -> int:
        from clients.client import add_tool_call_piece
        from clients.weft.v1 import inference_pb2 as pb

        with _client(a) as client:
            if a.stream:
                several = (a.n or 1) > 1
                calls: dict[tuple[int, int], pb.ToolCall] = {}   # (choice, call) -> the call so far
                for msg in client.generate_stream(prompt, request_id=a.request_id, **params):
                    for piece in msg.choice.tool_calls:
                        add_tool_call_piece(calls, (msg.choice.index, piece.index), piece)
                    if a.json:
                        print(_to_json(msg), flush=True)
                    elif several:   # interleaved deltas: one line each, tagged with the completion
                        if msg.choice.text:
                            print(f"[{msg.choice.index}] {msg.choice.text!r}", flush=True)
                    else:
                        print(msg.choice.text, end="", flush=True)
                if not a.json:
                    if not several:
                        print()
                    for k in sorted(calls):
                        _print_calls([calls[k]], f"[{k[0]}] " if several else "")
                return 0
            resp = client.generate(prompt, request_id=a.request_id, **params)
            if a.json:
                print(_to_json(resp))
            else:
                for choice in resp.choices:
                    print((f"[{choice.index}] " if len(resp.choices) > 1 else "") + choice.text)
                    _print_calls(choice.tool_calls, f"[{choice.index}] " if len(resp.choices) > 1 else "")
            return 0

    return _run_client(run)


def cmd_client_tokenize(a: argparse.Namespace) -> int:
    def run() -> int:
        with _client(a) as client:
            resp = client.tokenize(a.text, return_tokens=a.tokens)
            print(_to_json(resp) if a.tokens else json.dumps(list(resp.token_ids)))
            return 0

    return _run_client(run)


def cmd_client_embed(a: argparse.Namespace) -> int:
    def run() -> int:
        with _client(a) as client:
            resp = client.embed(a.texts, model=a.model, truncate=a.truncate, dimensions=a.dimensions,
                                normalize=False if a.no_normalize else None)
            if a.json:
                print(_to_json(resp))
            else:
                for e in resp.embeddings:
                    print(json.dumps(list(e.values)))
            return 0

    return _run_client(run)


def cmd_client_detokenize(a: argparse.Namespace) -> int:
    def run() -> int:
        with _client(a) as client:
            print(client.detokenize(a.token_ids))
            return 0

    return _run_client(run)


def cmd_client_models(a: argparse.Namespace) -> int:
    def run() -> int:
        with _client(a) as client:
            for info in client.models():
                print(_to_json(info))
            return 0

    return _run_client(run)


def cmd_client_health(a: argparse.Namespace) -> int:
    def run() -> int:
        with _client(a) as client:
            status = client.health(timeout=a.timeout or 5.0)
            print(status)
            return 0 if status == "SERVING" else 1

    return _run_client(run)
