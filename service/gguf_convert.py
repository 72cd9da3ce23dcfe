"""GGUF -> a cached HF directory: a GGUF is de-quantised once by `transformers` (the same code our
reference tests load it with; the architectures transformers cannot map by service/gguf_tensors.py)
and written as float32 safetensors under `$WEFT_CACHE_DIR/models/`, atomically (temp dir + rename);
every later load reads that directory, which takes about a second instead of ~20.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from common import env
from common.errors import ModelLoadError
from common.gguf_file import open_whole_gguf
from service.gguf_arch import check_architecture, gguf_config
from service.gguf_tensors import LAYOUTS, model_from_gguf

# Bump when the conversion output changes, so old caches are not reused.
# 2: the config is built by service/gguf_arch.py (Qwen3's head_dim read from the file).
_CONVERTER_VERSION = 2
# Written last into a converted directory: what it was made from.
SOURCE_FILE = "weft_source.json"

# How many GGUF conversions this process has run (tests use it to prove the cache is hit).
conversion_count = 0


def say(progress: bool, message: str) -> None:
    """A loading step on stderr, when the caller shows progress."""
    if progress:
        print(f"weft: {message}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    """Where converted models live: `$WEFT_CACHE_DIR` (default ~/.cache/weft) / models."""
    return env.cache_dir() / "models"


def gguf_cache_dir(gguf: Path) -> Path:
    """The converted directory for this GGUF (whether or not it exists yet)."""
    return cache_root() / f"{_safe_name(gguf_display_name(gguf))}-{_gguf_cache_key(gguf)}"





def is_gguf(path: Path) -> bool:
    if path.suffix.lower() == ".gguf":
        return True
    with contextlib.suppress(OSError), path.open("rb") as f:
        return f.read(4) == b"GGUF"
    return False


def gguf_display_name(gguf: Path) -> str:
    """"SmolLM2-135M-Instruct.Q4_1.gguf" -> "SmolLM2-135M-Instruct": the file name without its
    quantisation tag. (general.name in that file is "Smollm2 135M 8k Lc100K Mix1 Ep2".)"""
    stem = re.sub(r"[.\-_](?:I?Q\d\w*|F16|F32|BF16)$", "", gguf.stem, flags=re.IGNORECASE)
    return stem or gguf.stem


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"


def _gguf_cache_key(gguf: Path) -> str:
    """Changes whenever the file (path, size, mtime), the converter or transformers changes."""
    import transformers

    st = gguf.stat()
    raw = f"{_CONVERTER_VERSION}|{transformers.__version__}|{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def converted_gguf_dir(gguf: Path, progress: bool) -> Path:
    target = gguf_cache_dir(gguf)
    if (target / SOURCE_FILE).is_file():
        return target
    _convert_gguf(gguf, target, progress)
    return target


def _read_gguf_metadata(gguf: Path) -> dict[str, Any]:
    """The few metadata fields we need, after checking the file is whole (tensors inside it)."""
    try:
        reader = open_whole_gguf(gguf)
        keys = ("general.architecture", "general.name", "tokenizer.ggml.pre")
        fields = {key: reader.get_field(key) for key in keys}
        meta = {key: (field.contents() if field is not None else None) for key, field in fields.items()}
    except Exception as exc:  # numpy/struct/ValueError on a truncated or foreign file
        raise ModelLoadError(f"{gguf}: corrupt or truncated GGUF file: {exc}") from exc
    check_architecture(meta["general.architecture"], gguf)
    return meta


def _convert_gguf(gguf: Path, target: Path, progress: bool) -> None:
    """De-quantise with transformers and write an HF directory, atomically (temp dir + rename)."""
    global conversion_count
    meta = _read_gguf_metadata(gguf)
    started = time.perf_counter()
    say(progress, f"converting {gguf.name} to float32 safetensors (once; cached in {target})")
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_dirs(target.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _write_converted(gguf, tmp, meta, progress)
        (tmp / SOURCE_FILE).write_text(json.dumps(_source_record(gguf, meta), indent=2) + "\n")
        _chmod_like_mkdir(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished the same conversion first; its copy is as good as ours.
            if not (target / SOURCE_FILE).is_file():
                raise
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"{gguf}: conversion failed: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    conversion_count += 1
    say(progress, f"converted {gguf.name} in {time.perf_counter() - started:.1f}s")


def _write_converted(gguf: Path, out: Path, meta: dict[str, Any], progress: bool) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    kwargs = {"gguf_file": gguf.name, "local_files_only": True}
    config = gguf_config(gguf)
    with _transformers_progress(progress):
        if config.model_type in LAYOUTS:   # tensors transformers cannot map: Weft reads them
            model = model_from_gguf(gguf, config)
        else:   # our config (service/gguf_arch.py), so transformers only reads the tensors
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), config=config,
                                                         dtype=torch.float32, **kwargs)
    config = model.config
    # The weights are plain float32 now; a leftover gguf quantization_config would make
    # transformers treat the directory as still quantised.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]
    config.dtype = torch.float32
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    tensors = {k: v.detach().contiguous() for k, v in state.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(out))
    model.generation_config.save_pretrained(str(out))
    del model, state, tensors

    with _transformers_progress(progress):
        if check_architecture(meta["general.architecture"], gguf).own_config:
            # AutoTokenizer parses the GGUF's config first and refuses architectures transformers
            # has no config for; its GGUF tokenizer builder itself does not care.
            tokenizer = PreTrainedTokenizerFast.from_pretrained(str(gguf.parent), **kwargs)
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
    _fix_pre_tokenizer(tokenizer, meta.get("tokenizer.ggml.pre"))
    tokenizer.model_max_length = config.max_position_embeddings
    # One file holds the chat template (tokenizer_config.json), as the spec of the cache says.
    tokenizer.save_pretrained(str(out), save_jinja_files=False)
    _clean_tokenizer_config(out / "tokenizer_config.json")


def _fix_pre_tokenizer(tokenizer: Any, pre: str | None) -> None:
    """Restore pre-tokenizers that transformers' GGUF tokenizer builder does not know.

    llama.cpp's "smollm" splits every digit on its own before the GPT-2 regex, as SmolLM's own
    tokenizer.json does (Digits(individual_digits) + ByteLevel); without it "\\n\\n2" gives two
    "\\n" tokens instead of one "\\n\\n", unlike the text the model was trained on.
    """
    from tokenizers import pre_tokenizers

    if pre == "smollm":
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )


def _clean_tokenizer_config(file: Path) -> None:
    """Drop load-time flags transformers writes back out; they describe this load, not the model."""
    data = json.loads(file.read_text(encoding="utf-8"))
    for key in ("is_local", "local_files_only", "gguf_file"):
        data.pop(key, None)
    file.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _source_record(gguf: Path, meta: dict[str, Any]) -> dict[str, Any]:
    import transformers

    st = gguf.stat()
    return {
        "gguf": str(gguf),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "general.name": meta.get("general.name"),
        "converter_version": _CONVERTER_VERSION,
        "transformers_version": transformers.__version__,
    }


def _chmod_like_mkdir(path: Path) -> None:
    """mkdtemp makes a 0700 directory; give the finished cache dir a plain directory's mode.
    (Not via os.umask: reading it means setting it, which races with other threads.)"""
    path.chmod(0o755)


def _remove_stale_temp_dirs(models_dir: Path, max_age_s: float = 6 * 3600) -> None:
    """Temp dirs left by conversions that crashed; young ones may belong to a live process."""
    now = time.time()
    for tmp in models_dir.glob(".*.tmp-*"):
        with contextlib.suppress(OSError):
            if now - tmp.stat().st_mtime > max_age_s:
                shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _transformers_progress(enabled: bool) -> Iterator[None]:
    """Let transformers' own progress bars through, or silence them for the duration of a call.

    The de-quantisation bar is a bare `tqdm` that ignores transformers' switch, so silencing
    also points stderr at a sink (tqdm looks the stream up when the bar is created).
    """
    if enabled:
        yield
        return
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
