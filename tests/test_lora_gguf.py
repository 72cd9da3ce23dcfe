"""LoRA adapters as GGUF files (llama.cpp's convert_lora_to_gguf.py output, Ollama's ADAPTER):
written from random PEFT adapters by tests/gguf_writer.py the way the converter writes them
(names, reversed dims, alpha, llama's q/k permutation), they fuse to exactly the PEFT
directory's weights and give transformers + peft's greedy tokens on tiny Llama and Qwen2 (alpha
!= r, so the scaling counts); F16, BF16 and Q8_0 files fuse to the same within their rounding;
bad files (a base model, truncated, foreign tensor names, another architecture or head count, a
quantisation we do not read) are refused naming the problem; a Modelfile takes ADAPTER ./x.gguf."""
from __future__ import annotations

from pathlib import Path

import gguf
import pytest
import torch

from common.errors import InvalidArgumentError, ModelLoadError
from service.llm import LLM
from service.modelfile import parse
from service.models.lora import LoRAWeights, load_lora
from service.store import ModelStore
from tests.gguf_writer import write_lora_gguf
from tests.test_lora import ALL, PROMPTS, _greedy, _ids, make_adapter, peft_greedy

# name -> LoraConfig arguments; llama.cpp's converter knows r and lora_alpha only (no rsLoRA, no
# rank/alpha patterns), so these are what a GGUF can carry.
ADAPTERS = {
    "all_r8": dict(r=8, lora_alpha=20, target_modules=ALL),
    "attn_r4": dict(r=4, lora_alpha=3, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
}


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def family(request, tiny_model_factory, tmp_path_factory):
    base = tiny_model_factory(request.param)
    root = tmp_path_factory.mktemp(f"lora_gguf_{request.param}")
    peft = {n: make_adapter(base, root / n, seed=40 + i, **args) for i, (n, args) in enumerate(ADAPTERS.items())}
    ggufs = {n: write_lora_gguf(base, p, root / f"{n}.gguf") for n, p in peft.items()}
    llm = LLM(str(base), dtype="float32", num_blocks=256, progress=False, max_lora_rank=8, max_loras=2,
              lora=[f"{n}={p}" for n, p in ggufs.items()])
    return base, peft, ggufs, llm


def _load(llm: LLM, path: Path) -> LoRAWeights:
    stacks = llm.engine.lora.stacks
    return load_lora("x", path, stacks.shapes, stacks.max_rank)


def _assert_fused_equal(got: LoRAWeights, expect: LoRAWeights, **tol) -> None:
    assert got.rank == expect.rank
    for mine, theirs in zip(got.layers, expect.layers):
        assert mine.keys() == theirs.keys()
        for proj, ab in mine.items():
            assert (ab is None) == (theirs[proj] is None), proj
            if ab is not None:
                torch.testing.assert_close(ab[0], theirs[proj][0], **tol)
                torch.testing.assert_close(ab[1], theirs[proj][1], **tol)


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_gguf_adapter_fuses_to_the_peft_weights(family, name) -> None:
    _, peft, ggufs, llm = family
    _assert_fused_equal(_load(llm, ggufs[name]), _load(llm, peft[name]), rtol=0, atol=0)


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_greedy_equals_transformers_peft(family, name) -> None:
    base, peft, _, llm = family
    for prompt in PROMPTS[:2]:
        [got] = _ids(llm, [prompt], _greedy(), name)
        assert got == peft_greedy(base, peft[name], prompt), (name, prompt)
    # The adapter changes the output (else the test above proves nothing).
    assert _ids(llm, [PROMPTS[0]], _greedy(), None) != _ids(llm, [PROMPTS[0]], _greedy(), name)


@pytest.mark.parametrize("qtype,atol", [("F16", 1e-3), ("BF16", 1e-2), ("Q8_0", 1e-2)])
def test_16_bit_and_q8_0_files_fuse_within_their_rounding(family, tmp_path, qtype, atol) -> None:
    """convert_lora_to_gguf.py's other --outtype values (its default is f16); rows that are not
    whole Q8_0 blocks (lora_b's r columns) fall back to F16, as the converter's do."""
    base, peft, _, llm = family
    path = write_lora_gguf(base, peft["all_r8"], tmp_path / f"{qtype}.gguf", qtype=qtype)
    assert qtype in {t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    _assert_fused_equal(_load(llm, path), _load(llm, peft["all_r8"]), rtol=0, atol=atol)


def _write_raw(out: Path, arch: str, tensors: dict[str, torch.Tensor], **meta: str) -> Path:
    """A GGUF with the given general.architecture, string metadata and float32 tensors."""
    writer = gguf.GGUFWriter(str(out), arch)
    for key, value in meta.items():
        writer.add_string(key.replace("__", "."), value)
    for name, t in tensors.items():
        writer.add_tensor(name, t.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def test_bad_gguf_adapters_are_refused_naming_the_problem(family, smollm2_gguf, tiny_model_factory,
                                                          tmp_path) -> None:
    base, peft, ggufs, llm = family
    good = ggufs["all_r8"]
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    lora = dict(general__type="adapter", adapter__type="lora")
    own = llm.engine.lora.stacks.shapes.family   # "llama" or "qwen2": GGUF's names for them too
    other = "qwen2" if own == "llama" else "llama"
    foreign = make_adapter(tiny_model_factory(other), tmp_path / "foreign", seed=1, r=4, lora_alpha=8,
                           target_modules=["q_proj"])
    # Twice the heads of half the size: every shape as ours, q/k rows interleaved otherwise.
    narrow_heads = tiny_model_factory(own, num_attention_heads=8, num_key_value_heads=4, head_dim=8)
    narrow = make_adapter(narrow_heads, tmp_path / "narrow", seed=2, r=4, lora_alpha=8, target_modules=["q_proj"])
    cases = {
        "base model": (smollm2_gguf, "not 'adapter'"),
        "head count": (write_lora_gguf(narrow_heads, narrow, tmp_path / "narrow.gguf"),
                       f"{own}.attention.head_count is 8, the base model's 4"),
        "truncated": (truncated, "corrupt or truncated GGUF"),
        "tensor name": (_write_raw(tmp_path / "embd.gguf", own,
                                   {"token_embd.weight.lora_a": torch.zeros(4, 8)}, **lora),
                        "'token_embd.weight.lora_a' is not supported"),
        "architecture": (write_lora_gguf(tiny_model_factory(other), foreign, tmp_path / "foreign.gguf"),
                         f"an adapter for a '{other}' model"),
        "adapter type": (_write_raw(tmp_path / "cvec.gguf", "llama", {}, general__type="adapter",
                                    adapter__type="control_vector"), "adapter.type 'control_vector'"),
        "quantisation": (write_lora_gguf(base, peft["all_r8"], tmp_path / "q4.gguf", qtype="Q4_0"), "is Q4_0"),
        "missing": (tmp_path / "nowhere.gguf", "no such adapter file"),
    }
    for label, (path, needle) in cases.items():
        with pytest.raises(ModelLoadError) as err:
            llm.load_lora(label.replace(" ", "_"), str(path))
        assert needle in str(err.value), (label, str(err.value))
    llm.load_lora("again", str(good))   # still serving, and still taking good files
    assert _ids(llm, [PROMPTS[0]], _greedy(4), "again") == _ids(llm, [PROMPTS[0]], _greedy(4), "all_r8")


def test_modelfile_adapter_may_be_a_gguf_file(family, tmp_path) -> None:
    base, peft, ggufs, _ = family
    store = ModelStore(tmp_path / "home")
    (tmp_path / "mf").mkdir()
    (tmp_path / "mf" / "x.gguf").write_bytes(ggufs["all_r8"].read_bytes())
    m = store.create("tuned", parse(f"FROM {base}\nADAPTER ./x.gguf\nADAPTER {peft['attn_r4']}\n"),
                     base_dir=tmp_path / "mf")
    assert m.adapters == [str((tmp_path / "mf" / "x.gguf").resolve()), str(peft["attn_r4"])]
    (tmp_path / "mf" / "notes.txt").write_text("hello")
    with pytest.raises(InvalidArgumentError, match="neither a PEFT LoRA adapter directory nor a GGUF file"):
        store.create("bad", parse(f"FROM {base}\nADAPTER ./notes.txt\n"), base_dir=tmp_path / "mf")
