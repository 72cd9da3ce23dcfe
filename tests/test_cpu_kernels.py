"""The native CPU kernels (kernels/csrc, built with the system C compiler) equal their torch
references in float32; the engine falls back to the references when they cannot be built."""
from __future__ import annotations

import pytest
import torch

from kernels import cpu_native
from kernels.attention import AttentionMetadata, paged_attention_native, paged_attention_ref
from kernels.gguf_blocks import LAYOUT, random_rows
from tests.test_kernels import make_attention_batch, rel_err

pytestmark = pytest.mark.skipif(cpu_native.lib() is None, reason="no C compiler for the native kernels")


def _meta_for_rows(q_lens: list[int], seq_lens: list[int], tables: torch.Tensor, block_size: int) -> AttentionMetadata:
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    return AttentionMetadata(query_start_loc=starts, seq_lens=seq_lens, block_tables=tables,
                             seq_lens_t=torch.tensor(seq_lens, dtype=torch.long),
                             num_decodes=sum(1 for n in q_lens if n == 1), block_size=block_size)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
# Groups and head sizes compiled as constants (64, 128) and as variables (96; 40 takes the plain loop).
@pytest.mark.parametrize("group,block_size,head_dim",
                         [(1, 16, 64), (3, 16, 64), (3, 24, 64), (4, 32, 40), (8, 16, 128), (5, 16, 128), (2, 16, 96)])
