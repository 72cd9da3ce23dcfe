"""Which checkpoint architectures Weft runs, by name only (no model code): the loader checks a
directory against this before reading anything heavy; service/models/registry.py maps each
name to its class."""
from __future__ import annotations

# config.json `architectures` entry -> its `model_type`.
LLAMA_FAMILY: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
ARCHITECTURES: dict[str, str] = {
    **LLAMA_FAMILY,
    "Qwen3ForCausalLM": "qwen3",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3_text",
    "Phi3ForCausalLM": "phi3",
    "GraniteForCausalLM": "granite",
    "Olmo2ForCausalLM": "olmo2",
    "CohereForCausalLM": "cohere",
    "Starcoder2ForCausalLM": "starcoder2",
    "DeepseekV2ForCausalLM": "deepseek_v2",
    "DeepseekV3ForCausalLM": "deepseek_v3",
}
