"""Embeddings through the REST shim of a real `weft serve` subprocess (SmolLM2 with the packaged
all-MiniLM-L6-v2 beside it as `all-minilm`, the default), driven by the official `openai` and
`ollama` clients and by LangChain: values equal sentence-transformers', base64 and dimensions,
the older Ollama endpoint, listings, bad input answered 400 naming the field in each protocol's
shape, generation requests to the embedding model refused, counters on /metrics, and the server
serving on after every refusal."""
from __future__ import annotations

import base64

import httpx
import numpy as np
import ollama
import openai
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import embedding_texts

COSINE = 0.99999
TEXTS = embedding_texts(6, seed=20)


@pytest.fixture(scope="module")
def oa(smollm2_served: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{smollm2_served}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def ol(smollm2_served: str) -> ollama.Client:
    return ollama.Client(host=smollm2_served, timeout=300)


@pytest.fixture(scope="module")
def ref(minilm_st) -> torch.Tensor:
    return minilm_st.encode(TEXTS, convert_to_tensor=True)


@pytest.fixture(scope="module")
def raw_st(minilm_st):
    from sentence_transformers import SentenceTransformer
    return SentenceTransformer(modules=[minilm_st[0], minilm_st[1]], device="cpu")   # without Normalize


def _close(ours, ref) -> None:
    ours = torch.tensor(np.array(ours, dtype=np.float32))
    ref = torch.as_tensor(ref).reshape(ours.shape).float()
    assert F.cosine_similarity(ours.double(), ref.double(), dim=-1).min().item() >= COSINE
    torch.testing.assert_close(ours.norm(dim=-1), ref.norm(dim=-1), rtol=1e-4, atol=1e-5)


def test_listed_beside_the_generation_model(oa, smollm2_served: str) -> None:
    ids = [m.id for m in oa.models.list().data]
    assert len(ids) == 2 and ids[1] == "all-minilm"
    tags = httpx.get(f"{smollm2_served}/api/tags").json()["models"]
    assert [t["name"] for t in tags] == ids
    show = httpx.post(f"{smollm2_served}/api/show", json={"model": "all-minilm:latest"}).json()
    assert show["capabilities"] == ["embedding"] and show["details"]["family"] == "bert"


def test_openai_float_base64_dimensions_and_token_ids(oa, ref, minilm_st) -> None:
    resp = oa.embeddings.create(model="all-minilm", input=TEXTS, encoding_format="float")
    assert resp.model == "all-minilm" and [d.index for d in resp.data] == list(range(len(TEXTS)))
    _close([d.embedding for d in resp.data], ref)
    ntok = sum(len(i) for i in minilm_st.tokenizer(TEXTS)["input_ids"])
    assert resp.usage.prompt_tokens == resp.usage.total_tokens == ntok
    # The client's default: it asks for base64 and decodes it itself.
    _close([d.embedding for d in oa.embeddings.create(model="all-minilm", input=TEXTS).data], ref)
    b64 = oa.embeddings.create(model="all-minilm", input=TEXTS[0], encoding_format="base64").data[0].embedding
    _close(np.frombuffer(base64.b64decode(b64), dtype="<f4"), ref[0])
    short = oa.embeddings.create(model="all-minilm", input=TEXTS, dimensions=48, encoding_format="float")
    _close([d.embedding for d in short.data], F.normalize(ref[:, :48], dim=1))
    ids = minilm_st.tokenizer(TEXTS[:2])["input_ids"]
    _close([d.embedding for d in oa.embeddings.create(model="all-minilm", input=ids, encoding_format="float").data],
           ref[:2])
    one = oa.embeddings.create(model="all-minilm", input=ids[0], encoding_format="float").data
    assert len(one) == 1
    _close(one[0].embedding, ref[0])


def test_ollama_embed_and_embeddings(ol, ref, raw_st) -> None:
    resp = ol.embed(model="all-minilm", input=TEXTS)
    assert resp.model == "all-minilm" and resp.prompt_eval_count > 0 and resp.total_duration > 0
    _close(resp.embeddings, ref)
    _close(ol.embed(model="all-minilm:latest", input=TEXTS[1]).embeddings, ref[1])
    long_text = "tokens " * 600                  # Ollama truncates by default
    _close(ol.embed(model="all-minilm", input=long_text).embeddings, raw_st.encode([long_text], normalize_embeddings=True))
    # The older endpoint: one vector, as the model pools it (not normalised, as Ollama's).
    _close(ol.embeddings(model="all-minilm", prompt=TEXTS[2]).embedding, raw_st.encode([TEXTS[2]]))


def test_langchain_embeddings(smollm2_served: str, ref) -> None:
    from langchain_ollama import OllamaEmbeddings
    from langchain_openai import OpenAIEmbeddings

    lc = OpenAIEmbeddings(model="all-minilm", base_url=f"{smollm2_served}/v1", api_key="unused",
                          check_embedding_ctx_length=False)
    _close(lc.embed_documents(TEXTS), ref)
    _close(lc.embed_query(TEXTS[0]), ref[0])
    lo = OllamaEmbeddings(model="all-minilm", base_url=smollm2_served)
    _close(lo.embed_documents(TEXTS), ref)
    _close(lo.embed_query(TEXTS[3]), ref[3])


def test_the_generation_model_embeds_too(oa) -> None:
    model = oa.models.list().data[0].id
    resp = oa.embeddings.create(model=model, input=["one", "two words"], encoding_format="float")
    vectors = np.asarray([d.embedding for d in resp.data])
    assert vectors.shape == (2, 576) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    return r.json()


def test_bad_input_is_400_naming_the_field(smollm2_served: str, oa, ref) -> None:
    url = smollm2_served
    post = lambda path, body: httpx.post(f"{url}{path}", json=body, timeout=60)  # noqa: E731
    cases = [({"model": "all-minilm", "input": []}, "input"),
             ({"model": "all-minilm", "input": ["ok", ""]}, "input[1]"),
             ({"model": "all-minilm", "input": ""}, "input"),
             ({"model": "all-minilm", "input": ["ok", "word " * 300]}, "input[1]"),   # OpenAI does not truncate
             ({"model": "all-minilm", "input": [[1, 2], [30522]]}, "input[1]"),
             ({"model": "all-minilm", "input": "x", "dimensions": 0}, "dimensions"),
             ({"model": "all-minilm", "input": "x", "encoding_format": "int8"}, "encoding_format"),
             ({"model": "all-minilm"}, "input")]
    for body, param in cases:
        err = _error(post("/v1/embeddings", body), 400)["error"]
        assert err["param"] == param and err["message"].startswith(f"{param}: "), (body, err)
        assert err["type"] == "invalid_request_error"
    assert _error(post("/v1/embeddings", {"model": "nope", "input": "x"}), 404)["error"]["param"] == "model"
    err = _error(post("/api/embed", {"model": "all-minilm", "input": "word " * 300, "truncate": False}), 400)
    assert err["error"].startswith("input: ") and "truncate" in err["error"]
    assert "not served" in _error(post("/api/embed", {"model": "nope", "input": "x"}), 404)["error"]
    # Generation requests to the embedding model, in each protocol.
    with pytest.raises(openai.BadRequestError) as e:
        oa.chat.completions.create(model="all-minilm", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert "embedding model" in e.value.message and e.value.body["param"] == "model"
    with pytest.raises(ollama.ResponseError) as oe:
        ollama.Client(host=url).chat(model="all-minilm", messages=[{"role": "user", "content": "hi"}])
    assert oe.value.status_code == 400 and "embedding model" in oe.value.error
    assert _error(post("/api/generate", {"model": "all-minilm:latest", "prompt": "hi"}), 400)
    # ... and the server serves on.
    _close(oa.embeddings.create(model="all-minilm", input=TEXTS[:1], encoding_format="float").data[0].embedding, ref[0])


def test_embedding_metrics_are_counted_apart(smollm2_served: str, oa) -> None:
    def scrape() -> dict[str, float]:
        out = {}
        for line in httpx.get(f"{smollm2_served}/metrics").text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    before = scrape()
    oa.embeddings.create(model="all-minilm", input=["count me", "and me"], encoding_format="float")
    httpx.post(f"{smollm2_served}/v1/embeddings", json={"model": "all-minilm", "input": []})
    after = scrape()
    delta = lambda k: after.get(k, 0.0) - before.get(k, 0.0)  # noqa: E731
    assert delta('weft_embedding_requests_total{outcome="ok"}') == 1
    assert delta('weft_embedding_requests_total{outcome="invalid_argument"}') == 1
    assert delta("weft_embedding_inputs_total") == 2 and delta("weft_embedding_tokens_total") > 0
    assert delta("weft_prompt_tokens_total") == 0
    assert delta('weft_http_requests_total{route="/v1/embeddings",status="200"}') == 1


def test_llamaindex_embeddings(smollm2_served: str, ref) -> None:
    from llama_index.embeddings.ollama import OllamaEmbedding
    from llama_index.embeddings.openai import OpenAIEmbedding

    li = OpenAIEmbedding(model_name="all-minilm", api_base=f"{smollm2_served}/v1", api_key="unused", max_retries=0)
    _close(li.get_text_embedding_batch(TEXTS), ref)
    _close(li.get_query_embedding(TEXTS[0]), ref[0])
    lo = OllamaEmbedding(model_name="all-minilm", base_url=smollm2_served)
    _close(lo.get_text_embedding_batch(TEXTS), ref)
    _close(lo.get_query_embedding(TEXTS[4]), ref[4])
