"""transformers as the oracle: greedy decoding with its own model code and KV cache."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM


def load_hf(path: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


@torch.inference_mode()
def hf_greedy(model: torch.nn.Module, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy ids, ignoring EOS (the engine side runs with ignore_eos for a fixed length)."""
    out = model(torch.tensor([prompt_ids]), use_cache=True)
    past, logits = out.past_key_values, out.logits[0, -1]
    generated: list[int] = []
    for _ in range(max_new_tokens):
        token = int(torch.argmax(logits))
        generated.append(token)
        out = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[0, -1]
    return generated
