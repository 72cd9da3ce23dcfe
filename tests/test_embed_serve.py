"""`weft serve` and embedding models as real subprocesses: a sentence-transformers directory given
as --model is served alone (embeddings only, generation refused), and --embedding-model none
leaves the default all-minilm out."""
from __future__ import annotations

from pathlib import Path

import httpx
import openai
import torch
import torch.nn.functional as F

from tests.test_http_serve import Proc, free_port


def _serve(*args: str) -> tuple[Proc, str]:
    port = free_port()
    proc = Proc(["serve", *args, "--host", "127.0.0.1", "--port", "0", "--http-port", str(port)], ready=r"serving ")
    return proc, f"http://127.0.0.1:{port}"


def test_sentence_transformers_dir_as_the_model(minilm_dir: Path, minilm_st) -> None:
    proc, url = _serve("--model", str(minilm_dir))
    try:
        oa = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        assert [m.id for m in oa.models.list().data] == [minilm_dir.name]
        resp = oa.embeddings.create(model="", input=["served alone"], encoding_format="float")
        ours = torch.tensor([resp.data[0].embedding])
        ref = minilm_st.encode(["served alone"], convert_to_tensor=True)
        assert F.cosine_similarity(ours, ref).item() >= 0.99999
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "model", r.text
        r = httpx.post(f"{url}/api/generate", json={"prompt": "hi", "stream": False})
        assert r.status_code == 400 and "embedding model" in r.json()["error"], r.text
        assert httpx.get(f"{url}/health").status_code == 200
    finally:
        proc.stop()


def test_embedding_model_flag(minilm_dir: Path, tiny_llama: Path) -> None:
    """--embedding-model: unset means the packaged model, `none` none, a path that path; a server
    whose --model is itself an embedding model serves no second one."""
    from service.server_cli import resolve_embedding_model

    assert resolve_embedding_model(None, str(tiny_llama)) == str(minilm_dir)
    assert resolve_embedding_model(None, None) == str(minilm_dir)
    assert resolve_embedding_model("none", str(tiny_llama)) is None
    assert resolve_embedding_model("/some/dir", None) == "/some/dir"
    assert resolve_embedding_model(None, str(minilm_dir)) is None
