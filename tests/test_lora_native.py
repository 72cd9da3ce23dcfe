"""LoRA inside the native CPU loop (kernels/csrc/cpu_lora.c, service/models/llama_native.py): the
C op equals the token-by-token reference over LoRAStacks' block-diagonal layout, and a batch
mixing three adapters and the base really runs its LoRA steps natively and gives the greedy
tokens of `transformers` + `peft`, of the layer loop and of the torch (bmm) LoRA op."""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from kernels import cpu_native
from kernels.lora import lora_add_ref_
from service.llm import LLM
from tests.hf_reference import hf_greedy, load_hf
from tests.test_lora import ADAPTERS, MAX_NEW, PROMPTS, _greedy, _ids, make_adapter, peft_greedy

needs_native = pytest.mark.skipif(not cpu_native.has_sgemm(), reason="no native kernels (compiler or sgemm_) here")


@needs_native
@pytest.mark.parametrize("parts", [[7], [7, 9, 11], [13, 13]])
def test_native_op_equals_a_token_loop(parts: list[int]) -> None:
    g = torch.Generator().manual_seed(len(parts))
    slots, t, k, r = 4, 23, 40, 5
    cols = [0]
    for w in parts:
        cols.append(cols[-1] + w)
    n = cols[-1]
    a = torch.randn(slots, k, len(parts) * r, generator=g)
    b = torch.zeros(slots, len(parts) * r, n)   # block-diagonal, as LoRAStacks lays fused parts out
    for p in range(len(parts)):
        b[:, p * r:(p + 1) * r, cols[p]:cols[p + 1]] = torch.randn(slots, r, parts[p], generator=g)
    x = torch.randn(t, k, generator=g)
    cols_t = torch.tensor(cols, dtype=torch.long)
    # Mixed slots, none, and one slot for every token (chunks of several tokens of one slot).
    cases = [[random.Random(s).choice([-1, 0, 1, 3]) for _ in range(t)] for s in range(4)] + [[2] * t, [-1] * t]
    for token_slots in cases:
        y = torch.randn(t, n, generator=g)
        ref = y.clone()
        lora_add_ref_(ref, x, a, b, token_slots)
        slots_t = torch.tensor(token_slots, dtype=torch.long)
        cpu_native.lora_add(y, x, a, b, r, cols_t, slots_t, slots, num_threads=2)
        torch.testing.assert_close(y, ref)


@needs_native
@pytest.mark.parametrize("kind", ["llama", "qwen2"])   # qwen2: q/k/v biases before the adapter
def test_mixed_batch_stays_native_and_equals_peft_and_torch(kind: str, tiny_model_factory, tmp_path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    base = tiny_model_factory(kind)
    chosen = ["r8", "attn_pattern", "mlp"]
    adapters = {n: make_adapter(base, tmp_path / n, seed=20 + i, **ADAPTERS[n]) for i, n in enumerate(chosen)}
    llm = LLM(str(base), dtype="float32", num_blocks=256, progress=False, max_lora_rank=16, max_loras=4,
              lora=[f"{n}={p}" for n, p in adapters.items()])
    names = ["r8", None, "attn_pattern", "mlp", None, "r8"]
    prompts = [PROMPTS[i % 2] for i in range(len(names))]
    native = llm.engine.model.native
    before = native.lora_steps
    got = _ids(llm, prompts, _greedy(), names)
    assert native.lora_steps > before   # the mixed decode steps ran in the C loop, adapters included
    before = native.lora_steps

    with monkeypatch.context() as m:   # the same batch on the layer loop (its LoRA adds: the C op on CPU)
        m.setattr(llm.engine.model, "native", None)
        assert _ids(llm, prompts, _greedy(), names) == got
        # ... and with the torch LoRA op (batched bmm), as on other devices.
        m.setattr("service.models.lora.cpu_native", SimpleNamespace(usable=lambda *a: False))
        assert _ids(llm, prompts, _greedy(), names) == got
    assert native.lora_steps == before   # (the patched runs above really left the C loop)

    for n, p, out in zip(names, prompts, got):
        if n is None:
            assert out == hf_greedy(load_hf(base), p, MAX_NEW), p
        else:
            assert out == peft_greedy(base, adapters[n], p), (n, p)
    # The adapters change the output (else equality to the base model would prove nothing).
    assert got[0] != got[4] and got[3] != got[1]
