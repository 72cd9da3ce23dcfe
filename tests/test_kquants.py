"""K-quant GGUFs as Ollama users have them (Q4_K_M, Q5_K_M, Q6_K): the test encoder against gguf-py's
decoder; tiny Llama GGUFs in llama.cpp's type mixes and the default model (SmolLM2) re-quantised
the same way load, pack every projection for the few-row fast path (exactly the de-quantised
weights) and give transformers' greedy tokens for the same GGUF; so does a real llama.cpp Q4_K_M
when llama-cpp-python is installed."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from decoding.sampling import SamplingParams
from service.llm import LLM
from tests.gguf_writer import TokenizerFields, small_tokenizer, write_gguf
from tests.hf_reference import hf_greedy
from tests.kquants import QK_K, llama_cpp_mix, quantize

FTYPES = ["Q4_K_M", "Q5_K_M", "Q6_K"]
VOCAB = 320


def _round_trip(data: np.ndarray, qtype: str) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    return dequantize(quantize(data, qtype), GGMLQuantizationType[qtype]).reshape(data.shape)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K"])
def test_encoder_round_trips_through_gguf_py(qtype: str) -> None:
    """gguf-py's decoder gives back every weight within half a step of its sub-block's grid: the
    step is the sub-block's own range over the quant levels (plus what the 6-bit / 8-bit sub-scales
    and the fp16 super-scale add), so a misplaced byte, nibble or bit fails it."""
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((6, 2 * QK_K)) * 0.05).astype(np.float32)
    x[1, :QK_K] = 0                                 # an all-zero super-block
    x[2] = np.abs(x[2]) + 0.2                       # all positive (the min is clamped to 0)
    x[3] = -np.abs(x[3]) - 0.2                      # all negative
    x[4, :32] *= 40                                 # one loud sub-block beside quiet ones
    x[5] = np.arange(2 * QK_K, dtype=np.float32) / 100 - 2   # a ramp: every quant level used
    y = _round_trip(x, qtype)
    sub = 16 if qtype == "Q6_K" else 32
    xs, err = x.reshape(6, -1, QK_K // sub, sub), np.abs(y - x).reshape(6, -1, QK_K // sub, sub).max(-1)
    if qtype == "Q6_K":
        amax = np.abs(xs).max(-1)
        bound = 0.5 * (amax / 31 + amax.max(-1, keepdims=True) / (31 * 127)) * 1.01
    else:
        levels = 15 if qtype == "Q4_K" else 31
        span = np.maximum(xs.max(-1), 0) - np.minimum(xs.min(-1), 0)
        bound = 0.5 * (span + 2 * span.max(-1, keepdims=True) / 63) / levels * 1.01
    assert (err <= bound + 1e-7).all(), (err / np.maximum(bound, 1e-12)).max()
    assert np.array_equal(y[1, :QK_K], np.zeros(QK_K, dtype=np.float32))
    # The ramp uses all the levels: as many distinct values per sub-block as the format has.
    distinct = {len(np.unique(v)) for v in y[5].reshape(-1, sub)}
    assert max(distinct) >= {"Q4_K": 16, "Q5_K": 32, "Q6_K": 16}[qtype] - 1


def test_recipe_is_llama_cpp_mix() -> None:
    """Q4_K_M: Q6_K for the tied embedding and attn_v / ffn_down of layers 0, 3, 6, 7 of 8."""
    mix = llama_cpp_mix("Q4_K_M", 8, tied=True)
    assert mix("token_embd.weight") == "Q6_K" and mix("blk.0.attn_q.weight") == "Q4_K"
    assert [i for i in range(8) if mix(f"blk.{i}.attn_v.weight") == "Q6_K"] == [0, 3, 6, 7]
    assert [i for i in range(8) if mix(f"blk.{i}.ffn_down.weight") == "Q6_K"] == [0, 3, 6, 7]
    assert llama_cpp_mix("Q4_K_M", 8, tied=False)("token_embd.weight") == "Q4_K"
    assert {llama_cpp_mix("Q6_K", 8, tied=True)(n) for n in ("blk.1.attn_v.weight", "blk.2.ffn_up.weight")} == {"Q6_K"}


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf: Path) -> TokenizerFields:
    return small_tokenizer(smollm2_gguf, VOCAB)


def _tensor_types(gguf: Path) -> Counter:
    from gguf import GGUFReader

    return Counter(t.tensor_type.name for t in GGUFReader(str(gguf)).tensors if len(t.shape) > 1)


def _assert_packed_exactly(llm: LLM) -> list:
    """Every projection and the lm_head carry GGUF blocks that de-quantise to the model's float32
    weight bit for bit (the load check, verified again here with the torch de-quantiser)."""
    from kernels import quant

    model = llm.engine.model
    mods = [m for layer in model.layers for m in layer.projections()]
    assert all(m.packed is not None for m in mods) and model.lm_head_packed is not None
    for m in mods:
        assert torch.equal(quant.dequantize(m.packed), m.weight)
    assert torch.equal(quant.dequantize(model.lm_head_packed), model.lm_head_weight)
    return [m.packed for m in mods]


@pytest.mark.parametrize("ftype", FTYPES)
def test_tiny_kquant_gguf_matches_transformers(ftype: str, tiny_model_factory, tokenizer: TokenizerFields,
                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny Llama with rows of whole super-blocks (hidden 256, FFN 512): every tensor a K-quant."""
    from transformers import AutoModelForCausalLM

    from kernels import quant

    monkeypatch.setenv("WEFT_CACHE_DIR", str(tmp_path / "cache"))
    hf_dir = tiny_model_factory("llama", vocab_size=VOCAB, hidden_size=256, intermediate_size=512,
                                num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2)
    gguf = write_gguf(hf_dir, tmp_path / f"tiny.{ftype}.gguf", tokenizer, llama_cpp_mix(ftype, 8, tied=True))
    types = _tensor_types(gguf)
    assert set(types) == ({"Q6_K"} if ftype == "Q6_K" else {"Q6_K", ftype[:4]})
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=gguf.name, dtype=torch.float32).eval()
    # A small pool and token budget: chunked prefill and preemption in the batch of 8.
    llm = LLM(str(gguf), dtype="float32", progress=False, num_blocks=20, max_num_batched_tokens=32)
    packs = _assert_packed_exactly(llm)
    if ftype != "Q6_K":   # Q6_K attn_v beside K-quant q / k: the fused qkv packs as two segments
        assert sum(p.fmt == quant.FMT_SEGMENTS for p in packs) == 4
    prompts = [list(range(40 + i, 70 + 3 * i)) for i in range(8)]
    results = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    for prompt, res in zip(prompts, results):
        assert res.outputs[0].token_ids == hf_greedy(hf, prompt, 10)
    assert llm.engine.pool_is_whole()


