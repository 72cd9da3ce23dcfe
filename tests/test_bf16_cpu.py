"""dtype bfloat16 on CPU, Llama family (service/models/bf16_packed.py): bf16 weights, float32
activations; few-row steps stream the weights' bf16 bits (FMT_BF16) through the native loop, steps
of many rows multiply them by bf16 GEMM (service/models/layers/linear.py). From a GGUF, few-row
steps stream its blocks as float32 does and only the GEMM is bf16. The KV cache holds bf16 (its
keys and values rounded, attention float32) unless --kv-cache-dtype float32: transformers, the
oracle, runs with a cache that rounds them the same way (tests/hf_reference.py's Bf16KVCache)."""
from __future__ import annotations

import random
import re

import pytest
import torch
import torch.nn.functional as F

from common.errors import InvalidArgumentError
from decoding.sampling import SamplingParams
from kernels import cpu_native, quant
from service.models.bf16_packed import AUTO_MIN_GAIN
from service.llm import LLM
from service.models.layers.linear import (AMX_MIN_ROWS, BF16_GEMM_MIN_ROWS, LONE_AMX_MIN_ROWS, bf16_gemm_available,
                                          bf16_matmul, bf16_weight)
from tests.hf_reference import hf_greedy, load_hf, with_bf16_kv

pytestmark = pytest.mark.skipif(cpu_native.lib() is None or not cpu_native.has_sgemm(),
                                reason="no native kernels (the bf16 copies are read by the native loop)")


