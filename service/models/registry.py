"""Architecture name -> the class of our forward pass for it."""
from __future__ import annotations

from torch import nn

from service.models.cohere import CohereForCausalLM
from service.models.deepseek import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM
from service.models.gemma import Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3ForConditionalGeneration, GemmaForCausalLM
from service.models.granite import GraniteForCausalLM
from service.models.llama import LlamaForCausalLM
from service.models.mixtral import MixtralForCausalLM
from service.models.olmo2 import Olmo2ForCausalLM
from service.models.phi3 import Phi3ForCausalLM
from service.models.qwen3 import Qwen3ForCausalLM
from service.models.qwen_moe import Qwen2MoeForCausalLM, Qwen3MoeForCausalLM
from service.models.starcoder2 import Starcoder2ForCausalLM

MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "GemmaForCausalLM": GemmaForCausalLM,
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "Gemma3ForConditionalGeneration": Gemma3ForConditionalGeneration,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "GraniteForCausalLM": GraniteForCausalLM,
    "Olmo2ForCausalLM": Olmo2ForCausalLM,
    "CohereForCausalLM": CohereForCausalLM,
    "Starcoder2ForCausalLM": Starcoder2ForCausalLM,
    "DeepseekV2ForCausalLM": DeepseekV2ForCausalLM,
    "DeepseekV3ForCausalLM": DeepseekV3ForCausalLM,
}