@pytest.fixture(scope="session")
def smollm2_kquant(smollm2_gguf: Path, smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """`make(ftype) -> Path`: the default model re-quantised as llama.cpp's ftype would, once per
    session (each is ~100 MB and seconds to encode)."""
    root = tmp_path_factory.mktemp("smollm2_kquant")
    made: dict[str, Path] = {}
    tokenizers: list[TokenizerFields] = []   # the whole vocabulary, read once

    def make(ftype: str) -> Path:
        if ftype not in made:
            if not tokenizers:
                tokenizers.append(small_tokenizer(smollm2_gguf, 1 << 30))
            made[ftype] = write_gguf(smollm2_dir, root / f"SmolLM2-135M-Instruct.{ftype}.gguf", tokenizers[0],
                                     llama_cpp_mix(ftype, 30, tied=True))
        return made[ftype]

    return make


# SmolLM2's 576-wide rows are not whole super-blocks: they fall back (Q4_K -> Q5_0, Q5_K -> Q5_1,
# Q6_K -> Q8_0) as llama.cpp's do; only its 30 ffn_down (1536 wide) are K-quants.
_SMOLLM2_TYPES = {
    "Q4_K_M": ({"Q5_0": 166, "Q4_K": 16, "Q6_K": 14, "Q8_0": 15}, {"Q4_1": 16, "Q6_K": 14}),
    "Q5_K_M": ({"Q5_1": 166, "Q5_K": 16, "Q6_K": 14, "Q8_0": 15}, {"Q5_1": 16, "Q6_K": 14}),
    "Q6_K": ({"Q8_0": 181, "Q6_K": 30}, {"Q6_K": 30}),
}


@pytest.mark.parametrize("ftype", FTYPES)
def test_smollm2_kquant_matches_transformers(ftype: str, smollm2_kquant, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """SmolLM2 re-quantised as llama.cpp would: every tensor packs (in the _M mixes, q/k beside a
    Q8_0 v: two segments), the packed weights are the float32 weights bit for bit, the few-row
    fast path gives the float32 path's product within rounding, and greedy tokens equal
    transformers' on the same GGUF."""
    from transformers import AutoModelForCausalLM

    from kernels import quant

    monkeypatch.setenv("WEFT_CACHE_DIR", str(tmp_path / "cache"))
    gguf = smollm2_kquant(ftype)
    file_types, down_layouts = _SMOLLM2_TYPES[ftype]
    assert _tensor_types(gguf) == Counter(file_types)
    llm = LLM(str(gguf), dtype="float32", progress=False, num_blocks=64)
    packs = _assert_packed_exactly(llm)
    downs = packs[3::4]
    assert Counter(p.fmt for p in downs) == Counter({quant.FORMATS[k]: v for k, v in down_layouts.items()})
    assert sum(p.fmt == quant.FMT_SEGMENTS for p in packs[0::4]) == (0 if ftype == "Q6_K" else 14)
    model = llm.engine.model
    gen = torch.Generator().manual_seed(0)
    for p, w in [(downs[0], model.layers[0].projections()[3].weight), (packs[0], model.layers[0].projections()[0].weight)]:
        x = torch.randn(3, p.k, generator=gen)
        torch.testing.assert_close(quant.qmatmul(x, p), x @ w.T, rtol=1e-4, atol=1e-4)
    hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    prompt = llm.tokenizer.encode("The capital of France is")
    res = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert res[0].outputs[0].token_ids == hf_greedy(hf, prompt, 12)
    assert llm.engine.pool_is_whole()


def test_smollm2_llama_cpp_q4km_matches_transformers(smollm2_gguf: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A real llama.cpp Q4_K_M (when llama-cpp-python is installed, `make bench-peers`): the default
    model re-quantised from its Q4_1 by llama.cpp's own `llama_model_quantize` (its error-minimising
    search, not tests/kquants.py's min/max encoder). Same type mix as the recipe above, every
    projection packed and bit for bit the float32 weight, greedy tokens equal transformers'."""
    import ctypes

    from transformers import AutoModelForCausalLM

    from kernels import quant

    llama_cpp = pytest.importorskip("llama_cpp")
    monkeypatch.setenv("WEFT_CACHE_DIR", str(tmp_path / "cache"))
    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_K_M.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.allow_requantize = True   # the source is already Q4_1
    assert llama_cpp.llama_model_quantize(str(smollm2_gguf).encode(), str(gguf).encode(), ctypes.byref(params)) == 0
    file_types, down_layouts = _SMOLLM2_TYPES["Q4_K_M"]
    assert _tensor_types(gguf) == Counter(file_types)
    llm = LLM(str(gguf), dtype="float32", progress=False, num_blocks=64)
    packs = _assert_packed_exactly(llm)
    assert Counter(p.fmt for p in packs[3::4]) == Counter({quant.FORMATS[k]: v for k, v in down_layouts.items()})
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=gguf.name, dtype=torch.float32).eval()
    for text in ["The capital of France is", "def fibonacci(n):"]:
        prompt = llm.tokenizer.encode(text)
        res = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
        assert res[0].outputs[0].token_ids == hf_greedy(hf, prompt, 16)
    assert llm.engine.pool_is_whole()
