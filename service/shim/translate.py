"""HTTP JSON <-> weft.v1 protobuf: request building with HTTP field names for errors, guided
decoding specs from OpenAI / vLLM / Ollama fields, gRPC statuses as HTTP errors, and the
OpenAI shapes of finish reasons, logprobs and usage."""
from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import grpc

from clients.weft.v1 import guided_pb2
from clients.weft.v1 import inference_pb2 as pb
from service.protocol import INVALID_FIELD_KEY
from service.shim.models import SamplingFields

INT32_MAX = 2**31 - 1


class HttpError(Exception):
    """An error answered as JSON: OpenAI's {"error": {message, type, param, code}} on /v1 routes,
    Ollama's {"error": message} on /api routes."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    @property
    def type(self) -> str:
        return ERROR_TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")

    def openai(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def ollama(self) -> dict[str, Any]:
        return {"error": self.message}


ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 501: "not_implemented_error", 503: "service_unavailable_error",
    504: "timeout_error",
}

_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, None),
    grpc.StatusCode.OUT_OF_RANGE: (400, None),
    grpc.StatusCode.FAILED_PRECONDITION: (400, None),
    grpc.StatusCode.UNAUTHENTICATED: (401, "invalid_api_key"),
    grpc.StatusCode.PERMISSION_DENIED: (403, None),
    grpc.StatusCode.NOT_FOUND: (404, "model_not_found"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "queue_full"),
    grpc.StatusCode.UNAVAILABLE: (503, "unavailable"),
    grpc.StatusCode.CANCELLED: (503, "cancelled"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "deadline_exceeded"),
    grpc.StatusCode.UNIMPLEMENTED: (501, None),
}


class RequestBuilder:
    """Fills a GenerateRequest field by field, remembering which HTTP field each proto field came
    from, so that an INVALID_ARGUMENT naming `sampling.temperature` is answered naming
    `temperature` (or `options.temperature` for Ollama)."""

    def __init__(self, model: str | None = None) -> None:
        self.req = pb.GenerateRequest(model=model or "")
        self.names: dict[str, str] = {"model": "model"}

    def set(self, path: str, value: Any, param: str) -> None:
        if value is None:
            return
        msg, attr = self._resolve(path)
        try:
            setattr(msg, attr, value)
        except (TypeError, ValueError) as exc:
            raise HttpError(400, f"{param}: {_why(exc, value)}", param) from None
        self.names[path] = param

    def extend(self, path: str, values: Iterable[Any], param: str) -> None:
        msg, attr = self._resolve(path)
        try:
            getattr(msg, attr).extend(values)
        except (TypeError, ValueError) as exc:
            raise HttpError(400, f"{param}: {_why(exc, values)}", param) from None
        self.names[path] = param

    def name(self, path: str, param: str) -> None:
        self.names[path] = param

    def _resolve(self, path: str) -> tuple[Any, str]:
        msg: Any = self.req
        *parents, attr = path.split(".")
        for p in parents:
            msg = getattr(msg, p)
        return msg, attr

    def param_of(self, field: str | None) -> str | None:
        """The HTTP field for a proto field path (longest known prefix, the rest kept)."""
        if not field:
            return None
        best = None
        for path in self.names:
            if (field == path or field.startswith(path + ".") or field.startswith(path + "[")) and (
                    best is None or len(path) > len(best)):
                best = path
        if best is None:
            return field
        return self.names[best] + field[len(best):]


def _why(exc: Exception, value: Any) -> str:
    text = str(exc)
    if "out of range" in text.lower() or isinstance(exc, ValueError):
        return f"value out of range: {_short(value)}"
    return f"invalid value {_short(value)}"


def _short(value: Any) -> str:
    s = repr(value)
    return s if len(s) <= 80 else s[:77] + "..."


def rpc_error(exc: grpc.aio.AioRpcError, builder: RequestBuilder | None = None) -> HttpError:
    """A gRPC status as the matching HTTP error, the offending field renamed to its HTTP name."""
    status, code = _STATUS.get(exc.code(), (500, None))
    message = exc.details() or exc.code().name.lower()
    if exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in message:
        # gRPC's message-size limit, not a full queue: retrying can never succeed.
        status, code = 413, "request_too_large"
    param = None
    field = None
    for key, value in exc.trailing_metadata() or ():
        if key == INVALID_FIELD_KEY:
            field = value if isinstance(value, str) else value.decode()
    if exc.code() is grpc.StatusCode.NOT_FOUND:
        param = "model"
    if field:
        param = builder.param_of(field) if builder is not None else field
        if message.startswith(field + ":") and param:
            message = param + message[len(field):]
    headers = {"Retry-After": "1"} if status in (429, 503) else {}
    return HttpError(status, message, param, code, headers)


# ---- sampling fields --------------------------------------------------------------------------


def apply_sampling(b: RequestBuilder, body: SamplingFields) -> None:
    """The fields OpenAI's chat and completions requests share."""
    b.set("sampling.temperature", body.temperature, "temperature")
    b.set("sampling.top_p", body.top_p, "top_p")
    b.set("sampling.top_k", body.top_k, "top_k")
    b.set("sampling.min_p", body.min_p, "min_p")
    b.set("sampling.repetition_penalty", body.repetition_penalty, "repetition_penalty")
    b.set("sampling.presence_penalty", body.presence_penalty, "presence_penalty")
    b.set("sampling.frequency_penalty", body.frequency_penalty, "frequency_penalty")
    b.set("sampling.seed", body.seed, "seed")
    b.set("n", body.n, "n")
    if body.stop is not None:
        b.extend("stopping.stop", [body.stop] if isinstance(body.stop, str) else body.stop, "stop")
    if body.stop_token_ids:
        b.extend("stopping.stop_token_ids", body.stop_token_ids, "stop_token_ids")
    b.set("stopping.ignore_eos", body.ignore_eos, "ignore_eos")
    b.set("stopping.include_stop_str_in_output", body.include_stop_str_in_output, "include_stop_str_in_output")
    b.set("skip_special_tokens", body.skip_special_tokens, "skip_special_tokens")
    b.set("cache_salt", body.cache_salt, "cache_salt")
    b.set("num_speculative_tokens", body.num_speculative_tokens, "num_speculative_tokens")
    if body.logit_bias:
        apply_logit_bias(b, body.logit_bias)
    guided, param = openai_guided(body)
    if guided is not None:
        if body.guided_close_before_max_tokens is not None:
            guided.close_before_max_tokens = body.guided_close_before_max_tokens
        b.req.guided.CopyFrom(guided)
        b.name("guided", param or "response_format")
        b.name(f"guided.{guided.WhichOneof('kind')}", param or "response_format")
        b.name("guided.close_before_max_tokens", "guided_close_before_max_tokens")