def _prompts(vocab: int, lengths: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


def _hf_on_bf16_weights(path, round_weights: bool = True, bf16_kv: bool = True) -> torch.nn.Module:
    """transformers in float32 on the checkpoint's weights rounded to bf16 (round_weights), keys
    and values rounded to bf16 in its cache (bf16_kv): what we compute."""
    hf = load_hf(path)
    if round_weights:
        with torch.no_grad():
            for p in hf.parameters():
                p.copy_(p.bfloat16())
    return with_bf16_kv(hf) if bf16_kv else hf


def _hf_with_bf16_gemm(path, round_weights: bool = True, min_rows: int = BF16_GEMM_MIN_ROWS) -> torch.nn.Module:
    """transformers in float32 on bf16-rounded weights whose decoder projections multiply forwards
    of at least `min_rows` tokens in bf16 products, as our steps of that many rows do
    (service/models/layers/linear.py), and the logits of that many sequences (`_bf16_gemm_logits`).
    min_rows=1: every product, as a GGUF's steps of several sequences on AMX tiles, decodes too."""
    hf = _hf_on_bf16_weights(path, round_weights)
    for module in hf.model.layers.modules():
        if isinstance(module, torch.nn.Linear):
            module.forward = _bf16_gemm_forward(module, min_rows)
    if cpu_native.has_bf16_gemm():
        hf.lm_head.forward = _bf16_gemm_logits(hf.lm_head, min_rows)
    return hf


def _bf16_gemm_logits(lm_head: torch.nn.Linear, min_rows: int):
    """Our logits: one row per sequence (its last token), in bf16 products when a step has at
    least `min_rows` such rows and they come out float32; transformers computes every position's,
    of which greedy reads the last."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, lm_head.weight)
        if x.dim() == 3 and x.shape[0] >= min_rows:
            y[:, -1] = bf16_matmul(x[:, -1].contiguous(), lm_head.weight.bfloat16())
        return y
    return forward


def _bf16_gemm_forward(linear: torch.nn.Linear, min_rows: int):
    def forward(x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows < min_rows:
            return F.linear(x, linear.weight, linear.bias)
        return bf16_matmul(x.reshape(rows, -1), linear.weight.bfloat16(), linear.bias).reshape(*x.shape[:-1], -1)
    return forward


@torch.inference_mode()
def _hf_batch_greedy(model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy ids of equal-length prompts decoded as one batch: each forward has as many rows as
    our engine's step over the same batch (no padding)."""
    out = model(torch.tensor(prompts), use_cache=True)
    past, tokens = out.past_key_values, out.logits[:, -1].argmax(-1)
    generated = [tokens]
    for _ in range(max_new_tokens - 1):
        out = model(tokens[:, None], past_key_values=past, use_cache=True)
        past, tokens = out.past_key_values, out.logits[:, -1].argmax(-1)
        generated.append(tokens)
    return torch.stack(generated, 1).tolist()


def _generate_one_by_one(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    """Each prompt alone, so a step's row count is the prompt's length, then 1, as in transformers."""
    return [llm.generate([p], params)[0].outputs[0].token_ids for p in prompts]


def test_tiny_llama_bf16_matches_transformers(tiny_llama) -> None:
    llm = LLM(str(tiny_llama), dtype="bfloat16", progress=False, num_blocks=64)
    model = llm.engine.model
    assert model.bf16_weights and model.embed_tokens.weight.dtype == torch.float32
    assert llm.engine.runner.kv_tensor.dtype == torch.bfloat16
    projections = [m for layer in model.layers for m in layer.projections()]
    assert all(m.packed.fmt == quant.FMT_BF16 for m in projections)
    assert model.lm_head_packed.fmt == quant.FMT_BF16
    for m in projections:
        assert torch.equal(quant.dequantize(m.packed), m.weight) and torch.equal(m.weight, m.weight.bfloat16().float())

    # Prompts of 1 and 7 tokens prefill below BF16_GEMM_MIN_ROWS rows, 33 and 80 above.
    prompts = _prompts(llm.engine.vocab_size, [1, 7, 33, 80], seed=1)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    steps = model.native.steps
    ours = _generate_one_by_one(llm, prompts, params)
    assert model.native.steps > steps   # the decode steps ran in the native loop
    assert ours == [hf_greedy(_hf_with_bf16_gemm(tiny_llama), p, 24) for p in prompts]
    hf16 = load_hf(tiny_llama, torch.bfloat16)
    # transformers in bf16 rounds every activation too: a random tiny model's near-tied logits part
    # ways after a while (the 33-token prompt after 6 tokens, the 80-token one at once); the short
    # prompts' first 16 tokens agree. The real model's test below holds 24 tokens on every prompt.
    assert [o[:16] for o in ours[:2]] == [hf_greedy(hf16, p, 16) for p in prompts[:2]]
    assert llm.engine.pool_is_whole()


def test_tiny_llama_bf16_without_gemm_is_float32_on_bf16_weights(tiny_llama, monkeypatch: pytest.MonkeyPatch) -> None:
    """WEFT_BF16_GEMM=0 (what a CPU without AVX512-BF16 or AMX gets): every step computes float32
    arithmetic on the bf16 weights (and bf16 KV), transformers in float32 on them is exact, batched
    or not."""
    monkeypatch.setenv("WEFT_BF16_GEMM", "0")
    llm = LLM(str(tiny_llama), dtype="bfloat16", progress=False, num_blocks=64)
    assert not llm.engine.model.bf16_gemm
    prompts = _prompts(llm.engine.vocab_size, [1, 7, 33, 80], seed=1)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    ours = [r.outputs[0].token_ids for r in llm.generate(prompts, params)]
    hf32 = _hf_on_bf16_weights(tiny_llama)
    assert ours == [hf_greedy(hf32, p, 24) for p in prompts]
    assert llm.engine.pool_is_whole()


@pytest.mark.skipif(not bf16_gemm_available(), reason="this CPU has no AVX512-BF16 or AMX: no bf16 GEMM path")
def test_tiny_llama_bf16_gemm_runs_long_steps(tiny_llama) -> None:
    """Steps of many rows multiply the packed bits by bf16 GEMM, few-row steps do not: zeroing the
    bits under a long prefill changes its first token, and a batch of 40 short prompts (120-row
    prefill, then 40-row decodes) runs in the native loop where MKL's bf16 GEMM is there to call
    (the torch loop otherwise), equal to transformers with the same GEMM either way."""
    llm = LLM(str(tiny_llama), dtype="bfloat16", progress=False, num_blocks=256)
    model = llm.engine.model
    assert model.bf16_gemm
    w16 = model.layers[0].self_attn.qkv_proj.__dict__["bf16_gemm"]
    assert w16.data_ptr() == model.layers[0].self_attn.qkv_proj.packed.data.data_ptr()   # no second copy
    if cpu_native.has_bf16_gemm():   # the logits of many rows too, from the lm_head's packed bits
        assert model.lm_head_bf16.data_ptr() == model.lm_head_packed.data.data_ptr()
    batch = _prompts(llm.engine.vocab_size, [3] * 40, seed=5)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    steps = model.native.steps
    ours = [r.outputs[0].token_ids for r in llm.generate(batch, params)]
    assert model.native.steps == steps + (4 if cpu_native.has_bf16_gemm() else 0)
    assert ours == _hf_batch_greedy(_hf_with_bf16_gemm(tiny_llama), batch, 4)
    long = _prompts(llm.engine.vocab_size, [64], seed=6)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    before = llm.generate(long, params)[0].outputs[0].token_ids
    for layer in model.layers:
        layer.mlp.down_proj.packed.data.zero_()
    assert llm.generate(long, params)[0].outputs[0].token_ids != before
    assert llm.engine.pool_is_whole()


@torch.inference_mode()
def _hf_greedy_decisive(model: torch.nn.Module, prompt_ids: list[int], max_new_tokens: int,
                        margin: float | None = None) -> list[int]:
    """transformers' greedy ids up to (not including) the first step whose two best logits are
    within `margin` (default: one bf16 step) of each other: there rounding decides, and
    transformers in bf16 itself breaks an exact tie by token index."""
    out = model(torch.tensor([prompt_ids]), use_cache=True)
    past, logits = out.past_key_values, out.logits[0, -1].float()
    generated: list[int] = []
    for _ in range(max_new_tokens):
        top = torch.topk(logits, 2)
        tie = 2.0 ** (torch.frexp(top.values[0]).exponent.item() - 8) if margin is None else margin
        if float(top.values[0] - top.values[1]) <= tie:
            break
        token = int(top.indices[0])
        generated.append(token)
        out = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[0, -1].float()
    return generated


def test_smollm2_bf16_matches_transformers_bf16(smollm2_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default model (a Q4_1/Q8_0 GGUF) with dtype bfloat16: steps of many rows (prefill) are
    bf16 products (bf16 GEMM, or the blocks on AMX tiles); a sequence's steps of few rows decoding
    alone are float32's on the GGUF's blocks (with bf16 KV blocks), bit for bit; on AMX, steps of several sequences from
    AMX_MIN_ROWS rows, decodes too, multiply on the tiles (and no bf16 copies are made). Its tokens
    are transformers' with the same products, and transformers' bf16 tokens wherever transformers'
    own choice is not a bf16 tie."""
    from tests.test_engine_exact import CHATS

    # No prefix caching: each prompt's prefill is one step of its own length, as in transformers.
    llm = LLM(str(smollm2_dir), dtype="bfloat16", progress=False, kv_cache_gb=0.25, enable_prefix_caching=False)
    f32 = LLM(str(smollm2_dir), dtype="float32", progress=False, kv_cache_gb=0.25, enable_prefix_caching=False,
              kv_cache_dtype="bfloat16")
    model = llm.engine.model
    assert model.bf16_weights and llm.engine.runner.kv_tensor.dtype == torch.bfloat16
    projections = [m for layer in model.layers for m in layer.projections()]
    assert all(m.packed is not None and m.packed.fmt != quant.FMT_BF16 for m in projections)   # the GGUF's blocks
    assert torch.equal(projections[0].weight, f32.engine.model.layers[0].projections()[0].weight)   # not rounded
    amx = cpu_native.has_amx()
    # bf16 copies for the GEMM only where the tiles do not multiply the blocks (no AMX).
    assert all((bf16_weight(m) is None) == amx for m in projections)
    tok = llm.tokenizer
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": c}]), add_special_tokens=False)
               for c in CHATS]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    # The rows of the logits each step multiplies on AMX tiles (the layers' are the native loop's).
    tiled: list[int] = []
    amx_product = quant.qmatmul_amx

    def counting(x: torch.Tensor, p: quant.PackedWeight) -> torch.Tensor:
        if p is model.lm_head_packed:
            tiled.append(x.shape[0])
        return amx_product(x, p)

    monkeypatch.setattr(quant, "qmatmul_amx", counting)
    # Prompts of fewer than BF16_GEMM_MIN_ROWS (and LONE_AMX_MIN_ROWS) tokens decoding alone never
    # leave the few-row path: float32's tokens and logits (over the same bf16 KV blocks).
    short = [p[:BF16_GEMM_MIN_ROWS - 1] for p in prompts]
    assert _generate_one_by_one(llm, short, params) == _generate_one_by_one(f32, short, params)
    ours = _generate_one_by_one(llm, prompts, params)
    assert tiled == []   # one logits row a step, a lone sequence's: float32
    # What we compute for these 36-38-token prompts: their prefill projections in bf16 products,
    # the rest float32. Not bit for bit (our q/k/v and gate/up are fused, and the tiles sum in their
    # own order), so compared where the two best logits are more than 0.1 apart.
    hooked = _hf_with_bf16_gemm(smollm2_dir, round_weights=False,
                                min_rows=LONE_AMX_MIN_ROWS if amx else BF16_GEMM_MIN_ROWS)
    decisive = [_hf_greedy_decisive(hooked, p, 24, margin=0.1) for p in prompts]
    assert [o[:len(d)] for o, d in zip(ours, decisive)] == decisive
    assert sum(map(len, decisive)) >= 24
    # transformers' own bf16 logits are bf16 values: one step apart at ~30 is 0.125, and its ties
    # are frequent (CHATS[1] and CHATS[2] tie at their first token; CHATS[2]'s two best are 30.903
    # and 30.897 in float32). Where its choice is not such a tie, ours is the same.
    hf16 = load_hf(smollm2_dir, torch.bfloat16)
    decisive = [_hf_greedy_decisive(hf16, p, 24) for p in prompts]
    assert [o[:len(d)] for o, d in zip(ours, decisive)] == decisive
    assert sum(map(len, decisive)) >= 24
    if amx:   # several sequences at once: every step has AMX_MIN_ROWS rows or more, all on the tiles
        batch = prompts + short
        assert len(batch) >= AMX_MIN_ROWS
        together = [r.outputs[0].token_ids for r in llm.generate(batch, params)]
        assert tiled and min(tiled) >= AMX_MIN_ROWS and max(tiled) == len(batch)
        every = _hf_with_bf16_gemm(smollm2_dir, round_weights=False, min_rows=1)
        decisive = [_hf_greedy_decisive(every, p, 24, margin=0.1) for p in batch]
        assert [o[:len(d)] for o, d in zip(together, decisive)] == decisive
        assert sum(map(len, decisive)) >= 48
    assert llm.engine.pool_is_whole()


def test_tiny_llama_bf16_reads_the_packed_copies(tiny_llama, monkeypatch: pytest.MonkeyPatch) -> None:
    """Zeroing the bf16 copies (not the float32 weights) changes the tokens: the decode steps
    read them; WEFT_PACKED=0 (sgemm on the float32 weights) gives the tokens back."""
    llm = LLM(str(tiny_llama), dtype="bfloat16", progress=False, num_blocks=64)
    model = llm.engine.model
    prompts = _prompts(llm.engine.vocab_size, [5, 20], seed=3)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    ref = [r.outputs[0].token_ids for r in llm.generate(prompts, params)]
    for layer in model.layers:
        for m in layer.projections():
            m.packed.data.zero_()
    assert [r.outputs[0].token_ids for r in llm.generate(prompts, params)] != ref
    monkeypatch.setenv("WEFT_PACKED", "0")
    assert [r.outputs[0].token_ids for r in llm.generate(prompts, params)] == ref
    assert llm.engine.pool_is_whole()


def test_other_families_keep_plain_bf16(tiny_model_factory) -> None:
    """A family without the native loop (Gemma) runs in bf16 as before."""
    llm = LLM(str(tiny_model_factory("gemma")), dtype="bfloat16", progress=False, num_blocks=64)
    assert not getattr(llm.engine.model, "bf16_weights", False)
    assert llm.engine.model.embed_tokens.weight.dtype == torch.bfloat16
    assert llm.engine.runner.kv_tensor.dtype == torch.bfloat16


def _auto_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The log lines in which `--dtype auto` said what it chose."""
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("dtype auto on CPU: ")]


def test_dtype_auto_says_what_it_chose_and_runs_it(smollm2_dir, caplog: pytest.LogCaptureFixture) -> None:
    """`--dtype auto` on a CPU times bf16 GEMM against sgemm at the model's shapes and logs the
    choice with the figures; the engine runs what the log says. The default model (a GGUF: a
    request decoding alone stays float32's either way) takes bfloat16 where bf16 GEMM measured
    faster."""
    with caplog.at_level("INFO", logger="weft.engine"):
        llm = LLM(str(smollm2_dir), progress=False, kv_cache_gb=0.1)
    said = _auto_lines(caplog)
    assert len(said) == 1
    chosen = said[0].removeprefix("dtype auto on CPU: ").split(" ")[0]
    assert chosen == llm.engine.config.dtype and llm.engine.config.torch_dtype() == getattr(torch, chosen)
    assert bool(getattr(llm.engine.model, "bf16_gemm", False)) == (chosen == "bfloat16")
    if bf16_gemm_available():
        measured = re.search(r"bf16 GEMM (\d+) GFLOPS against float32 (\d+)", said[0])
        assert measured, said[0]
        bf16, f32 = map(int, measured.groups())
        assert chosen == ("bfloat16" if bf16 >= AUTO_MIN_GAIN * f32 else "float32")
    else:
        assert chosen == "float32" and "no AVX512-BF16 or AMX" in said[0]
    # A short prompt decoding alone is float32's (over the KV blocks of the chosen dtype) whichever
    # was chosen (bf16 products serve steps of many rows, or of several sequences on AMX tiles).
    assert llm.engine.kv_dtype == getattr(torch, chosen)
    prompt = llm.tokenizer.encode("The capital of France is")
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    f32 = LLM(str(smollm2_dir), dtype="float32", progress=False, kv_cache_gb=0.1, kv_cache_dtype=chosen)
    assert llm.generate([prompt], params)[0].outputs[0].token_ids == f32.generate([prompt], params)[0].outputs[0].token_ids


def test_dtype_auto_keeps_float32_where_bf16_would_cost(tiny_llama, tiny_model_factory,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """A float32 checkpoint (bf16 would round its weights) and a family without the bf16 CPU path
    stay float32 under auto, each saying why; an explicit --dtype is never second-guessed."""
    for path, why in ((tiny_llama, "not bf16"), (tiny_model_factory("gemma"), "Llama-family")):
        caplog.clear()
        with caplog.at_level("INFO", logger="weft.engine"):
            llm = LLM(str(path), progress=False, num_blocks=16)
        said = _auto_lines(caplog)
        assert len(said) == 1 and said[0].startswith("dtype auto on CPU: float32 (") and why in said[0], said
        assert llm.engine.config.dtype == "float32" and not getattr(llm.engine.model, "bf16_weights", False)
    caplog.clear()
    with caplog.at_level("INFO", logger="weft.engine"):
        LLM(str(tiny_llama), dtype="float32", progress=False, num_blocks=16)
    assert not [r for r in caplog.records if r.getMessage().startswith("dtype auto")]


def test_bf16_draft_model_keeps_its_gguf_blocks(smollm2_dir) -> None:
    """A GGUF draft model under bfloat16 on CPU is read as the target is: float32 de-quantised
    weights whose blocks serve its few-row steps (not weights rounded to bf16), and speculation
    stays lossless."""
    llm = LLM(str(smollm2_dir), dtype="bfloat16", progress=False, kv_cache_gb=0.1, speculative_method="draft",
              draft_model=str(smollm2_dir), num_speculative_tokens=3)
    draft = llm.engine.spec.proposer.runner.model
    projections = [m for layer in draft.layers for m in layer.projections()]
    assert draft.bf16_weights and all(m.packed is not None and m.packed.fmt != quant.FMT_BF16 for m in projections)
    target = llm.engine.model.layers[0].projections()[0].weight
    assert torch.equal(projections[0].weight, target)   # the exact de-quantisation, not rounded
    prompt = llm.tokenizer.encode("Count from one to ten: one, two,")
    spec = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0].outputs[0]
    plain = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                                                  num_speculative_tokens=0))[0].outputs[0]
    assert spec.token_ids == plain.token_ids and spec.spec["num_accepted_tokens"] > 0


