"""`weft generate` end to end, in a subprocess, on the default model."""
from __future__ import annotations

import json
import subprocess
import sys

from decoding.sampling import SamplingParams
from service.llm import LLM


def _weft(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.cli", *args], capture_output=True, text=True, timeout=300)


def test_generate_json_matches_offline_engine(smollm2_dir) -> None:
    proc = _weft("generate", "--json", "--max-tokens", "12", "--temperature", "0", "Name a colour.")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert set(doc) == {"text", "token_ids", "finish_reason"}
    assert doc["finish_reason"] in {"length", "eos", "stop"}
    llm = LLM(str(smollm2_dir), progress=False, kv_cache_gb=0.1)
    tok = llm.tokenizer
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Name a colour."}]), add_special_tokens=False)
    expect = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12))[0].outputs[0]
    assert doc["token_ids"] == expect.token_ids
    assert doc["text"] == expect.text


def test_generate_bad_model_path_is_a_clear_error(tmp_path) -> None:
    proc = _weft("generate", "--model", str(tmp_path / "missing.gguf"), "hi")
    assert proc.returncode == 2
    assert "missing.gguf" in proc.stderr
    assert "Traceback" not in proc.stderr