def apply_logit_bias(b: RequestBuilder, bias: dict[str, float]) -> None:
    """OpenAI's `logit_bias`: JSON keys are token ids written as strings ("50256": -100). The
    server checks the ranges (ids in the vocabulary, biases in [-100, 100], 300 entries)."""
    target = b.req.sampling.logit_bias
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise HttpError(400, f"logit_bias: keys must be token ids, got {_short(key)}", "logit_bias") from None
        if not -2**31 <= token < 2**31:
            raise HttpError(400, f"logit_bias: token id out of range: {_short(key)}", "logit_bias")
        target[token] = value
    b.name("sampling.logit_bias", "logit_bias")


def openai_guided(body: SamplingFields) -> tuple[guided_pb2.GuidedDecoding | None, str | None]:
    """The one guided-decoding spec of an OpenAI-style request, from `response_format`, vLLM's
    `structured_outputs` or the older `guided_*` fields; and the HTTP field it came from."""
    found: list[tuple[guided_pb2.GuidedDecoding, str]] = []
    rf = body.response_format
    if rf is not None and rf.type != "text":
        if rf.type == "json_object":
            found.append((guided_pb2.GuidedDecoding(json_object=guided_pb2.JsonObject()), "response_format"))
        else:
            js = rf.json_schema
            if js is None or js.schema_ is None:
                raise HttpError(400, "response_format.json_schema.schema: required for type json_schema",
                                "response_format.json_schema.schema")
            found.append((_schema(js.schema_, "response_format.json_schema.schema"),
                          "response_format.json_schema.schema"))
    so = body.structured_outputs
    if so is not None:
        members = [(k, v) for k, v in (("json", so.json_), ("regex", so.regex), ("choice", so.choice),
                                       ("grammar", so.grammar), ("json_object", so.json_object or None))
                   if v is not None]
        if len(members) > 1:
            raise HttpError(400, "structured_outputs: set exactly one of json, regex, choice, grammar, json_object",
                            "structured_outputs")
        if members:
            kind, value = members[0]
            found.append((_guided(kind, value, f"structured_outputs.{kind}"), f"structured_outputs.{kind}"))
    for kind, value in (("json", body.guided_json), ("regex", body.guided_regex), ("choice", body.guided_choice),
                        ("grammar", body.guided_grammar)):
        if value is not None:
            found.append((_guided(kind, value, f"guided_{kind}"), f"guided_{kind}"))
    if len(found) > 1:
        raise HttpError(400, f"{found[1][1]}: only one of response_format, structured_outputs and guided_* may "
                        f"constrain the output (also set: {found[0][1]})", found[1][1])
    return found[0] if found else (None, None)


