"""LoRA adapters against their oracle: random PEFT adapters (rank 8 and 16, rsLoRA, a
rank_pattern, attention-only and MLP-only targets) on tiny Llama and Qwen2 models give exactly
the greedy tokens of `transformers` + `peft`; a batch mixing three adapters and the base gives
each request what it gets alone; the batched LoRA op equals a token-by-token loop; adapters with
speculation, guided decoding and n > 1; the prefix cache never shares KV across adapters; bad
adapters are refused naming what is wrong."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from common.errors import InvalidArgumentError, ModelLoadError
from decoding.guided import GuidedSpec
from decoding.sampling import SamplingParams
from kernels.lora import lora_add_, lora_add_ref_, make_plan
from service.llm import LLM
from tests.hf_reference import hf_greedy, load_hf

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name -> LoraConfig arguments
ADAPTERS = {
    "r8": dict(r=8, lora_alpha=16, target_modules=ALL),
    "r16_rslora": dict(r=16, lora_alpha=8, target_modules=ALL, use_rslora=True),
    "attn_pattern": dict(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj", "o_proj"],
                         rank_pattern={"v_proj": 4}, alpha_pattern={"o_proj": 4}),
    "mlp": dict(r=16, lora_alpha=16, target_modules=["gate_proj", "up_proj", "down_proj"]),
}
MAX_NEW = 16


def make_adapter(base_dir: Path, out: Path, seed: int, **lora_args) -> Path:
    """A PEFT adapter with random A and B (PEFT starts B at zero: an adapter that changes nothing)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(load_hf(base_dir), LoraConfig(**lora_args))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.15)
    model.save_pretrained(out)
    return out


def peft_greedy(base_dir: Path, adapter: Path, prompt: list[int]) -> list[int]:
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_hf(base_dir), str(adapter)).eval()
    return hf_greedy(model, prompt, MAX_NEW)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def family(request, tiny_model_factory, tmp_path_factory):
    base = tiny_model_factory(request.param)
    root = tmp_path_factory.mktemp(f"lora_{request.param}")
    adapters = {name: make_adapter(base, root / name, seed=i, **args) for i, (name, args) in enumerate(ADAPTERS.items())}
    llm = LLM(str(base), dtype="float32", num_blocks=256, progress=False, max_lora_rank=16, max_loras=4,
              lora=[f"{n}={p}" for n, p in adapters.items()])
    return base, adapters, llm


def _greedy(n: int = MAX_NEW, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, **kw)


PROMPTS = [[1, 504, 3451, 28, 253, 1132, 29, 77, 4002], [1, 9, 5000, 12000, 7, 7, 31], list(range(100, 140))]


def _ids(llm: LLM, prompts, params, lora) -> list[list[int]]:
    out = [r.outputs[0].token_ids for r in llm.generate(prompts, params, lora=lora)]
    assert llm.engine.pool_is_whole()
    return out


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_greedy_equals_transformers_peft(family, name) -> None:
    base, adapters, llm = family
    for prompt in PROMPTS[:2]:
        expect = peft_greedy(base, adapters[name], prompt)
        [got] = _ids(llm, [prompt], _greedy(), name)
        assert got == expect, (name, prompt)
    # The adapter changes the output (else the test above proves nothing).
    [plain] = _ids(llm, [PROMPTS[0]], _greedy(), None)
    assert plain != _ids(llm, [PROMPTS[0]], _greedy(), name)[0] or name == "attn_pattern"


def test_mixed_batch_gives_each_request_what_it_gets_alone(family) -> None:
    _, _, llm = family
    names = ["r8", "r16_rslora", "mlp", None, "r8", None]
    prompts = [PROMPTS[i % 3] for i in range(len(names))]
    alone = [_ids(llm, [p], _greedy(), n)[0] for p, n in zip(prompts, names)]
    assert _ids(llm, prompts, _greedy(), names) == alone
    assert len({tuple(a) for a in alone[:3]}) == 3   # the adapters really differ


def test_more_adapters_than_slots_wait_and_evict(tiny_llama, tmp_path) -> None:
    """Two slots, four adapters in one batch: requests wait for a slot, idle adapters are
    evicted and reloaded, and every output equals the one it gets alone."""
    adapters = {f"a{i}": make_adapter(tiny_llama, tmp_path / f"a{i}", seed=10 + i, r=8, lora_alpha=16,
                                      target_modules=ALL) for i in range(4)}
    llm = LLM(str(tiny_llama), dtype="float32", num_blocks=256, progress=False, max_loras=2,
              lora=[f"{n}={p}" for n, p in adapters.items()])
    names = ["a0", "a1", "a2", "a3", None, "a0", "a3"]
    prompts = [PROMPTS[i % 3] for i in range(len(names))]
    alone = [_ids(llm, [p], _greedy(), n)[0] for p, n in zip(prompts, names)]
    assert _ids(llm, prompts, _greedy(), names) == alone
    assert llm.engine.lora.num_resident == 2


