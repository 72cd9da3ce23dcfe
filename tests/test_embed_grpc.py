"""The Embed RPC on a real gRPC server over loopback: an embedding model (all-MiniLM-L6-v2) served
beside a generation model (tiny Llama) and alone, the Python clients and `weft client embed`,
every bad input refused naming its field, generation requests to the embedding model refused,
and the server serving on after each. sentence-transformers is the oracle."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import torch
import torch.nn.functional as F

from clients.client import AsyncWeftClient, WeftClient, build_embed_request
from service.config import EngineConfig
from service.server import INVALID_FIELD_KEY, MAX_EMBED_INPUTS, BackgroundServer, ServerOptions
from tests.conftest import embedding_texts

COSINE = 0.99999


@pytest.fixture(scope="module")
def beside(tiny_llama: Path, minilm_dir: Path):
    """tiny Llama for generation, all-MiniLM-L6-v2 beside it as `all-minilm`."""
    options = ServerOptions(host="127.0.0.1", port=0, embedding_model=str(minilm_dir))
    config = EngineConfig(model=str(tiny_llama), kv_cache_gb=0.02, progress=False)
    with BackgroundServer(options, config=config) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(beside) -> WeftClient:
    with WeftClient(beside.target, timeout=120) as c:
        yield c


def _vectors(resp) -> torch.Tensor:
    return torch.tensor([list(e.values) for e in resp.embeddings])


def _close(ours: torch.Tensor, ref) -> None:
    ref = torch.as_tensor(ref).reshape(ours.shape)
    assert F.cosine_similarity(ours.double(), ref.double(), dim=1).min().item() >= COSINE
    torch.testing.assert_close(ours.norm(dim=1), ref.float().norm(dim=1), rtol=1e-4, atol=1e-5)


def _invalid(fn, field: str) -> str:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert dict(e.value.trailing_metadata() or ()).get(INVALID_FIELD_KEY) == field, e.value.details()
    assert e.value.details().startswith(f"{field}: "), e.value.details()
    return e.value.details()


def test_models_lists_both_and_says_which_embeds(client: WeftClient, tiny_llama: Path) -> None:
    gen, emb = client.models()
    assert gen.name == tiny_llama.name and not gen.features.embedding_only
    assert emb.name == "all-minilm" and emb.features.embeddings and emb.features.embedding_only
    assert (emb.embedding_dimension, emb.max_model_len, emb.max_embed_inputs) == (384, 256, MAX_EMBED_INPUTS)
    assert not emb.features.chat_template and not emb.features.guided_decoding
    assert client.model_info("all-minilm:latest") == emb


def test_embed_texts_and_token_ids_match_sentence_transformers(client: WeftClient, minilm_st) -> None:
    texts = embedding_texts(12, seed=10)
    resp = client.embed(texts, model="all-minilm")
    assert resp.model == "all-minilm" and [e.index for e in resp.embeddings] == list(range(len(texts)))
    _close(_vectors(resp), minilm_st.encode(texts, convert_to_tensor=True))
    ids = minilm_st.tokenizer(texts[:3])["input_ids"]
    assert [e.prompt_tokens for e in resp.embeddings[:3]] == [len(i) for i in ids]
    assert resp.usage.prompt_tokens == resp.usage.total_tokens == sum(e.prompt_tokens for e in resp.embeddings)
    by_ids = client.embed(ids, model="all-minilm:latest")
    _close(_vectors(by_ids), _vectors(resp)[:3])


def test_dimensions_normalize_and_truncate(client: WeftClient, minilm_st) -> None:
    texts = embedding_texts(3, seed=11)
    short = client.embed(texts, model="all-minilm", dimensions=32)
    _close(_vectors(short), F.normalize(minilm_st.encode(texts, convert_to_tensor=True, truncate_dim=32), dim=1))
    from sentence_transformers import SentenceTransformer
    raw = SentenceTransformer(modules=[minilm_st[0], minilm_st[1]], device="cpu")
    _close(_vectors(client.embed(texts, model="all-minilm", normalize=False)), raw.encode(texts, convert_to_tensor=True))
    long_text = "tokens " * 600
    resp = client.embed([long_text], model="all-minilm", truncate=True)
    assert resp.embeddings[0].prompt_tokens == 256
    _close(_vectors(resp), minilm_st.encode([long_text], convert_to_tensor=True))   # it truncates at 256 too


def test_bad_inputs_name_the_field(client: WeftClient) -> None:
    emb = lambda req: client.stub.Embed(req, timeout=60)  # noqa: E731
    _invalid(lambda: emb(build_embed_request([], model="all-minilm")), "inputs")
    _invalid(lambda: emb(build_embed_request(["ok", ""], model="all-minilm")), "inputs[1].text")
    req = build_embed_request(["ok"], model="all-minilm")
    req.inputs.add()
    _invalid(lambda: emb(req), "inputs[1]")
    _invalid(lambda: emb(build_embed_request([[1, 2], [5, 30522]], model="all-minilm")), "inputs[1].token_ids")
    msg = _invalid(lambda: emb(build_embed_request(["short", "word " * 300], model="all-minilm")), "inputs[1]")
    assert "at most 256" in msg and "truncate" in msg
    for d in (0, 385):
        _invalid(lambda: emb(build_embed_request(["x"], model="all-minilm", dimensions=d)), "dimensions")
    _invalid(lambda: emb(build_embed_request(["x"] * (MAX_EMBED_INPUTS + 1), model="all-minilm")), "inputs")
    with pytest.raises(grpc.RpcError) as e:
        client.embed("x", model="no-such-model")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "all-minilm" in e.value.details()
    assert len(client.embed("still serving", model="all-minilm").embeddings) == 1


def test_generation_requests_to_the_embedding_model_are_refused(client: WeftClient) -> None:
    for model in ("all-minilm", "all-minilm:latest"):
        msg = _invalid(lambda: client.generate("hi", model=model, max_tokens=2), "model")
        assert "embedding model" in msg and "Embed" in msg
        _invalid(lambda: list(client.generate_stream([{"role": "user", "content": "hi"}], model=model)), "model")
        _invalid(lambda: client.tokenize("hi", model=model), "model")
    assert client.generate("hi", max_tokens=2, temperature=0).usage.completion_tokens == 2


async def test_concurrent_embeds_and_generation_all_finish(beside, minilm_st) -> None:
    texts = embedding_texts(16, seed=12)
    async with AsyncWeftClient(beside.target, timeout=120) as c:
        gen = c.generate("hello", max_tokens=24, temperature=0, ignore_eos=True)
        calls = [c.embed(texts[i:i + 4], model="all-minilm") for i in range(0, 16, 4)]
        gen_resp, *embs = await asyncio.gather(gen, *calls)
    assert gen_resp.usage.completion_tokens == 24
    _close(torch.cat([_vectors(r) for r in embs]), minilm_st.encode(texts, convert_to_tensor=True))


def test_weft_client_embed_cli(beside, minilm_st) -> None:
    texts = ["first text", "the second one"]
    out = subprocess.run([sys.executable, "-m", "service.cli", "client", "--target", beside.target, "embed", *texts,
                          "--model", "all-minilm"], capture_output=True, text=True, timeout=120, check=True).stdout
    _close(torch.tensor([json.loads(line) for line in out.splitlines()]), minilm_st.encode(texts, convert_to_tensor=True))


def test_an_embedding_model_served_alone(minilm_dir: Path, minilm_st) -> None:
    config = EngineConfig(model=str(minilm_dir), progress=False)
    with BackgroundServer(ServerOptions(host="127.0.0.1", port=0), config=config) as srv, \
            WeftClient(srv.target, timeout=60) as c:
        [info] = c.models()
        assert info.name == minilm_dir.name and info.features.embedding_only and c.model_info() == info
        _close(_vectors(c.embed(["served alone"])), minilm_st.encode(["served alone"], convert_to_tensor=True))
        msg = _invalid(lambda: c.generate("hi", max_tokens=2), "model")
        assert "embedding model" in msg
        assert c.health() == "SERVING"
