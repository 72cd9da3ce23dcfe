"""Embedding routes of both protocols, each one weft.v1 Embed call: OpenAI's /v1/embeddings
(float or base64 vectors), Ollama's /api/embed and its older /api/embeddings. Errors name the HTTP
field (`input[2]`, `dimensions`) in each protocol's own shape."""
from __future__ import annotations

import base64
import time
from typing import Any

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from clients.weft.v1 import inference_pb2 as pb
from service.shim.base import ShimBase
from service.shim.models import EmbeddingRequest, OllamaEmbeddingsRequest, OllamaEmbedRequest
from service.shim.translate import HttpError, RequestBuilder


def _embed_request(model: str | None, inputs: list[str] | list[list[int]], param: str, single: bool,
                   ) -> tuple[pb.EmbedRequest, RequestBuilder]:
    """The EmbedRequest for HTTP inputs, with a builder that renames `inputs[i]...` to `param[i]`
    (or to `param` alone when the client sent a single input)."""
    req = pb.EmbedRequest(model=model or "")
    names = RequestBuilder()
    names.name("inputs", param)
    for i, item in enumerate(inputs):
        if isinstance(item, str):
            req.inputs.append(pb.EmbedInput(text=item))
        else:
            try:
                req.inputs.append(pb.EmbedInput(token_ids=pb.TokenIds(ids=item)))
            except ValueError:
                raise HttpError(400, f"{param}: every token id must be a 32-bit integer", param) from None
        at = param if single else f"{param}[{i}]"
        for sub in ("", ".text", ".token_ids"):
            names.name(f"inputs[{i}]{sub}", at)
    return req, names


def _openai_inputs(value: str | list[str] | list[int] | list[list[int]]) -> tuple[list[Any], bool]:
    """OpenAI's `input`: a string, strings, one token list, or token lists -> (inputs, single)."""
    if isinstance(value, str):
        return [value], True
    if value and all(isinstance(t, int) for t in value):
        return [list(value)], True
    return list(value), False


class EmbeddingRoutes(ShimBase):
    async def _embed(self, request: Request, req: pb.EmbedRequest, names: RequestBuilder,
                     metadata: tuple[tuple[str, str], ...]) -> pb.EmbedResponse:
        return await self._unary(request, self.backend.stub.Embed(req, metadata=metadata), names)

    async def openai_embeddings(self, body: EmbeddingRequest, request: Request) -> Response:
        ctx = self._ctx(request)
        inputs, single = _openai_inputs(body.input)
        req, names = _embed_request(body.model, inputs, "input", single)
        if body.dimensions is not None:
            req.dimensions = _int32(body.dimensions, "dimensions")
            names.name("dimensions", "dimensions")
        resp = await self._embed(request, req, names, ctx.metadata)
        b64 = body.encoding_format == "base64"
        data = [{"object": "embedding", "index": e.index,
                 "embedding": base64.b64encode(np.asarray(e.values, dtype="<f4").tobytes()).decode("ascii")
                 if b64 else list(e.values)} for e in resp.embeddings]
        return JSONResponse({"object": "list", "data": data, "model": resp.model,
                             "usage": {"prompt_tokens": resp.usage.prompt_tokens,
                                       "total_tokens": resp.usage.total_tokens}},
                            headers={"x-request-id": ctx.rid})

    async def ollama_embed(self, body: OllamaEmbedRequest, request: Request) -> Response:
        ctx = self._ctx(request)
        model = (body.model or "").removesuffix(":latest")
        inputs = [body.input] if isinstance(body.input, str) else list(body.input or [])
        if not inputs:   # Ollama: no input only loads the model
            return JSONResponse({"model": body.model or model, "embeddings": [], "total_duration": 0,
                                 "load_duration": 0, "prompt_eval_count": 0})
        req, names = _embed_request(model, inputs, "input", isinstance(body.input, str))
        req.truncate = body.truncate is not False
        if body.dimensions is not None:
            req.dimensions = _int32(body.dimensions, "dimensions")
            names.name("dimensions", "dimensions")
        resp = await self._embed(request, req, names, ctx.metadata)
        return JSONResponse({"model": body.model or resp.model, "embeddings": [list(e.values) for e in resp.embeddings],
                             "total_duration": int((time.perf_counter() - ctx.t0) * 1e9), "load_duration": 0,
                             "prompt_eval_count": resp.usage.prompt_tokens}, headers={"x-request-id": ctx.rid})

    async def ollama_embeddings(self, body: OllamaEmbeddingsRequest, request: Request) -> Response:
        """The older endpoint: vectors as the model pools them, not normalised (as Ollama's)."""
        ctx = self._ctx(request)
        if not body.prompt:
            return JSONResponse({"embedding": []})
        req, names = _embed_request((body.model or "").removesuffix(":latest"), [body.prompt], "prompt", True)
        req.truncate = True
        req.normalize = False
        resp = await self._embed(request, req, names, ctx.metadata)
        return JSONResponse({"embedding": list(resp.embeddings[0].values)}, headers={"x-request-id": ctx.rid})


def _int32(value: int, param: str) -> int:
    if not -2**31 <= value < 2**31:
        raise HttpError(400, f"{param}: value out of range: {value}", param)
    return value
