"""transformers as the oracle: greedy decoding with its own model code and KV cache."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DynamicCache


def load_hf(path: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


class Bf16KVCache(DynamicCache):
    """transformers' cache holding keys (after RoPE) and values rounded to bf16, in the model's
    dtype: what our bf16 KV blocks (--kv-cache-dtype bfloat16) give a float32 model's attention,
    the new token's own key and value included."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        rounded = [t.bfloat16().to(t.dtype) for t in (key_states, value_states)]
        return super().update(*rounded, layer_idx, *args, **kwargs)


def with_bf16_kv(model: torch.nn.Module) -> torch.nn.Module:
    """`model`, whose forwards that start a cache start a Bf16KVCache."""
    forward = model.forward

    def starts_bf16_cache(*args, past_key_values=None, **kwargs):
        if past_key_values is None:
            past_key_values = Bf16KVCache(config=model.config)
        return forward(*args, past_key_values=past_key_values, **kwargs)

    model.forward = starts_bf16_cache
    return model


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
