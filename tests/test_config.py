"""One config object: EngineConfig's fields (in sections) generate the CLI flags, and every
environment variable is read in common/env.py and documented in the README."""
from __future__ import annotations

import argparse
import ast
import re
from dataclasses import fields
from pathlib import Path

import pytest

from common import env
from service.config import SECTIONS, EngineConfig
from service.config_cli import add_engine_args, engine_config_from_args, flag
from service.gguf_convert import cache_root

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "kernels", "decoding", "service", "clients")


def _parse(*argv: str) -> EngineConfig:
    p = argparse.ArgumentParser()
    add_engine_args(p)
    return engine_config_from_args(p.parse_args(list(argv)))


def test_no_flags_give_the_dataclass_defaults() -> None:
    assert _parse() == EngineConfig()


def test_every_field_has_a_flag_in_its_section() -> None:
    p = argparse.ArgumentParser()
    add_engine_args(p)
    options = set(re.findall(r"--[a-z0-9-]+", p.format_help()))
    for f in fields(EngineConfig):
        assert flag(f.name) in options, f.name
        assert f.metadata["section"] in SECTIONS and f.metadata["help"]
    assert set(EngineConfig().section("speculative")) >= {"speculative_method", "num_speculative_tokens", "draft_model"}


def test_flags_reach_the_config() -> None:
    cfg = _parse("--max-num-seqs", "8", "--no-enable-prefix-caching", "--speculative-method", "ngram",
                 "--kv-cache-gb", "0.5", "--num-blocks", "64", "--spec-min-acceptance", "0.5", "--no-progress",
                 "--max-model-len", "512", "--dtype", "bfloat16")
    assert (cfg.max_num_seqs, cfg.enable_prefix_caching, cfg.speculative_method, cfg.kv_cache_gb, cfg.num_blocks,
            cfg.spec_min_acceptance, cfg.progress, cfg.max_model_len, cfg.dtype) == \
        (8, False, "ngram", 0.5, 64, 0.5, False, 512, "bfloat16")
    assert _parse("--draft-model", "/m").speculative_method == "draft"   # a draft model implies draft speculation


@pytest.mark.parametrize("argv", [["--dtype", "float64"], ["--max-num-seqs", "many"],
                                  ["--speculative-method", "medusa"]])
def test_bad_flags_are_refused(argv, capsys) -> None:
    with pytest.raises(SystemExit):
        _parse(*argv)
    assert "invalid" in capsys.readouterr().err


def _environ_reads(path: Path) -> list[int]:
    """Lines of `path` that touch os.environ / os.getenv."""
    tree = ast.parse(path.read_text())
    return [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
            and n.value.id in ("os", "_os") and n.attr in ("environ", "getenv", "putenv")]


def test_environment_is_read_in_one_module() -> None:
    offenders = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            if path != ROOT / "common" / "env.py" and (lines := _environ_reads(path)):
                offenders[str(path.relative_to(ROOT))] = lines
    assert not offenders, f"read environment variables through common/env.py: {offenders}"


def test_every_variable_is_listed_and_documented() -> None:
    source = (ROOT / "common" / "env.py").read_text()
    name = r'"([A-Z][A-Z0-9_]*)"'   # digits too: WEFT_BF16_GEMM
    read = set(re.findall(r"_(?:get|on)\(" + name, source)) | set(re.findall(r"setdefault\(" + name, source))
    listed = {v.name for v in env.ENV_VARS}
    assert read <= listed, read - listed
    readme = (ROOT / "README.md").read_text()
    assert all(f"`{name}`" in readme for name in listed), [n for n in listed if f"`{n}`" not in readme]


def test_one_cache_dir_for_models_and_kernels(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("WEFT_CACHE_DIR", "~/weft-cache-test")
    assert env.cache_dir() == Path.home() / "weft-cache-test"    # ~ expanded, for both users
    assert cache_root() == env.cache_dir() / "models"
    monkeypatch.setenv("WEFT_NATIVE", "0")
    assert not env.native_enabled()
    monkeypatch.delenv("WEFT_NATIVE")
    assert env.native_enabled()