def test_batched_op_equals_a_token_loop() -> None:
    g = torch.Generator().manual_seed(0)
    slots, t, n_in, r, n_out = 4, 23, 12, 6, 9
    x = torch.randn(t, n_in, generator=g)
    a = torch.randn(slots, n_in, r, generator=g)
    b = torch.randn(slots, r, n_out, generator=g)
    for token_slots in ([random.Random(s).choice([-1, 0, 1, 3]) for _ in range(t)] for s in range(5)):
        out, ref = torch.randn(t, n_out, generator=g), None
        ref = out.clone()
        plan = make_plan(token_slots, slots, x.device)
        if plan is None:
            assert all(s < 0 for s in token_slots)
            continue
        lora_add_(out, x, a, b, plan)
        lora_add_ref_(ref, x, a, b, token_slots)
        torch.testing.assert_close(out, ref)
    out = torch.zeros(t, n_out)
    lora_add_(out, x, a, b, make_plan([2] * t, slots, x.device))   # one slot for all: no gather
    torch.testing.assert_close(out, x @ a[2] @ b[2])


def test_speculation_guided_and_n_with_an_adapter(family) -> None:
    base, adapters, llm = family
    prompt = [1, 5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7]
    [ref] = _ids(llm, [prompt], _greedy(), "r8")
    spec = LLM(str(base), dtype="float32", num_blocks=256, progress=False, speculative_method="ngram",
               num_speculative_tokens=3, lora=[f"r8={adapters['r8']}"])
    assert _ids(spec, [prompt], _greedy(), "r8") == [ref]
    choices = ["red", "green", "blue"]
    [res] = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6, guided=GuidedSpec("choice", choices)),
                         lora="mlp")
    assert res.outputs[0].text in choices
    [res] = llm.generate([prompt], SamplingParams(temperature=1.0, max_tokens=8, n=3, seed=4, ignore_eos=True),
                         lora="r8")
    assert len(res.outputs) == 3 and all(len(c.token_ids) == 8 for c in res.outputs)
    assert llm.engine.pool_is_whole()


def test_prefix_cache_is_never_shared_across_adapters(family) -> None:
    _, _, llm = family
    prompt = list(range(2000, 2040))   # several full blocks
    first = {}
    for name in ("r8", "mlp", None):
        [res] = llm.generate([prompt], _greedy(4), lora=name)
        first[name] = res.num_cached_tokens
    [again] = llm.generate([prompt], _greedy(4), lora="mlp")
    assert first == {"r8": 0, "mlp": 0, None: 0}
    assert again.num_cached_tokens > 0   # the same adapter reuses its own blocks


def test_bad_adapters_are_refused_naming_the_problem(tiny_llama, tmp_path) -> None:
    llm = LLM(str(tiny_llama), dtype="float32", num_blocks=64, progress=False, enable_lora=True, max_lora_rank=8)
    good = make_adapter(tiny_llama, tmp_path / "good", seed=1, r=8, lora_alpha=8, target_modules=ALL)
    cases = {
        "rank": (make_adapter(tiny_llama, tmp_path / "r16", seed=1, r=16, lora_alpha=8, target_modules=ALL),
                 "over --max-lora-rank 8"),
        "embed": (make_adapter(tiny_llama, tmp_path / "embed", seed=1, r=4, lora_alpha=8,
                               target_modules=["embed_tokens", "q_proj"]), "embed_tokens"),
        "save": (make_adapter(tiny_llama, tmp_path / "save", seed=1, r=4, lora_alpha=8, target_modules=["q_proj"],
                              modules_to_save=["lm_head"]), "modules_to_save"),
        "missing": (tmp_path / "nowhere", "not a PEFT adapter directory"),
    }
    # A base model of another width: the shapes do not fit.
    wide = _wider_adapter(good, tmp_path / "wide")
    cases["wide"] = (wide, "do not fit the base model")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    cases["corrupt"] = (corrupt, "cannot be read")
    for label, (path, needle) in cases.items():
        with pytest.raises(ModelLoadError) as err:
            llm.load_lora(label, str(path))
        assert needle in str(err.value), (label, str(err.value))
    llm.load_lora("good", str(good))   # the engine goes on serving, and takes good adapters
    assert _ids(llm, [PROMPTS[0]], _greedy(4), "good")
    with pytest.raises(InvalidArgumentError) as err:
        llm.generate([PROMPTS[0]], _greedy(4), lora="nope")
    assert err.value.field == "model"


def _wider_adapter(src: Path, out: Path) -> Path:
    """`src` with every lora_A one column wider: an adapter for a model of another hidden size."""
    from safetensors.torch import load_file, save_file

    out.mkdir()
    (out / "adapter_config.json").write_text(json.dumps(json.loads((src / "adapter_config.json").read_text())))
    tensors = load_file(str(src / "adapter_model.safetensors"))
    wide = {k: torch.cat([v, v[:, :1]], dim=1) if "lora_A" in k else v for k, v in tensors.items()}
    save_file(wide, str(out / "adapter_model.safetensors"))
    return out