def ollama_guided(fmt: str | dict[str, Any] | None) -> guided_pb2.GuidedDecoding | None:
    """Ollama's `format`: "json" (any JSON object) or a JSON schema."""
    if fmt is None or fmt == "":
        return None
    if isinstance(fmt, str):
        if fmt.strip().lower() == "json":
            return guided_pb2.GuidedDecoding(json_object=guided_pb2.JsonObject())
        raise HttpError(400, f'format: must be "json" or a JSON schema object, got {_short(fmt)}', "format")
    return _schema(fmt, "format")


def _guided(kind: str, value: Any, param: str) -> guided_pb2.GuidedDecoding:
    if kind == "json":
        return _schema(value, param)
    if kind == "json_object":
        return guided_pb2.GuidedDecoding(json_object=guided_pb2.JsonObject())
    if kind == "regex":
        return guided_pb2.GuidedDecoding(regex=value)
    if kind == "choice":
        return guided_pb2.GuidedDecoding(choice=guided_pb2.ChoiceList(choices=value))
    # Grammars: GBNF (llama.cpp, vLLM's xgrammar EBNF) uses `::=`; Lark uses `:`.
    syntax = guided_pb2.Grammar.GBNF if "::=" in value else guided_pb2.Grammar.LARK
    return guided_pb2.GuidedDecoding(grammar=guided_pb2.Grammar(definition=value, syntax=syntax))


def _schema(schema: dict[str, Any] | str, param: str) -> guided_pb2.GuidedDecoding:
    if isinstance(schema, str):
        text = schema
    else:
        try:
            text = json.dumps(schema, ensure_ascii=False, allow_nan=False)
        except ValueError as exc:
            raise HttpError(400, f"{param}: not valid JSON: {exc}", param) from None
    return guided_pb2.GuidedDecoding(json_schema=text)


# ---- responses --------------------------------------------------------------------------------

FINISH = {
    pb.FINISH_REASON_UNSPECIFIED: None,
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_EOS: "stop",
    pb.FINISH_REASON_CANCELLED: "abort",
    pb.FINISH_REASON_ERROR: "error",
    pb.FINISH_REASON_TOOL_CALLS: "tool_calls",
}
OLLAMA_DONE = {"length": "length", "stop": "stop", "abort": "abort", "error": "error", "tool_calls": "stop"}


def spec_json(choice: pb.Choice) -> dict[str, Any] | None:
    """Weft's extension on a finished choice: what speculative decoding did (None if it could not)."""
    if not choice.HasField("spec_decode"):
        return None
    s = choice.spec_decode
    return {"num_drafts": s.num_drafts, "num_draft_tokens": s.num_draft_tokens,
            "num_accepted_tokens": s.num_accepted_tokens, "accepted_per_position": list(s.accepted_per_position),
            "mean_acceptance_length": round(s.mean_acceptance_length, 4)}


def stop_reason(choice: pb.Choice) -> str | int | None:
    """vLLM's `stop_reason`: the stop string or stop token id that matched (None for EOS)."""
    which = choice.WhichOneof("stop_reason")
    return getattr(choice, which) if which else None


def usage_json(u: pb.Usage) -> dict[str, Any]:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens, "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens}}


def add_usage(total: pb.Usage, u: pb.Usage) -> None:
    """Several prompts of one completions request: prompt tokens add up too."""
    total.prompt_tokens += u.prompt_tokens
    total.completion_tokens += u.completion_tokens
    total.cached_prompt_tokens += u.cached_prompt_tokens
    total.total_tokens += u.total_tokens


def _bytes(s: str) -> list[int]:
    return list(s.encode("utf-8", "replace"))


def chat_logprobs(items: Sequence[pb.TokenLogprob], top: int) -> list[dict[str, Any]]:
    return [
        {"token": lp.token, "logprob": lp.logprob, "bytes": _bytes(lp.token),
         "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": _bytes(t.token)}
                          for t in lp.top_logprobs[:top]]}
        for lp in items
    ]


def completion_logprobs(items: Sequence[pb.TokenLogprob], offset: int) -> dict[str, Any]:
    """OpenAI's legacy completions shape; `offset` is the text offset of the first token."""
    tokens, lps, tops, offsets = [], [], [], []
    for lp in items:
        tokens.append(lp.token)
        lps.append(lp.logprob)
        top: dict[str, float] = {}
        for t in lp.top_logprobs:
            top.setdefault(t.token, t.logprob)
        tops.append(top)
        offsets.append(offset)
        offset += len(lp.token)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def ollama_logprobs(items: Sequence[pb.TokenLogprob]) -> list[dict[str, Any]]:
    return [{"token": lp.token, "logprob": lp.logprob,
             "top_logprobs": [{"token": t.token, "logprob": t.logprob} for t in lp.top_logprobs]}
            for lp in items]
