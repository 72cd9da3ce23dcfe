"""service.loader and service.gguf_convert: HF directories, the GGUF conversion cache, and every load error."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from service import gguf_convert, loader
from common.errors import ModelLoadError
from service.loader import LoadedModel, expected_parameters, load_model, resolve_hf_dir

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 128,
}


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_gguf_state(smollm2_transformers_gguf: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What transformers itself makes of the GGUF: the state dict our cache must reproduce."""
    return smollm2_transformers_gguf.state_dict()


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf: Path, smollm2_dir: Path) -> LoadedModel:
    return load_model(smollm2_gguf, progress=False)


@pytest.fixture
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private WEFT_CACHE_DIR, for tests that must not touch (or hit) the shared cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("WEFT_CACHE_DIR", str(cache))
    return cache


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _write_config(model_dir: Path, **changes: Any) -> None:
    config_file = model_dir / "config.json"
    config = json.loads(config_file.read_text())
    config.update(changes)
    config_file.write_text(json.dumps(config))


# ---------------------------------------------------------------------------------------------
# The GGUF default model and its cache
# ---------------------------------------------------------------------------------------------


def test_default_model_path_is_the_packaged_gguf(smollm2_gguf: Path, smollm2_dir: Path) -> None:
    assert smollm2_gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert smollm2_gguf.is_file()
    assert resolve_hf_dir(None, progress=False) == resolve_hf_dir(smollm2_gguf, progress=False) == smollm2_dir


def test_gguf_converts_to_hf_dir(smollm2_dir: Path, smollm2: LoadedModel, smollm2_gguf: Path) -> None:
    files = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json")
    for name in files:
        assert (smollm2_dir / name).is_file(), name
    assert smollm2_dir.parent == gguf_convert.cache_root()
    assert smollm2_dir.name.startswith("SmolLM2-135M-Instruct-")
    assert not list(smollm2_dir.parent.glob(f".{smollm2_dir.name}.tmp-*")), "temp dir left behind"

    assert smollm2.name == "SmolLM2-135M-Instruct"
    assert smollm2.source == smollm2_gguf and smollm2.hf_dir == smollm2_dir
    config = smollm2.config
    assert type(config).__name__ == "LlamaConfig"
    shape = (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads)
    assert shape == (30, 576, 9, 3)
    assert config.tie_word_embeddings and "lm_head.weight" not in smollm2.weights
    assert getattr(config, "quantization_config", None) is None
    assert set(smollm2.weights) == set(expected_parameters(config))
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in smollm2.weights.values())
    tokenizer_config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tokenizer_config["chat_template"]


def test_second_load_uses_the_cache(smollm2_gguf: Path, smollm2_dir: Path) -> None:
    weights_file = smollm2_dir / "model.safetensors"
    before = (gguf_convert.conversion_count, weights_file.stat().st_mtime_ns, smollm2_dir.stat().st_mtime_ns)
    started = time.perf_counter()
    model = load_model(smollm2_gguf, progress=False)
    elapsed = time.perf_counter() - started
    after = (gguf_convert.conversion_count, weights_file.stat().st_mtime_ns, smollm2_dir.stat().st_mtime_ns)
    assert after == before
    assert model.hf_dir == smollm2_dir
    assert elapsed < 10, f"cached load took {elapsed:.1f}s"


def test_weights_equal_transformers_gguf_load(
    smollm2: LoadedModel, reference_gguf_state: dict[str, torch.Tensor]
) -> None:
    # Exact equality, q/k projections included: those are the ones transformers un-permutes.
    reference = {k: v for k, v in reference_gguf_state.items() if k != "lm_head.weight"}
    assert set(smollm2.weights) == set(reference)
    for name, tensor in reference.items():
        assert torch.equal(smollm2.weights[name], tensor), name


def test_converted_dir_loads_in_transformers(
    smollm2_dir: Path, reference_gguf_state: dict[str, torch.Tensor]
) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32, local_files_only=True)
    state = model.state_dict()
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                 "model.layers.29.self_attn.k_proj.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(state[name], reference_gguf_state[name]), name


