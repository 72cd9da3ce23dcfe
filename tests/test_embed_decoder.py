"""A generation model as an embedder: Embed on the tiny Llama runs prefill-only requests beside
generation, and its vectors equal the pooled last hidden states (after the final norm) of
`transformers`' own forward: last-token and mean pooling, chunked prompts, batch invariance,
token-id inputs, and a KV pool that is whole again afterwards."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clients.client import AsyncWeftClient, WeftClient
from service.config import EngineConfig
from service.server import BackgroundServer, ServerOptions

COSINE = 0.99999
TEXTS = ["Hello there.", "A somewhat longer sentence about embeddings and decoders, to vary the lengths.",
         "x", "Numbers: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 " * 3]


@pytest.fixture(scope="module")
def reference(tiny_llama: Path):
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(str(tiny_llama), dtype=torch.float32, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_llama), local_files_only=True)

    def embed(ids: list[int], pooling: str) -> torch.Tensor:
        with torch.no_grad():
            h = model(torch.tensor([ids])).last_hidden_state[0]
        return F.normalize((h[-1] if pooling == "last" else h.mean(0)).unsqueeze(0), dim=1)[0]

    return embed, tok


def _server(model: Path, pooling: str) -> BackgroundServer:
    # A small token budget: the longest text is computed in several chunks.
    config = EngineConfig(model=str(model), kv_cache_gb=0.02, max_num_batched_tokens=48, progress=False)
    return BackgroundServer(ServerOptions(host="127.0.0.1", port=0, pooling=pooling), config=config).start()


@pytest.fixture(scope="module", params=["last", "mean"])
def served(request, tiny_llama: Path):
    srv = _server(tiny_llama, request.param)
    yield srv, request.param
    srv.stop()


def _pool_whole(srv: BackgroundServer) -> bool:
    return srv.call(srv.engine.call(lambda core: core.pool_is_whole()), timeout=30)


def test_vectors_equal_pooled_transformers_hidden_states(served, reference) -> None:
    srv, pooling = served
    embed, tok = reference
    with WeftClient(srv.target, timeout=120) as c:
        info = c.model_info()
        assert info.features.embeddings and not info.features.embedding_only and info.embedding_dimension == 64
        resp = c.embed(TEXTS)
        ids = [tok.encode(t) for t in TEXTS]
        assert max(len(i) for i in ids) > 48   # chunked
        assert [e.prompt_tokens for e in resp.embeddings] == [len(i) for i in ids]
        ours = torch.tensor([list(e.values) for e in resp.embeddings])
        ref = torch.stack([embed(i, pooling) for i in ids])
        assert F.cosine_similarity(ours.double(), ref.double(), dim=1).min() >= COSINE
        torch.testing.assert_close(ours.norm(dim=1), torch.ones(len(TEXTS)), rtol=0, atol=1e-5)
        # Batch invariance, and token ids in = text in.
        for i, text in enumerate(TEXTS):
            alone = torch.tensor(list(c.embed(text).embeddings[0].values))
            torch.testing.assert_close(alone, ours[i], rtol=0, atol=2e-5)
        by_ids = torch.tensor(list(c.embed(ids[1]).embeddings[0].values))
        torch.testing.assert_close(by_ids, ours[1], rtol=0, atol=2e-5)
    assert _pool_whole(srv)


async def test_embeddings_run_beside_generation(served, reference) -> None:
    srv, pooling = served
    embed, tok = reference
    async with AsyncWeftClient(srv.target, timeout=120) as c:
        gen = [c.generate(f"story {i}", max_tokens=20, temperature=0, ignore_eos=True) for i in range(3)]
        embs = [c.embed(TEXTS[i % len(TEXTS)]) for i in range(6)]
        results = await asyncio.gather(*gen, *embs)
    assert all(r.usage.completion_tokens == 20 for r in results[:3])
    for i, r in enumerate(results[3:]):
        ref = embed(tok.encode(TEXTS[i % len(TEXTS)]), pooling)
        assert F.cosine_similarity(torch.tensor(list(r.embeddings[0].values)).double(), ref.double(), dim=0) >= COSINE
    assert _pool_whole(srv)


def test_truncate_and_limits(served) -> None:
    import grpc

    srv, _ = served
    with WeftClient(srv.target, timeout=120) as c:
        limit = c.model_info().max_model_len
        long_ids = [5] * (limit + 10)
        with pytest.raises(grpc.RpcError) as e:
            c.embed(long_ids)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith("inputs[0]: ")
        resp = c.embed(long_ids, truncate=True, dimensions=16)
        assert resp.embeddings[0].prompt_tokens == limit and len(resp.embeddings[0].values) == 16
    assert _pool_whole(srv)
