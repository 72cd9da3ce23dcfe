"""Every Triton kernel equals its torch reference on fresh random inputs.

On a CUDA machine the checks run in this process at full size. Without CUDA they run under
the Triton interpreter (small shapes) in ONE subprocess started with TRITON_INTERPRET=1
(the variable must be set before triton is imported, and setting it here would leak into the
other test modules of the session); each test below then reports its own case's outcome.
Outputs are poisoned (NaN / -1 / random cache contents) before each call, so an element the
kernel does not write shows up as a mismatch.

Run the interpreter checks by hand: TRITON_INTERPRET=1 python -m tests.test_kernels [case ...]
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from kernels.attention import AttentionMetadata, paged_attention_ref
from kernels.kv_store import store_kv_ref
from kernels.mask import apply_token_bitmask_ref_
from kernels.sampling import kept_mask_ref, order_key, sample_tokens_ref, uniforms_ref

ROOT = Path(__file__).resolve().parent.parent
CUDA = torch.cuda.is_available()


def _triton_importable() -> bool:
    try:
        import importlib.util
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


# ---- inputs -------------------------------------------------------------------------------------

def make_attention_batch(
    dec_lens: list[int], prefills: list[tuple[int, int]], num_heads: int, num_kv_heads: int,
    head_dim: int, block_size: int, dtype: torch.dtype, device: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Decode rows (one query over seq_len keys), then prefill rows (context, new queries),
    their blocks scattered at random over a cache with spare blocks."""
    seq_lens = list(dec_lens) + [c + n for c, n in prefills]
    q_lens = [1] * len(dec_lens) + [n for _, n in prefills]
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    nblocks = [-(-s // block_size) for s in seq_lens]
    total = sum(nblocks) + 5
    perm = torch.randperm(total)
    tables = torch.zeros((len(seq_lens), max(nblocks) + 1), dtype=torch.long)
    i = 0
    for r, n in enumerate(nblocks):
        tables[r, :n] = perm[i:i + n]
        i += n
    k_cache = torch.randn(total, block_size, num_kv_heads, head_dim, device=device).to(dtype)
    v_cache = torch.randn(total, block_size, num_kv_heads, head_dim, device=device).to(dtype)
    q = torch.randn(starts[-1], num_heads, head_dim, device=device).to(dtype)
    meta = AttentionMetadata(
        query_start_loc=starts, seq_lens=seq_lens, block_tables=tables.to(device),
        seq_lens_t=torch.tensor(seq_lens, dtype=torch.long, device=device),
        num_decodes=len(dec_lens), block_size=block_size,
    )
    return q, k_cache, v_cache, meta


def _poison_outside_window(k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                           window: int) -> None:
    """NaN into every cache block that lies wholly before the window of each row's first query
    (and that no other row reads), so an implementation that loads one shows NaN."""
    bs = meta.block_size
    needed: set[int] = {0}   # block 0 pads the tables: it may be loaded under a mask
    before: set[int] = set()
    for r, seq_len in enumerate(meta.seq_lens):
        num_q = meta.query_start_loc[r + 1] - meta.query_start_loc[r]
        first = max(0, seq_len - num_q - window + 1) // bs
        blocks = meta.block_tables[r, :-(-seq_len // bs)].tolist()
        before.update(blocks[:first])
        needed.update(blocks[first:])
    for b in before - needed:
        k_cache[b] = float("nan")
        v_cache[b] = float("nan")


def _rand_lens(n: int, lo: int, hi: int) -> list[int]:
    return torch.randint(lo, hi, (n,)).tolist()


# ---- checks (each raises AssertionError on a mismatch) ------------------------------------------

def check_store_kv(device: str, full: bool, block_size: int, num_kv_heads: int, cache_dtype: torch.dtype) -> None:
    from kernels.triton_kv_store import store_kv_triton

    head_dim = 128 if full else 32
    num_tokens = 777 if full else 37
    num_blocks = -(-num_tokens // block_size) + 4
    src_dtype = torch.float32 if cache_dtype == torch.float32 else torch.bfloat16
    # key/value as the model makes them: views into one fused qkv projection (strided).
    qkv = torch.randn(num_tokens, 3 * num_kv_heads * head_dim, device=device).to(src_dtype)
    k, v = qkv[:, num_kv_heads * head_dim:].split(num_kv_heads * head_dim, dim=1)
    k = k.view(num_tokens, num_kv_heads, head_dim)
    v = v.view(num_tokens, num_kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size, device=device)[:num_tokens]
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, device=device).to(cache_dtype)
    v_cache = torch.randn_like(k_cache)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv_ref(k, v, k_ref, v_ref, slots)
    store_kv_triton(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_ref), "key cache differs"
    assert torch.equal(v_cache, v_ref), "value cache differs"
    # A negative slot (padding) is skipped and writes nothing.
    before = k_cache.clone()
    store_kv_triton(k[:3], v[:3], k_cache, v_cache, torch.tensor([-1, -1, -1], device=device))
    assert torch.equal(k_cache, before)


def check_attention(device: str, full: bool, group: int, block_size: int, dtype: torch.dtype,
                    layout: str = "mixed", num_splits: int | None = None, head_dim: int | None = None,
                    via_dispatch: bool = False, window: int | None = None, softcap: float | None = None) -> None:
    from kernels.triton_attention import paged_attention_triton

    num_kv_heads = 8 if full else (1 if group == 8 else 2)
    num_heads = group * num_kv_heads
    head_dim = head_dim or (128 if full else 32)
    if full:
        dec = _rand_lens(48, 1, 2500)
        pre = [(c, n) for c, n in zip(_rand_lens(6, 0, 1500), _rand_lens(6, 1, 300))] + [(0, 257)]
    else:
        dec = _rand_lens(4, 1, 90) + [block_size, block_size + 1]
        pre = [(0, 19), (int(torch.randint(1, 60, ())), 23), (block_size * 2, 5)]
    if layout == "decode":
        pre = []
    elif layout == "prefill":
        dec = []
    q, k_cache, v_cache, meta = make_attention_batch(dec, pre, num_heads, num_kv_heads, head_dim,
                                                     block_size, dtype, device)
    scale = head_dim ** -0.5
    if window is not None:
        # Blocks wholly before every query's window must not be read: poison them.
        _poison_outside_window(k_cache, v_cache, meta, window)
    if softcap is not None:
        q = q * 4   # scores large enough for the cap to bend them
    ref = paged_attention_ref(q.double(), k_cache.double(), v_cache.double(), meta, scale, window, softcap)
    ref_low = paged_attention_ref(q, k_cache, v_cache, meta, scale, window, softcap)
    if via_dispatch:
        from kernels.attention import paged_attention
        out = paged_attention(q, k_cache, v_cache, meta, scale, window=window, softcap=softcap)
    else:
        out = torch.full_like(q, float("nan"))
        paged_attention_triton(q, k_cache, v_cache, meta, scale, out=out, num_splits=num_splits,
                               window=window, softcap=softcap)
    assert not torch.isnan(out).any(), "unwritten (NaN) output elements"
    err, err_low = rel_err(out, ref), rel_err(ref_low, ref)
    # float32: float32 rounding; bf16: within bf16 tolerance and no worse than the torch reference x3.
    tol = 1e-5 if dtype == torch.float32 else max(1e-2, 3 * err_low)
    assert err < tol, f"relative error {err:.3g} (torch reference in {dtype}: {err_low:.3g}, tol {tol:.3g})"


def check_mask(device: str, full: bool, dtype: torch.dtype, with_rows: bool) -> None:
    from kernels.mask import apply_token_bitmask_triton_

    num_rows, vocab = (64, 128_256) if full else (6, 1000)
    words = -(-vocab // 32)
    logits = torch.randn(num_rows, vocab, device=device).to(dtype)
    bitmask = torch.randint(-2**31, 2**31 - 1, (num_rows, words), dtype=torch.int32, device=device)
    bitmask[0] = 0                                  # all banned
    bitmask[1] = -1                                 # all allowed
    rows = torch.tensor([0, 2, num_rows - 1], device=device) if with_rows else None
    ref = logits.clone()
    apply_token_bitmask_ref_(ref, bitmask, rows)
    apply_token_bitmask_triton_(logits, bitmask, rows)
    assert torch.equal(logits, ref)


def _sampling_inputs(device: str, full: bool) -> tuple[torch.Tensor, ...]:
    num_rows, vocab = (256, 128_256) if full else (24, 1000)
    logits = torch.randn(num_rows, vocab, device=device) * 4
    logits[:, :7] = logits[:, 7:14]                                  # exact ties
    logits[-1, ::3] = float("-inf")                                  # a guided-decoding row
    temperature = torch.rand(num_rows, device=device) * 1.5 + 0.1
    top_k = torch.randint(1, 300, (num_rows,), device=device)
    top_p = torch.rand(num_rows, device=device) * 0.9 + 0.05
    kinds = torch.arange(num_rows, device=device) % 6
    temperature[kinds == 0] = 0.0                                     # greedy
    top_k[(kinds == 1) | (kinds == 3)] = 0                            # no top-k
    top_p[(kinds == 1) | (kinds == 2)] = 1.0                          # no top-p
    top_k[kinds == 5] = vocab                                         # top-k off by size
    seeds = torch.randint(0, 2**62, (num_rows,), device=device)
    positions = torch.randint(0, 10_000, (num_rows,), device=device)
    return logits, temperature, top_k, top_p, seeds, positions


def _race_scores(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                 seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    z = logits / temperature.clamp_min(1e-5)[:, None]
    g = -torch.log(-torch.log(uniforms_ref(seeds, positions, logits.shape[1])))
    kept = kept_mask_ref(z, top_k, top_p)
    return torch.where(kept, z + g, torch.full_like(z, float("-inf")))


def check_sampling(device: str, full: bool) -> None:
    from kernels.triton_sampling import sample_tokens_triton, uniforms_triton

    logits, temperature, top_k, top_p, seeds, positions = _sampling_inputs(device, full)
    vocab = logits.shape[1]
    assert torch.equal(uniforms_triton(seeds, positions, vocab), uniforms_ref(seeds, positions, vocab)), \
        "the counter-based uniforms differ"
    ref = sample_tokens_ref(logits, temperature, top_k, top_p, seeds, positions)
    out = torch.full_like(ref, -1)
    sample_tokens_triton(logits, temperature, top_k, top_p, seeds, positions, out=out)
    greedy = temperature < 1e-5
    assert torch.equal(out[greedy], ref[greedy]), "greedy rows differ"
    bad = (out != ref).nonzero().flatten().tolist()
    # A sampled row may differ only where float rounding decides: the top-p boundary within
    # 1e-4 of p, or two race scores within 1e-4. Check that each differing row is such a case.
    for r in bad:
        sl = slice(r, r + 1)
        ok = False
        for scale in (1 - 1e-4, 1.0, 1 + 1e-4):
            p = (top_p[sl] * scale).clamp(max=1.0)
            s = _race_scores(logits[sl], temperature[sl], top_k[sl], p, seeds[sl], positions[sl])[0]
            ok |= bool(s[out[r]] >= s.max() - 1e-4 * (1 + s.max().abs()))
        assert ok, f"row {r}: kernel drew {int(out[r])}, reference {int(ref[r])}, not a rounding tie"
    assert len(bad) <= max(1, len(ref) // 50), f"{len(bad)} rows differ"
    # Reproducible per request: the same (seed, position) in another batch slot, next to other
    # rows, draws the same token.
    perm = torch.randperm(len(ref), device=device)
    out2 = sample_tokens_triton(logits[perm], temperature[perm], top_k[perm], top_p[perm],
                                seeds[perm], positions[perm])
    assert torch.equal(out2, out[perm]), "a row's token depends on its batch slot"


# ---- the case list (names are the pytest ids) ---------------------------------------------------

def _cases() -> dict[str, Callable[[str, bool], None]]:
    cases: dict[str, Callable[[str, bool], None]] = {}
    for bs in (16, 32):
        for hkv in (1, 8):
            for cd in (torch.float32, torch.bfloat16):
                cases[f"store_kv-bs{bs}-hkv{hkv}-{str(cd)[6:]}"] = (
                    lambda d, f, bs=bs, hkv=hkv, cd=cd: check_store_kv(d, f, bs, hkv, cd))
    for group in (1, 3, 8):
        for bs in (16, 32):
            for dt in (torch.float32, torch.bfloat16):
                cases[f"attention-g{group}-bs{bs}-{str(dt)[6:]}"] = (
                    lambda d, f, g=group, bs=bs, dt=dt: check_attention(d, f, g, bs, dt))
    cases["attention-decode-only-splits3"] = lambda d, f: check_attention(
        d, f, 3, 16, torch.bfloat16, layout="decode", num_splits=3)
    cases["attention-decode-only-splits5-f32"] = lambda d, f: check_attention(
        d, f, 8, 32, torch.float32, layout="decode", num_splits=5)
    cases["attention-prefill-only-hd40"] = lambda d, f: check_attention(
        d, f, 3, 16, torch.float32, layout="prefill", head_dim=40)
    cases["attention-dispatch"] = lambda d, f: check_attention(d, f, 3, 16, torch.bfloat16, via_dispatch=True)
    for dt in (torch.float32, torch.bfloat16):
        cases[f"attention-window-{str(dt)[6:]}"] = lambda d, f, dt=dt: check_attention(
            d, f, 3, 16, dt, window=37 if not f else 700)
        cases[f"attention-softcap-{str(dt)[6:]}"] = lambda d, f, dt=dt: check_attention(d, f, 1, 32, dt, softcap=5.0)
    cases["attention-window-softcap-decode-splits3"] = lambda d, f: check_attention(
        d, f, 8, 16, torch.float32, layout="decode", num_splits=3, window=21 if not f else 500, softcap=8.0)
    cases["attention-window-dispatch"] = lambda d, f: check_attention(
        d, f, 3, 32, torch.bfloat16, via_dispatch=True, window=40 if not f else 900)
    for dt in (torch.float32, torch.bfloat16):
        for with_rows in (False, True):
            cases[f"mask-{str(dt)[6:]}-{'rows' if with_rows else 'all'}"] = (
                lambda d, f, dt=dt, w=with_rows: check_mask(d, f, dt, w))
    cases["sampling"] = check_sampling
    return cases


CASES = _cases()


def run_cases(names: list[str], device: str, full: bool) -> dict[str, str | None]:
    """name -> None (passed) or the failure's traceback."""
    results: dict[str, str | None] = {}
    for name in names:
        torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
        t0 = time.perf_counter()
        try:
            CASES[name](device, full)
            results[name] = None
        except Exception:  # noqa: BLE001 - reported to the parent process
            results[name] = traceback.format_exc()
        print(f"{name}: {'ok' if results[name] is None else 'FAIL'} {time.perf_counter() - t0:.2f}s",
              file=sys.stderr)
    return results


@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, str | None]:
    env = {**os.environ, "TRITON_INTERPRET": "1", "WEFT_FORCE_TRITON": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "tests.test_kernels"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"interpreter run failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(lines[-1])


@pytest.mark.skipif(not _triton_importable(), reason="triton is not installed")
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference(name: str, request: pytest.FixtureRequest) -> None:
    if CUDA:
        torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
        CASES[name]("cuda", True)
        torch.cuda.synchronize()
        return
    err = request.getfixturevalue("interpreter_results")[name]
    assert err is None, err


# ---- ahead-of-time compilation for Hopper (no GPU needed) ---------------------------------------

def _compile_sm90(fn, types: dict[str, str], consts: dict, num_warps: int = 4, num_stages: int = 3) -> str:
    """PTX of `fn` compiled for sm_90 with the JIT's usual 16-divisibility of pointers and strides."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n not in consts and (sig[n].startswith("*") or n.startswith("stride"))}
    src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in consts.items()}, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": True})
    return kernel.asm["ptx"]


@pytest.mark.skipif(not _triton_importable(), reason="triton is not installed")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="kernels are interpreted")
def test_kernels_compile_for_hopper() -> None:
    """Every kernel compiles for sm_90 (the interpreter does not type-check like the compiler),
    and the decode kernel reads K/V with 16-byte asynchronous copies and bf16 tensor-core MMAs."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        pytest.skip(f"this triton has no ahead-of-time API: {e}")
    from kernels import mask, triton_attention as ta, triton_kv_store as tk, triton_sampling as ts

    attn = dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", o_ptr="*bf16", bt_ptr="*i64", seq_lens_ptr="*i64",
                tiles_ptr="*i32", part_o_ptr="*fp32", part_ml_ptr="*fp32", scale_log2="fp32",
                cap_scale="fp32", cap_log2="fp32")
    for split in (False, True):
        ptx = _compile_sm90(ta._attn_kernel, attn, dict(
            HEAD_DIM=128, D_PAD=128, G=4, BLOCK_M=16, BLOCK_Q=1, BLOCK_N=ta.DECODE_BLOCK_N, PAGE=16,
            DECODE=True, SPLIT=split, F32_DOT=False), ta.DECODE_WARPS, ta.DECODE_STAGES)
        assert "cp.async.cg.shared.global" in ptx and ", 0x10" in ptx, "K/V loads are not 16-byte async copies"
        assert "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in ptx
    _compile_sm90(ta._attn_kernel, {**attn, "q_ptr": "*fp32", "o_ptr": "*fp32"}, dict(
        HEAD_DIM=64, D_PAD=64, G=3, BLOCK_M=64, BLOCK_Q=21, BLOCK_N=ta.PREFILL_BLOCK_N, PAGE=32,
        DECODE=False, SPLIT=False, F32_DOT=True), ta.PREFILL_WARPS, ta.PREFILL_STAGES)
    _compile_sm90(ta._attn_kernel, attn, dict(
        HEAD_DIM=128, D_PAD=128, G=8, BLOCK_M=64, BLOCK_Q=8, BLOCK_N=ta.PREFILL_BLOCK_N, PAGE=16,
        DECODE=False, SPLIT=False, F32_DOT=False), ta.PREFILL_WARPS, ta.PREFILL_STAGES)
    _compile_sm90(ta._attn_kernel, {**attn, "q_ptr": "*fp32", "o_ptr": "*fp32"}, dict(
        HEAD_DIM=64, D_PAD=64, G=2, BLOCK_M=64, BLOCK_Q=32, BLOCK_N=ta.PREFILL_BLOCK_N, PAGE=16,
        DECODE=False, SPLIT=False, F32_DOT=False, WINDOW=True, SOFTCAP=True), ta.PREFILL_WARPS, ta.PREFILL_STAGES)
    _compile_sm90(ta._attn_kernel, attn, dict(
        HEAD_DIM=128, D_PAD=128, G=4, BLOCK_M=16, BLOCK_Q=1, BLOCK_N=ta.DECODE_BLOCK_N, PAGE=16,
        DECODE=True, SPLIT=True, F32_DOT=False, WINDOW=True, SOFTCAP=True), ta.DECODE_WARPS, ta.DECODE_STAGES)
    _compile_sm90(ta._merge_kernel, dict(part_o_ptr="*fp32", part_ml_ptr="*fp32", o_ptr="*bf16"),
                  dict(HEAD_DIM=128, D_PAD=128, S_PAD=4))
    _compile_sm90(tk._store_kv_kernel, dict(key_ptr="*bf16", value_ptr="*bf16", kc_ptr="*bf16", vc_ptr="*bf16",
                                            slot_ptr="*i64"),
                  dict(NUM_KV_HEADS=8, HEAD_DIM=128, BLOCK_H=8, BLOCK_D=128, PAGE=16))
    _compile_sm90(mask._bitmask_kernel, dict(logits_ptr="*fp32", mask_ptr="*i32", rows_ptr="*i64"),
                  dict(HAS_ROWS=True, BLOCK_V=1024))
    ptx = _compile_sm90(ts._sample_kernel, dict(logits_ptr="*fp32", temp_ptr="*fp32", topk_ptr="*i64",
                                                topp_ptr="*fp32", seed_ptr="*i64", pos_ptr="*i64", out_ptr="*i64"),
                        dict(GREEDY_EPS=1e-5, BLOCK_V=2048), num_warps=8)
    assert "div.rn.f32" in ptx, "temperature division is not correctly rounded"
    _compile_sm90(ts._uniform_kernel, dict(seed_ptr="*i64", pos_ptr="*i64", out_ptr="*fp32"), dict(BLOCK_V=1024))


# ---- the references themselves (no triton) ------------------------------------------------------

def test_bitmask_reference_bit_order() -> None:
    logits = torch.zeros(2, 40)
    bitmask = torch.tensor([[0b101, 1 << 7], [-1, 0]], dtype=torch.int32)
    apply_token_bitmask_ref_(logits, bitmask, torch.tensor([0]))
    allowed = (logits[0] == 0).nonzero().flatten().tolist()
    assert allowed == [0, 2, 39]
    assert torch.equal(logits[1], torch.zeros(40))     # row 1 not selected


def test_sampling_reference_semantics() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    z_order = torch.argsort(logits, dim=1, descending=True)
    kept = kept_mask_ref(logits, torch.tensor([5, 0, 0, 50]), torch.tensor([1.0, 0.5, 1e-6, 1.0]))
    assert kept.sum(1).tolist()[0] == 5 and kept[0, z_order[0, :5]].all()
    assert kept[2].sum() == 1 and kept[2, z_order[2, 0]]                 # tiny p: the top token
    assert kept[3].all()                                                 # k = V: off
    probs = torch.softmax(logits[1], 0)[z_order[1]]
    n = int(kept[1].sum())
    assert probs[: n - 1].sum() < 0.5 <= probs[:n].sum()
    # Greedy rows take the first maximum; keys order floats.
    tied = torch.tensor([[1.0, 3.0, 3.0, -1.0]])
    assert sample_tokens_ref(tied, torch.zeros(1), torch.zeros(1, dtype=torch.long), torch.ones(1)).item() == 1
    z = torch.tensor([-float("inf"), -2.0, -0.0, 0.0, 1e-30, 5.0])
    assert torch.all(order_key(z)[1:] > order_key(z)[:-1])


def test_sampling_reference_distribution_and_seeds() -> None:
    """The exponential race draws from softmax(z / T): frequencies over positions match."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]]).repeat(4000, 1)
    t = torch.full((4000,), 0.8)
    seeds = torch.full((4000,), 1234, dtype=torch.long)
    positions = torch.arange(4000)
    tokens = sample_tokens_ref(logits, t, torch.zeros(4000, dtype=torch.long), torch.ones(4000), seeds, positions)
    freq = torch.bincount(tokens, minlength=5).double() / 4000
    expect = torch.softmax(logits[0].double() / 0.8, 0)
    assert (freq - expect).abs().max() < 0.03, (freq, expect)
    again = sample_tokens_ref(logits, t, torch.zeros(4000, dtype=torch.long), torch.ones(4000), seeds, positions)
    assert torch.equal(tokens, again)
    other = sample_tokens_ref(logits, t, torch.zeros(4000, dtype=torch.long), torch.ones(4000), seeds + 1, positions)
    assert not torch.equal(tokens, other)


if __name__ == "__main__":
    # The interpreter run: every case (or those named) on CPU, small shapes; JSON on the last line.
    names = sys.argv[1:] or list(CASES)
    device = "cuda" if CUDA else "cpu"
    print(json.dumps(run_cases(names, device, full=CUDA)))