def test_bfloat16_load(smollm2_gguf: Path, smollm2: LoadedModel) -> None:
    model = load_model(smollm2_gguf, dtype=torch.bfloat16, progress=False)
    assert all(t.dtype == torch.bfloat16 for t in model.weights.values())
    name = "model.layers.3.mlp.down_proj.weight"
    assert torch.equal(model.weights[name], smollm2.weights[name].to(torch.bfloat16))


def test_dtype_by_name_and_non_float_refused(tiny_llama: Path) -> None:
    model = load_model(tiny_llama, dtype="bfloat16", progress=False)
    assert model.weights["model.norm.weight"].dtype == torch.bfloat16
    for bad in (torch.int8, "int8", "nonsense"):
        with pytest.raises(ModelLoadError, match="dtype"):
            load_model(tiny_llama, dtype=bad, progress=False)


def test_cache_dir_follows_env_and_file_identity(isolated_cache: Path, tmp_path: Path) -> None:
    fake = tmp_path / "Some-Model.Q8_0.gguf"
    fake.write_bytes(b"GGUF" + bytes(60))
    first = gguf_convert.gguf_cache_dir(fake)
    assert first.parent == isolated_cache / "models"
    assert first.name.startswith("Some-Model-")
    stat = fake.stat()
    os.utime(fake, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert gguf_convert.gguf_cache_dir(fake) != first, "a changed file must get a new cache dir"


# ---------------------------------------------------------------------------------------------
# HF directories: the tiny models
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_tiny_models_load(tiny_model_factory: Any, kind: str) -> None:
    from transformers import AutoModelForCausalLM

    path = tiny_model_factory(kind)
    model = load_model(path, progress=False)
    reference = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True).state_dict()
    reference.pop("lm_head.weight")  # tied by default
    assert model.name == path.name
    config_class = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "mistral": "MistralConfig"}[kind]
    assert type(model.config).__name__ == config_class
    assert set(model.weights) == set(reference) == set(expected_parameters(model.config))
    for name, tensor in reference.items():
        assert torch.equal(model.weights[name], tensor), name
    assert model.tokenizer.vocab_size == model.config.vocab_size
    assert model.config.rope_parameters["rope_theta"] == 50000.0
    if kind == "qwen2":
        assert "model.layers.1.self_attn.k_proj.bias" in model.weights