def test_attention_matches_reference(group: int, block_size: int, head_dim: int, kv_dtype: torch.dtype) -> None:
    """float32 blocks, or bf16 ones (--kv-cache-dtype) read into the same float32 arithmetic: the
    reference is float64 attention over the blocks' exact values. head_dim 40 takes the plain loop."""
    torch.manual_seed(group * 100 + block_size + head_dim)
    num_kv_heads = 2
    # Decodes (one at a single key), short multi-query rows (speculative verification) and
    # long prefill chunks (left to SDPA), blocks scattered over the cache.
    dec = [1, 5, 16, 17, 300]
    pre = [(0, 3), (40, 5), (7, 16), (0, 40), (33, 70)]
    q, k_cache, v_cache, meta = make_attention_batch(dec, pre, group * num_kv_heads, num_kv_heads, head_dim,
                                                     block_size, torch.float32, "cpu")
    k_cache, v_cache = k_cache.to(kv_dtype), v_cache.to(kv_dtype)
    scale = head_dim ** -0.5
    ref = paged_attention_ref(q.double(), k_cache.double(), v_cache.double(), meta, scale)
    out = paged_attention_native(q, k_cache, v_cache, meta, scale)
    assert out.dtype == torch.float32 and out.shape == q.shape
    assert rel_err(out, ref) < 1e-6
    # As close to the float32 reference as that is to the float64 one.
    low = paged_attention_ref(q, k_cache, v_cache, meta, scale)
    assert (out - low).abs().max() < 1e-5


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
def test_attention_rows_do_not_depend_on_the_batch(kv_dtype: torch.dtype) -> None:
    """Each query's result is the same bits alone or in any batch: a speculative verify row's
    queries equal one-token decodes at their positions, and a long decode (split over the
    threads in chunks of keys) equals itself beside other rows; over bf16 blocks too."""
    torch.manual_seed(1)
    block_size, hkv, h, d = 16, 3, 9, 64
    q_lens, seq_lens = [5, 1, 1, 3], [300, 2100, 37, 70]
    nb = [-(-s // block_size) for s in seq_lens]
    perm = torch.randperm(sum(nb))
    tables = torch.zeros((len(seq_lens), max(nb)), dtype=torch.long)
    i = 0
    for r, n in enumerate(nb):
        tables[r, :n] = perm[i:i + n]
        i += n
    k_cache = torch.randn(sum(nb), block_size, hkv, d).to(kv_dtype)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(sum(q_lens), h, d)
    batch = paged_attention_native(q, k_cache, v_cache, _meta_for_rows(q_lens, seq_lens, tables, block_size), d ** -0.5)
    token = 0
    for r, (nq, n) in enumerate(zip(q_lens, seq_lens)):
        for i in range(nq):
            keys = n - nq + i + 1
            alone = paged_attention_native(q[token:token + 1], k_cache, v_cache,
                                           _meta_for_rows([1], [keys], tables[r:r + 1], block_size), d ** -0.5)
            assert torch.equal(alone, batch[token:token + 1]), (r, i)
            token += 1


def test_attention_any_row_order() -> None:
    """Rows need not be sorted: multi-query rows between decodes, as speculative batches come."""
    torch.manual_seed(0)
    q_lens, seq_lens = [3, 1, 16, 1, 20], [10, 50, 16, 33, 60]
    block_size, hkv, h, d = 16, 3, 9, 64
    nb = [-(-s // block_size) for s in seq_lens]
    perm = torch.randperm(sum(nb) + 4)
    tables = torch.zeros((len(seq_lens), max(nb)), dtype=torch.long)
    i = 0
    for r, n in enumerate(nb):
        tables[r, :n] = perm[i:i + n]
        i += n
    k_cache = torch.randn(sum(nb) + 4, block_size, hkv, d)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(sum(q_lens), h, d)
    meta = _meta_for_rows(q_lens, seq_lens, tables, block_size)
    ref_meta = _meta_for_rows(q_lens, seq_lens, tables, block_size)
    ref_meta.num_decodes = 0   # the reference assumes decodes lead; treat every row as a chunk
    ref = paged_attention_ref(q.double(), k_cache.double(), v_cache.double(), ref_meta, d ** -0.5)
    out = paged_attention_native(q, k_cache, v_cache, meta, d ** -0.5)
    assert rel_err(out, ref) < 1e-6


def test_disabled_by_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEFT_NATIVE", "0")
    assert not cpu_native.usable(torch.zeros(1))
    monkeypatch.setenv("WEFT_NATIVE", "1")
    assert cpu_native.usable(torch.zeros(1))
    assert not cpu_native.usable(torch.zeros(1, dtype=torch.bfloat16))


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(9, 3, 64), (4, 4, 40), (8, 2, 128)])
def test_rope_store_is_bit_identical(num_heads: int, num_kv_heads: int, head_dim: int, kv_dtype: torch.dtype) -> None:
    """q, and the k, v stored: float32 ones, or bf16 ones rounded as torch's .to(bfloat16) rounds."""
    from kernels.rope import StepRope, rope_store_native, rope_store_ref

    torch.manual_seed(num_heads + head_dim)
    t, blocks, bs = 37, 8, 16
    cos = torch.randn(200, head_dim)
    sin = torch.randn(200, head_dim)
    # A strided view, as the fused projection's output can be (a bias column sliced off, say).
    qkv = torch.randn(t, (num_heads + 2 * num_kv_heads) * head_dim + 3)[:, 3:]
    positions = torch.randint(0, 200, (t,))
    slots = torch.randperm(blocks * bs)[:t]
    slots[5] = -1   # padding: stores nothing
    caches = [torch.randn(blocks, bs, num_kv_heads, head_dim).to(kv_dtype) for _ in range(4)]
    keep = slots >= 0
    scratch = [torch.zeros_like(caches[0]) for _ in range(2)]
    q_ref = rope_store_ref(qkv, StepRope(cos, sin, positions), *scratch, slots.clamp(min=0),
                           num_heads, num_kv_heads, head_dim)
    rope_store_ref(qkv[keep], StepRope(cos, sin, positions[keep]), caches[0], caches[1], slots[keep],
                   num_heads, num_kv_heads, head_dim)
    before = [c.clone() for c in caches]
    q = rope_store_native(qkv, StepRope(cos, sin, positions), caches[2], caches[3], slots,
                          num_heads, num_kv_heads, head_dim)
    assert torch.equal(q, q_ref)
    for got, ref, old in ((caches[2], caches[0], before[2]), (caches[3], caches[1], before[3])):
        flat, flat_ref = got.view(-1, num_kv_heads, head_dim), ref.view(-1, num_kv_heads, head_dim)
        assert torch.equal(flat[slots[keep]], flat_ref[slots[keep]])
        untouched = torch.ones(blocks * bs, dtype=torch.bool)
        untouched[slots[keep]] = False
        assert torch.equal(flat[untouched], old.view(-1, num_kv_heads, head_dim)[untouched])


def test_add_rms_norm_matches_reference() -> None:
    from kernels.norm import add_rms_norm, rms_norm_ref

    torch.manual_seed(0)
    weight = torch.randn(576)
    for t in (1, 7, 32, 300):
        h, delta = torch.randn(t, 576) * 3, torch.randn(t, 576)
        h_native = h.clone()
        out = add_rms_norm(h_native, delta, weight, 1e-5)
        assert torch.equal(h_native, h + delta)           # the residual add is exact
        ref = rms_norm_ref(h + delta, weight, 1e-5)
        # Only the sum of squares is ordered differently: within a few float32 ulps.
        assert torch.allclose(out, ref, rtol=4e-7, atol=1e-7), (out - ref).abs().max()
        assert torch.equal(add_rms_norm(h.clone(), None, weight, 1e-5), add_rms_norm(h.clone(), None, weight, 1e-5))


def test_silu_mul_is_bit_identical() -> None:
    torch.manual_seed(0)
    for t in (1, 5, 32, 700):   # 700: a prefill chunk, the torch loop's MLP (cpu_native.silu_mul)
        gate_up = torch.randn(t, 3072) * 4
        gate_up[0, :8] = torch.tensor([-120.0, -100.0, -88.0, -20.0, 0.0, 30.0, 95.0, 120.0])
        out = cpu_native.silu_mul(gate_up, 1536)
        gate, up = gate_up.split(1536, dim=-1)
        assert torch.equal(out, torch.nn.functional.silu(gate) * up)


def test_argmax_rows_equal_torch_max() -> None:
    """Greedy tokens from the native kernel are torch.max's: the first of tied maxima, any row
    length (tails of fewer than 16), rows with a stride (a view of wider rows); a row with a NaN
    reports NaN, one with nothing but -inf reports -inf (the sampler fails both)."""
    torch.manual_seed(0)
    for b, v in ((1, 49152), (32, 49152), (3, 1000), (2, 17), (4, 5)):
        x = torch.randn(b, v) * 3
        if v > 9:
            x[-1, 9] = x[-1, 2] = x[-1].max() + 1   # a tie: index 2 wins
        values, tokens = cpu_native.argmax_rows(x)
        ref_values, ref_tokens = x.max(dim=-1)
        assert torch.equal(tokens, ref_tokens) and torch.equal(values, ref_values), (b, v)
    wide = torch.randn(6, 300)
    values, tokens = cpu_native.argmax_rows(wide[:, :257])
    assert torch.equal(tokens, wide[:, :257].max(dim=-1).indices)
    odd = torch.randn(3, 100)
    odd[0, 40] = float("nan")
    odd[1] = float("-inf")
    odd[2] = -0.0
    odd[2, 7] = 0.0   # +0 and -0 tie: the first index
    values, tokens = cpu_native.argmax_rows(odd)
    assert torch.isnan(values[0]) and values[1] == float("-inf") and tokens[1] == 0 and tokens[2] == 0


def test_bitmask_equals_the_reference() -> None:
    """Guided decoding's mask applied natively equals the torch reference: every row or chosen
    rows (any order), vocabularies that end mid-word, a mask wider than the vocabulary, words all
    ones (skipped), all zeros and mixed; logits that are already -inf stay so."""
    from kernels.mask import apply_token_bitmask_, apply_token_bitmask_ref_
    torch.manual_seed(0)
    for rows_n, vocab, extra in ((1, 49152, 0), (6, 49152, 0), (5, 1000, 2), (3, 33, 1), (2, 7, 0)):
        words = (vocab + 31) // 32 + extra
        logits = torch.randn(rows_n + 2, vocab)
        logits[0, 0] = float("-inf")
        mask = torch.randint(-2**31, 2**31 - 1, (rows_n + 2, words), dtype=torch.int32)
        mask[:, ::3] = -1
        mask[-1] = 0
        for rows in (None, torch.arange(rows_n).flip(0)):
            ours, ref = logits.clone(), logits.clone()
            apply_token_bitmask_(ours, mask, rows)
            apply_token_bitmask_ref_(ref, mask, rows)
            assert torch.equal(ours, ref), (rows_n, vocab, rows)


@pytest.mark.parametrize("bias,kv_dtype", [(False, torch.float32), (True, torch.float32), (False, torch.bfloat16)])
def test_native_layers_equal_the_python_loop(bias: bool, kv_dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """One native call for all layers gives bit-identical hidden states and KV to the layer loop
    (which uses the same kernels one by one and torch's matmuls), float32 or bf16 KV blocks."""
    from transformers import LlamaConfig

    import service.models.llama as llama

    if not cpu_native.has_sgemm():
        pytest.skip("this torch exports no sgemm_")
    torch.manual_seed(1 + bias)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=97, max_position_embeddings=512, attention_bias=bias)
    model = llama.LlamaForCausalLM(config, max_positions=512).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    # Decodes at various contexts and short multi-token rows (speculative verification).
    q_lens, seq_lens, block_size = [1, 3, 1, 16, 1], [1, 40, 17, 70, 300], 16
    nb = [-(-s // block_size) for s in seq_lens]
    perm = torch.randperm(sum(nb) + 3)
    tables = torch.zeros((len(seq_lens), max(nb)), dtype=torch.long)
    i = 0
    for r, n in enumerate(nb):
        tables[r, :n] = perm[i:i + n]
        i += n
    positions = torch.cat([torch.arange(s - n, s) for n, s in zip(q_lens, seq_lens)])
    slots = torch.cat([tables[r, torch.arange(s - n, s) // block_size] * block_size + torch.arange(s - n, s) % block_size
                       for r, (n, s) in enumerate(zip(q_lens, seq_lens))])
    ids = torch.randint(0, 97, (sum(q_lens),))
    kv = torch.randn(3, 2, sum(nb) + 3, block_size, 2, 16).to(kv_dtype)

    def run(native: bool) -> tuple[torch.Tensor, torch.Tensor]:
        cache = kv.clone()
        caches = [(cache[i, 0], cache[i, 1]) for i in range(3)]
        meta = _meta_for_rows(q_lens, seq_lens, tables, block_size)
        with monkeypatch.context() as m:
            if not native:
                m.setattr(model, "native", lambda *a: None)
            out = model(ids, positions, caches, slots, meta)
            if native:   # the model really took the native path
                assert torch.equal(model.native(model, model.embed_tokens(ids), positions,
                                                [(c.clone(), v.clone()) for c, v in caches], slots, meta), out)
        return out, cache

    steps = model.native.steps
    (out, cache), (ref, ref_cache) = run(True), run(False)
    assert model.native.steps == steps + 2   # the model's own call and the check's
    assert torch.equal(out, ref)
    assert torch.equal(cache, ref_cache)


# ---- GGUF-block matmuls (kernels/quant.py, kernels/csrc/cpu_qmatmul.c) -----------------------

GGUF_TYPES = list(LAYOUT)


def _shapes(gguf_type: str) -> list[tuple[int, int]]:
    """[n, k] to test: K-quants come in rows of whole 256-weight super-blocks."""
    return [(37, 256), (301, 768), (5, 1536)] if gguf_type.endswith("_K") else [(37, 64), (301, 576), (5, 1536)]


@pytest.mark.parametrize("gguf_type", GGUF_TYPES)
@pytest.mark.parametrize("m", [1, 2, 5, 8, 9])
def test_qmatmul_matches_linear_on_dequantized(gguf_type: str, m: int) -> None:
    from kernels import quant

    gen = torch.Generator().manual_seed(GGUF_TYPES.index(gguf_type) * 10 + m)
    for n, k in _shapes(gguf_type):
        p = quant.from_gguf_blocks(random_rows(gguf_type, n, k, gen), gguf_type, k)
        x = torch.randn(m, k, generator=gen)
        w = quant.dequantize(p)
        assert torch.isfinite(w).all()
        ref = torch.nn.functional.linear(x.double(), w.double())
        out = quant.qmatmul(x, p)
        assert out.shape == (m, n) and out.dtype == torch.float32
        # float32 accumulation in another order than sgemm: compare at float32 rounding of the
        # terms' magnitude (sum |x| |w|), not of the (cancelling) result.
        mag = torch.nn.functional.linear(x.double().abs(), w.double().abs())
        assert ((out.double() - ref).abs() <= 1e-5 * mag + 1e-6).all()
        torch.testing.assert_close(out, torch.nn.functional.linear(x, w), rtol=1e-4, atol=1e-4 * mag.max().item())


@pytest.mark.parametrize("gguf_type", ["Q8_0", "Q4_1", "Q5_K", "Q6_K"])
def test_qmatmul_rows_do_not_depend_on_the_batch(gguf_type: str) -> None:
    """A row's result is bit-identical whether it is alone or one of many rows (at any place):
    a speculative verify row computes what the plain decode of its token would."""
    from kernels import quant

    gen = torch.Generator().manual_seed(20 + GGUF_TYPES.index(gguf_type))
    p = quant.from_gguf_blocks(random_rows(gguf_type, 45, 256, gen), gguf_type, 256)
    x = torch.randn(11, 256, generator=gen)
    alone = torch.cat([quant.qmatmul(x[i:i + 1], p) for i in range(11)])
    for m in (2, 5, 8, 11):
        assert torch.equal(quant.qmatmul(x[:m], p), alone[:m])
    assert torch.equal(quant.qmatmul(x[3:10], p), alone[3:10])


@pytest.mark.skipif(not cpu_native.has_amx(), reason="no AMX here (or the kernels were built without it)")
@pytest.mark.parametrize("gguf_type", GGUF_TYPES)
def test_qmatmul_amx_matches_matmul_in_bf16(gguf_type: str) -> None:
    """bf16 mode's steps of many rows on AMX tiles: x and the de-quantised weights rounded to bf16
    (as torch rounds them), their products summed in float32; every m-block count (1, 2, 3 blocks
    of 16 rows, partial ones), a fused tensor of two layouts. Rows that are not whole tiles of 16
    weights, and FMT_BF16 (MKL's GEMM reads those bits), are refused."""
    from kernels import quant

    gen = torch.Generator().manual_seed(40 + GGUF_TYPES.index(gguf_type))
    k_big = 768 if gguf_type.endswith("_K") else 576
    for n, k in [(48, 256), (304, k_big)]:
        p = quant.from_gguf_blocks(random_rows(gguf_type, n, k, gen), gguf_type, k)
        w16 = quant.dequantize(p).bfloat16().double()
        for m in (1, 16, 17, 33, 40, 100):
            x = torch.randn(m, k, generator=gen)
            assert quant.amx_usable(x, p)
            out = quant.qmatmul_amx(x, p)
            ref = torch.nn.functional.linear(x.bfloat16().double(), w16)
            mag = torch.nn.functional.linear(x.bfloat16().double().abs(), w16.abs())
            assert out.shape == (m, n) and ((out.double() - ref).abs() <= 1e-5 * mag + 1e-6).all(), (n, k, m)
            # Past 32 rows the weights are de-quantised once and every pass reads them back: each
            # row's sums stay those of the row multiplied alone, bit for bit (batch invariance:
            # a prefill chunk's rows and a decode's, a verify row and a plain one).
            for i in {0, m // 2, m - 1}:
                assert torch.equal(out[i:i + 1], quant.qmatmul_amx(x[i:i + 1], p)), (n, k, m, i)
    odd = quant.from_gguf_blocks(random_rows(gguf_type, 40, 256, gen), gguf_type, 256)
    assert not quant.amx_usable(torch.randn(20, 256), odd)   # 40 rows: not whole tiles
    with pytest.raises(RuntimeError, match="weft_qmatmul_amx failed"):
        quant.qmatmul_amx(torch.randn(20, 256, generator=gen), odd)
    assert not quant.amx_usable(torch.randn(20, 64), quant.from_bf16(torch.randn(16, 64)))


@pytest.mark.skipif(not cpu_native.has_amx(), reason="no AMX here (or the kernels were built without it)")
def test_qmatmul_amx_segments() -> None:
    from kernels import quant

    gen = torch.Generator().manual_seed(5)
    types, rows = ["Q4_K", "Q6_K"], [48, 32]
    p = quant.from_gguf_blocks([random_rows(t, n, 512, gen) for t, n in zip(types, rows)], types, 512)
    assert p.fmt == quant.FMT_SEGMENTS
    x = torch.randn(20, 512, generator=gen)
    w16 = quant.dequantize(p).bfloat16().double()
    ref = torch.nn.functional.linear(x.bfloat16().double(), w16)
    mag = torch.nn.functional.linear(x.bfloat16().double().abs(), w16.abs())
    assert ((quant.qmatmul_amx(x, p).double() - ref).abs() <= 1e-5 * mag + 1e-6).all()


def test_dequantize_matches_gguf_py() -> None:
    """Our torch de-quantiser computes what gguf-py's (transformers' loader) does, bit for bit."""
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    from kernels import gguf_blocks, quant

    gen = torch.Generator().manual_seed(3)
    for gguf_type in GGUF_TYPES:
        blocks = random_rows(gguf_type, 7, 512, gen)
        ref = gguf_dequantize(blocks.numpy(), GGMLQuantizationType[gguf_type])
        ref = torch.from_numpy(np.asarray(ref, dtype=np.float32)).reshape(7, 512)
        p = quant.from_gguf_blocks(blocks, gguf_type, 512)
        assert p.fmt == quant.FORMATS[gguf_blocks.LAYOUT[gguf_type]]
        assert torch.equal(quant.dequantize(p), ref), gguf_type


def test_mixed_types_pack_as_segments() -> None:
    """A fused tensor of Q4_K, Q4_0 and Q6_K parts (as Q4_K_M's q, k, v can be): the first two
    share the Q4_1 layout, the third is its own segment; de-quantised, the rows of each part as
    gguf-py gives them; the product equals F.linear on those weights within rounding."""
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    from kernels import quant

    gen = torch.Generator().manual_seed(4)
    types, rows = ["Q4_K", "Q4_0", "Q6_K"], [48, 16, 33]
    parts = [random_rows(t, n, 512, gen) for t, n in zip(types, rows)]
    p = quant.from_gguf_blocks(parts, types, 512)
    assert p.fmt == quant.FMT_SEGMENTS and p.n == sum(rows)
    assert [(s.fmt, s.n) for s in p.segments] == [(quant.FMT_Q4_1, 64), (quant.FMT_Q6_K, 33)]
    ref = torch.cat([torch.from_numpy(np.asarray(gguf_dequantize(b.numpy(), GGMLQuantizationType[t]),
                                                 dtype=np.float32)).reshape(-1, 512) for b, t in zip(parts, types)])
    w = quant.dequantize(p)
    assert torch.equal(w, ref)
    for native in ("1", "0"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("WEFT_NATIVE", native)
            assert quant.equals_weight(p, w)
            bumped = w.clone()
            bumped[80, 300] = torch.nextafter(bumped[80, 300], torch.tensor(float("inf")))
            assert not quant.equals_weight(p, bumped)
    x = torch.randn(3, 512, generator=gen)
    torch.testing.assert_close(quant.qmatmul(x, p), torch.nn.functional.linear(x, w), rtol=1e-4, atol=1e-4)


def test_default_model_packs_every_projection(smollm2_gguf) -> None:
    """Every projection of the default model and its tied lm_head pack; each packed tensor
    de-quantises to the float32 weight exactly (attach_packed drops any that does not)."""
    from service.models.build import build_model
    from service.loader import load_model
    from kernels import quant

    loaded = load_model(smollm2_gguf, progress=False)
    model, _ = build_model(loaded, torch.device("cpu"), torch.float32)
    projections = [m for layer in model.layers for m in layer.projections()]
    assert all(m.packed is not None for m in projections)
    assert model.lm_head_packed is not None and model.lm_head_packed.fmt == quant.FMT_Q8_0
    for m in projections[:4] + projections[-4:]:
        assert torch.equal(quant.dequantize(m.packed), m.weight)
    assert torch.equal(quant.dequantize(model.lm_head_packed), model.embed_tokens.weight)
    # Few rows: the packed lm_head; the logits equal the float32 ones within rounding.
    hidden = torch.randn(3, model.config.hidden_size)
    torch.testing.assert_close(model.compute_logits(hidden), hidden @ model.embed_tokens.weight.T,
                               rtol=1e-4, atol=1e-4)


def test_native_layers_with_packed_weights_match_the_python_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """With GGUF blocks attached, the native loop's few-row steps multiply from them: equal to
    the float32 loop within rounding; WEFT_PACKED=0 gives the bit-identical float32 path back."""
    from transformers import LlamaConfig

    import service.models.llama as llama
    from kernels import quant

    if not cpu_native.has_sgemm():
        pytest.skip("this torch exports no sgemm_")
    gen = torch.Generator().manual_seed(5)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=97, max_position_embeddings=512, attention_bias=True)
    model = llama.LlamaForCausalLM(config, max_positions=512).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3, generator=gen)
        for layer in model.layers:
            for i, mod in enumerate(layer.projections()):
                n, k = mod.weight.shape
                t = "Q4_1" if i % 2 == 0 else "Q8_0"
                mod.packed = quant.from_gguf_blocks(random_rows(t, n, k, gen), t, k)
                mod.weight.copy_(quant.dequantize(mod.packed))
    q_lens, seq_lens, block_size = [1, 5, 1], [1, 40, 300], 16
    nb = [-(-s // block_size) for s in seq_lens]
    perm = torch.randperm(sum(nb), generator=gen)
    table = torch.zeros((len(seq_lens), max(nb)), dtype=torch.long)
    i = 0
    for r, n in enumerate(nb):
        table[r, :n] = perm[i:i + n]
        i += n
    positions = torch.cat([torch.arange(s - n, s) for n, s in zip(q_lens, seq_lens)])
    slots = torch.cat([table[r, torch.arange(s - n, s) // block_size] * block_size + torch.arange(s - n, s) % block_size
                       for r, (n, s) in enumerate(zip(q_lens, seq_lens))])
    ids = torch.randint(0, 97, (sum(q_lens),), generator=gen)
    kv = torch.randn(2, 2, sum(nb), block_size, 2, 16, generator=gen)

    def run(native: bool, packed: bool) -> torch.Tensor:
        cache = kv.clone()
        caches = [(cache[i, 0], cache[i, 1]) for i in range(2)]
        with monkeypatch.context() as m:
            m.setenv("WEFT_PACKED", "1" if packed else "0")
            if not native:
                m.setattr(model, "native", lambda *a: None)
            return model(ids, positions, caches, slots, _meta_for_rows(q_lens, seq_lens, table, block_size))

    ref = run(native=False, packed=False)
    assert torch.equal(run(native=True, packed=False), ref)
    out = run(native=True, packed=True)
    assert not torch.equal(out, ref)   # the packed path really ran
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("gguf_type", ["Q8_0", "Q4_1", "Q5_0", "Q4_K", "Q5_K", "Q6_K"])
def test_load_check_finds_any_differing_weight(gguf_type: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The native load-time check agrees with torch.equal(dequantize(p), w), to the last bit."""
    from kernels import quant

    gen = torch.Generator().manual_seed(11 + GGUF_TYPES.index(gguf_type))
    p = quant.from_gguf_blocks(random_rows(gguf_type, 33, 256, gen), gguf_type, 256)
    w = quant.dequantize(p)
    for native in ("1", "0"):
        monkeypatch.setenv("WEFT_NATIVE", native)
        assert quant.equals_weight(p, w)
        for i, j in [(0, 0), (32, 255), (17, 40)]:
            bumped = w.clone()
            bumped[i, j] = torch.nextafter(bumped[i, j], torch.tensor(float("inf")))
            assert not quant.equals_weight(p, bumped)
        assert not quant.equals_weight(p, w[:, :128])


# ---- bf16 weights (FMT_BF16: a CPU model loaded with dtype bfloat16, service/models/bf16_packed.py) ----


@pytest.mark.parametrize("k", [32, 96, 160, 288])   # odd multiples of 32: the kernel's odd-block tail
def test_bf16_qmatmul_matches_matmul_on_bf16_weights(k: int) -> None:
    """x @ W^T from the weight's bf16 bits equals torch.matmul(x, w_bf16.float().T) within
    float32 rounding (as the GGUF layouts do), for 1..40 rows; each row as it is alone."""
    from kernels import quant

    gen = torch.Generator().manual_seed(k)
    w = torch.randn(53, k, generator=gen)
    p = quant.from_bf16(w)
    assert p.fmt == quant.FMT_BF16 and p.data.shape == (53, 2 * k)
    wb = w.bfloat16().float()
    x = torch.randn(40, k, generator=gen)
    alone = torch.cat([quant.qmatmul(x[i:i + 1], p) for i in range(40)])
    for m in range(1, 41):
        out = quant.qmatmul(x[:m], p)
        assert out.shape == (m, 53) and out.dtype == torch.float32
        ref = torch.matmul(x[:m].double(), wb.double().T)
        mag = torch.matmul(x[:m].double().abs(), wb.double().abs().T)
        assert ((out.double() - ref).abs() <= 1e-5 * mag + 1e-6).all(), m
        torch.testing.assert_close(out, torch.matmul(x[:m], wb.T), rtol=1e-4, atol=1e-4 * mag.max().item())
        assert torch.equal(out, alone[:m])


def test_bf16_load_check_and_dequantize(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bf16 copy de-quantises to the bf16-rounded weight exactly; the load check (native and
    torch) accepts exactly that weight, not the unrounded one nor a one-ulp change."""
    from kernels import quant

    gen = torch.Generator().manual_seed(7)
    w = torch.randn(33, 160, generator=gen)
    p = quant.from_bf16(w)
    wb = w.bfloat16().float()
    assert torch.equal(quant.dequantize(p), wb)
    for native in ("1", "0"):
        monkeypatch.setenv("WEFT_NATIVE", native)
        assert quant.equals_weight(p, wb)
        assert not quant.equals_weight(p, w)
        bumped = wb.clone()
        bumped[32, 159] = torch.nextafter(bumped[32, 159], torch.tensor(float("inf")))
        assert not quant.equals_weight(p, bumped)
        assert not quant.equals_weight(p, wb[:, :128])