def test_kv_cache_dtype(tiny_llama) -> None:
    """--kv-cache-dtype: bfloat16 blocks under a float32 model equal transformers in float32 with a
    cache that rounds keys and values to bf16, exactly; float32 blocks under --dtype bfloat16 keep
    what that mode computed before bf16 blocks (a lone request float32's, decode by decode);
    bf16 blocks hold twice the tokens of the same budget; a bad value is refused by name."""
    prompts = _prompts(128, [1, 7, 33, 80], seed=11)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    f32_bf16kv = LLM(str(tiny_llama), dtype="float32", kv_cache_dtype="bfloat16", progress=False, kv_cache_gb=0.01)
    assert f32_bf16kv.engine.runner.kv_tensor.dtype == torch.bfloat16
    ours = _generate_one_by_one(f32_bf16kv, prompts, params)
    assert ours == [hf_greedy(with_bf16_kv(load_hf(tiny_llama)), p, 24) for p in prompts]
    plain = LLM(str(tiny_llama), dtype="float32", progress=False, kv_cache_gb=0.01)
    assert plain.engine.runner.kv_tensor.dtype == torch.float32
    assert f32_bf16kv.engine.num_blocks // 2 == plain.engine.num_blocks   # the budget over half the bytes
    assert _generate_one_by_one(plain, prompts, params) != ours   # the rounding is really there
    bf16_f32kv = LLM(str(tiny_llama), dtype="bfloat16", kv_cache_dtype="float32", progress=False, num_blocks=64)
    assert bf16_f32kv.engine.runner.kv_tensor.dtype == torch.float32
    short = [p for p in prompts if len(p) < BF16_GEMM_MIN_ROWS]
    assert _generate_one_by_one(bf16_f32kv, short, params) == [hf_greedy(_hf_on_bf16_weights(tiny_llama, bf16_kv=False), p, 24)
                                                                for p in short]
    with pytest.raises(InvalidArgumentError, match="kv_cache_dtype"):
        LLM(str(tiny_llama), dtype="float32", kv_cache_dtype="float16", progress=False, num_blocks=16)