def test_tiny_llama_variants(tiny_model_factory: Any) -> None:
    untied = load_model(tiny_model_factory("llama", tie_word_embeddings=False), progress=False)
    assert "lm_head.weight" in untied.weights
    assert not torch.equal(untied.weights["lm_head.weight"], untied.weights["model.embed_tokens.weight"])

    scaled = load_model(tiny_model_factory("llama", rope_scaling=LLAMA3_ROPE), progress=False)
    assert scaled.config.rope_parameters["rope_type"] == "llama3"
    assert scaled.config.rope_parameters["factor"] == 8.0


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_tiny_models_are_not_degenerate(tiny_model_factory: Any, kind: str) -> None:
    """Greedy decoding must wander, or greedy-equality tests against transformers prove little."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_factory(kind)), local_files_only=True).eval()
    prompt = torch.tensor([[1, 4093, 314, 253, 1345, 30]])
    out = model.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=2)
    assert len(set(out[0, prompt.shape[1]:].tolist())) >= 10


def test_sharded_safetensors(tiny_model_factory: Any, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    source = tiny_model_factory("llama", tie_word_embeddings=False)
    sharded = _copy_model(source, tmp_path / "sharded")
    (sharded / "model.safetensors").unlink()
    reference = AutoModelForCausalLM.from_pretrained(str(source), local_files_only=True)
    reference.save_pretrained(sharded, max_shard_size="4MB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    whole, split = load_model(source, progress=False), load_model(sharded, progress=False)
    assert set(whole.weights) == set(split.weights)
    assert all(torch.equal(whole.weights[k], split.weights[k]) for k in whole.weights)


# ---------------------------------------------------------------------------------------------
# Errors: each a ModelLoadError naming the path and the problem
# ---------------------------------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ModelLoadError, match="no such file") as err:
        load_model(missing, progress=False)
    assert str(missing) in str(err.value)


def test_dir_without_config(tiny_llama: Path, tmp_path: Path) -> None:
    model_dir = _copy_model(tiny_llama, tmp_path / "m")
    (model_dir / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="no config.json") as err:
        load_model(model_dir, progress=False)
    assert str(model_dir) in str(err.value)


def test_dir_without_weights(tiny_llama: Path, tmp_path: Path) -> None:
    model_dir = _copy_model(tiny_llama, tmp_path / "m")
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no weights"):
        load_model(model_dir, progress=False)


def test_dir_without_tokenizer(tiny_llama: Path, tmp_path: Path) -> None:
    model_dir = _copy_model(tiny_llama, tmp_path / "m")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model_dir / name).unlink()
    with pytest.raises(ModelLoadError, match="no tokenizer files"):
        load_model(model_dir, progress=False)


def test_unknown_architecture(tiny_llama: Path, tmp_path: Path) -> None:
    model_dir = _copy_model(tiny_llama, tmp_path / "m")
    _write_config(model_dir, architectures=["FooForCausalLM"], model_type="foo")
    with pytest.raises(ModelLoadError, match="FooForCausalLM") as err:
        load_model(model_dir, progress=False)
    for supported in loader.SUPPORTED_ARCHITECTURES:
        assert supported in str(err.value)


def test_truncated_safetensors(tiny_llama: Path, tmp_path: Path) -> None:
    model_dir = _copy_model(tiny_llama, tmp_path / "m")
    weights_file = model_dir / "model.safetensors"
    data = weights_file.read_bytes()
    weights_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="corrupt or truncated safetensors") as err:
        load_model(model_dir, progress=False)
    assert str(weights_file) in str(err.value)


def test_missing_parameter(tiny_llama: Path, tmp_path: Path) -> None:
    model_dir = _copy_model(tiny_llama, tmp_path / "m")
    weights_file = model_dir / "model.safetensors"
    tensors = load_file(str(weights_file))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(weights_file), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"missing .*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(model_dir, progress=False)


def test_untied_config_without_lm_head(tiny_llama: Path, tmp_path: Path) -> None:
    model_dir = _copy_model(tiny_llama, tmp_path / "m")
    _write_config(model_dir, tie_word_embeddings=False)
    with pytest.raises(ModelLoadError, match="lm_head.weight"):
        load_model(model_dir, progress=False)


def test_wrong_shape(tiny_llama: Path, tmp_path: Path) -> None:
    model_dir = _copy_model(tiny_llama, tmp_path / "m")
    _write_config(model_dir, intermediate_size=96)
    with pytest.raises(ModelLoadError, match="shape"):
        load_model(model_dir, progress=False)


@pytest.mark.parametrize("keep", [4096, 0.5], ids=["header", "half"])
def test_truncated_gguf(smollm2_gguf: Path, tmp_path: Path, isolated_cache: Path, keep: float) -> None:
    data = smollm2_gguf.read_bytes()
    cut = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    cut.write_bytes(data[: int(keep if keep >= 1 else len(data) * keep)])
    count = gguf_convert.conversion_count
    with pytest.raises(ModelLoadError, match="corrupt or truncated GGUF") as err:
        load_model(cut, progress=False)
    assert str(cut) in str(err.value)
    assert gguf_convert.conversion_count == count
    models = isolated_cache / "models"
    assert not models.exists() or not any(models.iterdir()), "a failed conversion left files behind"


def test_not_a_model_file(tmp_path: Path) -> None:
    junk = tmp_path / "weights.txt"
    junk.write_text("hello")
    with pytest.raises(ModelLoadError, match="not a model directory"):
        load_model(junk, progress=False)
