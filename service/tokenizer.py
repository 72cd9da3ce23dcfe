"""Weft's tokenizer: a `transformers` fast tokenizer plus the ids and checks the engine needs.

The engine calls `decode` once per generated token (incremental detokenization), so it goes
straight to the Rust `tokenizers` backend instead of through `transformers`' Python wrapper.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from common.errors import InvalidArgumentError, ModelLoadError

# Files any HF tokenizer directory carries at least one of.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class Tokenizer:
    """Weft's tokenizer: a transformers fast tokenizer plus what the engine needs."""

    __slots__ = ("hf", "eos_token_ids", "bos_token_id", "vocab_size", "_backend_decode")

    def __init__(self, hf: Any, eos_token_ids: Iterable[int] = ()) -> None:
        self.hf = hf
        # Generation stops on any of these: the model's (generation_)config ids first, then the
        # tokenizer's own eos, de-duplicated in that order.
        ids = [*eos_token_ids, hf.eos_token_id]
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(i for i in ids if i is not None))
        self.bos_token_id: int | None = hf.bos_token_id
        self.vocab_size: int = len(hf)
        self._backend_decode = _fast_decode_fn(hf)

    # -- text <-> ids -----------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        if self._backend_decode is not None:
            return self._backend_decode(ids if isinstance(ids, list) else list(ids), skip_special_tokens)
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        return self.hf.convert_ids_to_tokens(list(ids))

    # -- chat ---------------------------------------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """The conversation rendered by the model's own template, as text (not ids). `tools`
        (OpenAI-shaped function definitions) go to templates that render them."""
        if not self.has_chat_template:
            raise InvalidArgumentError("messages", "this model has no chat template; send a plain prompt")
        _validate_messages(messages)
        try:
            rendered = self.hf.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt, tools=tools
            )
        except Exception as exc:  # jinja TemplateError, or a template's raise_exception()
            raise InvalidArgumentError("messages", f"the chat template rejected them: {exc}") from exc
        return rendered

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: Path) -> Tokenizer:
        """The tokenizer of a local HF model directory (never downloads)."""
        path = Path(path)
        if not any((path / name).is_file() for name in _TOKENIZER_FILES):
            raise ModelLoadError(f"{path}: no tokenizer files (expected tokenizer.json or tokenizer_config.json)")
        from transformers import AutoTokenizer   # offline: service/__init__ set HF_HUB_OFFLINE

        try:
            hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as exc:
            raise ModelLoadError(f"{path}: cannot load tokenizer: {exc}") from exc
        return cls(hf, eos_token_ids=_model_eos_ids(path))

    def __repr__(self) -> str:
        return (
            f"Tokenizer({type(self.hf).__name__}, vocab_size={self.vocab_size}, "
            f"eos={self.eos_token_ids}, bos={self.bos_token_id})"
        )


def _fast_decode_fn(hf: Any) -> Any:
    """The Rust backend's decode when it gives the same text as `hf.decode`, else None.

    `transformers` adds only the optional clean-up of spaces before punctuation on top of it.
    """
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None or getattr(hf, "clean_up_tokenization_spaces", False):
        return None
    return backend.decode


def _validate_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidArgumentError("messages", "must be a non-empty list of {role, content} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidArgumentError("messages", f"[{i}] must be an object with role and content")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise InvalidArgumentError("messages", f"[{i}].role is missing or not a string")
        if not isinstance(content, str):
            raise InvalidArgumentError("messages", f"[{i}].content is missing or not a string")


def _model_eos_ids(path: Path) -> list[int]:
    """eos ids from generation_config.json, then config.json; either may hold an int or a list."""
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        file = path / name
        if not file.is_file():
            continue
        try:
            value = json.loads(file.read_text(encoding="utf-8")).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            continue  # a broken config.json is reported by the loader, not here
        if isinstance(value, int):
            ids.append(value)
        elif isinstance(value, list):
            ids.extend(v for v in value if isinstance(v, int))
    return ids
