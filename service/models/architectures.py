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
    "Gemma3ForConditionalGeneration": "gemma3",   # its language model; the vision tower is not loaded
    "Phi3ForCausalLM": "phi3",
    "GraniteForCausalLM": "granite",
    "Olmo2ForCausalLM": "olmo2",
    "CohereForCausalLM": "cohere",
    "Starcoder2ForCausalLM": "starcoder2",
    "DeepseekV2ForCausalLM": "deepseek_v2",
    "DeepseekV3ForCausalLM": "deepseek_v3",
}
# Multimodal architectures Weft runs as their text decoder: the loader hands out their text_config
# and does not read the tensors under these prefixes (the vision tower, the projector).
TEXT_OF_MULTIMODAL: dict[str, tuple[str, ...]] = {
    "Gemma3ForConditionalGeneration": ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                                       "model.multi_modal_projector."),
}
