"""service.tokenizer on SmolLM2's tokenizer (as converted from the GGUF) and on edge cases."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from common.errors import InvalidArgumentError
from service.tokenizer import Tokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tok(smollm2_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(smollm2_dir)


def _tokenizer_copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(src / name, dst / name)
    return dst


# ---------------------------------------------------------------------------------------------
# SmolLM2's own pre-tokenizer (llama.cpp "smollm"): digits split one by one
# ---------------------------------------------------------------------------------------------


def test_digits_split_like_llama_cpp(tok: Tokenizer) -> None:
    # llama.cpp splits digits first, so "\n\n" before "2" stays one token ("ĊĊ"); transformers'
    # GGUF tokenizer alone gives two "Ċ" tokens here.
    ids = tok.encode("heat.\n\n2. Eat")
    assert tok.convert_ids_to_tokens(ids) == ["heat", ".", "ĊĊ", "2", ".", "ĠEat"]
    assert ids == [17716, 30, 1116, 34, 30, 16478]


def test_each_digit_is_a_token(tok: Tokenizer) -> None:
    assert tok.convert_ids_to_tokens(tok.encode("12345")) == list("12345")
    tokens = tok.convert_ids_to_tokens(tok.encode("Call 911 on 2024-12-31"))
    digits = [t for t in tokens if any(c.isdigit() for c in t)]
    assert digits == list("91120241231")


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world! The quick brown fox.\n\tIndented   spaces  ",
        "naïve café — déjà vu",
        "emoji 🙂🚀👩‍👩‍👧 end",
        "中文分词测试，日本語のテキスト、한국어",
        " leading space and trailing newline\n",
        "",
    ],
)
def test_decode_inverts_encode(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.hf.decode(ids) == text


def test_fast_decode_matches_transformers(tok: Tokenizer) -> None:
    ids = [1, 9690, 198, 2, 0, 30, 1116, 34, 49151, 17716]
    for skip in (True, False):
        assert tok.decode(ids, skip_special_tokens=skip) == tok.hf.decode(ids, skip_special_tokens=skip)
    assert tok.decode((34, 35)) == "23"  # any sequence, not just lists


# ---------------------------------------------------------------------------------------------
# Special ids
# ---------------------------------------------------------------------------------------------


def test_smollm2_special_ids(tok: Tokenizer) -> None:
    im_end = tok.hf.convert_tokens_to_ids("<|im_end|>")
    assert im_end == 2
    assert im_end in tok.eos_token_ids
    assert tok.bos_token_id == tok.hf.convert_tokens_to_ids("<|im_start|>") == 1
    assert tok.vocab_size == 49152
    assert tok.encode("hi")[0] != tok.bos_token_id, "SmolLM2 adds no BOS (add_bos_token is false)"


def test_eos_ids_from_generation_config_list(smollm2_dir: Path, tmp_path: Path) -> None:
    model_dir = _tokenizer_copy(smollm2_dir, tmp_path / "t")
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    (model_dir / "config.json").write_text(json.dumps({"eos_token_id": 5}))
    assert Tokenizer.from_dir(model_dir).eos_token_ids == (0, 2, 5)


# ---------------------------------------------------------------------------------------------
# Chat template
# ---------------------------------------------------------------------------------------------


def test_chat_template(tok: Tokenizer) -> None:
    assert tok.has_chat_template
    text = tok.apply_chat_template(
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"}]
    )
    assert text.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n")
    assert "<|im_start|>user\nHi there<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")
    without_prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=False)
    assert not without_prompt.endswith("<|im_start|>assistant\n")
    # The template's own default system prompt appears when none is given.
    assert "You are a helpful AI assistant named SmolLM" in without_prompt


@pytest.mark.parametrize(
    "messages",
    [
        [{"content": "no role"}],
        [{"role": "user"}],
        [{"role": "user", "content": 3}],
        [],
        "not a list",
        ["not a dict"],
    ],
)
def test_bad_messages(tok: Tokenizer, messages: object) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        tok.apply_chat_template(messages)  # type: ignore[arg-type]
    assert err.value.field == "messages"


def test_model_without_chat_template(smollm2_dir: Path, tmp_path: Path) -> None:
    model_dir = _tokenizer_copy(smollm2_dir, tmp_path / "t")
    config_file = model_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.pop("chat_template", None)
    config_file.write_text(json.dumps(config))
    plain = Tokenizer.from_dir(model_dir)
    assert not plain.has_chat_template
    with pytest.raises(InvalidArgumentError, match="no chat template") as err:
        plain.apply_chat_template([{"role": "user", "content": "hi"}])
    assert err.value.field == "messages"


# ---------------------------------------------------------------------------------------------
# Weft's top-level `kernels` package next to transformers, which probes for a `kernels` dist
# ---------------------------------------------------------------------------------------------


def test_transformers_works_with_weft_imported_first() -> None:
    # A fresh interpreter: transformers caches its availability probes per process.
    code = textwrap.dedent(
        """
        import importlib, os
        os.environ["HF_HUB_OFFLINE"] = "1"
        import kernels, decoding, service, service.loader, service.tokenizer
        import transformers
        from transformers import AutoModelForCausalLM, LlamaConfig
        from transformers.utils.import_utils import is_kernels_available
        assert kernels.__file__.startswith(os.getcwd()), kernels.__file__
        assert is_kernels_available() is False
        import torch
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2)
        model = AutoModelForCausalLM.from_config(config).eval()
        with torch.no_grad():
            logits = model(torch.tensor([[1, 2, 3]])).logits
        assert logits.shape == (1, 3, 64) and torch.isfinite(logits).all()
        print("ok")
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
