"""Command-line flags generated from EngineConfig's fields: `--max-num-seqs` for
`max_num_seqs`, the type, default, choices and help from the field, one argument group per
section. A bool field gets `--flag / --no-flag`."""
from __future__ import annotations

import argparse
import types
import typing
from dataclasses import MISSING, Field, fields
from typing import Any

from service.config import SECTIONS, EngineConfig

_TITLES = {"model": "model", "cache": "KV cache", "scheduler": "scheduler",
           "speculative": "speculative decoding", "output": "output"}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(f: Field) -> type:
    """int for `int`, `int | None`; the field's annotation is a string (postponed annotations)."""
    hint = typing.get_type_hints(EngineConfig)[f.name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        (hint,) = args
    return hint


def add_engine_args(parser: argparse.ArgumentParser, skip: frozenset[str] = frozenset()) -> None:
    """One flag per EngineConfig field (but those in `skip` and those marked cli=False)."""
    groups = {s: parser.add_argument_group(f"engine: {_TITLES[s]}") for s in SECTIONS}
    for f in fields(EngineConfig):
        meta = f.metadata
        if not meta["cli"] or f.name in skip:
            continue
        default = f.default if f.default is not MISSING else None
        kind = _base_type(f)
        shown = "" if default is None else f" (default: {default})"
        kw: dict[str, Any] = {"dest": f.name, "default": default, "help": meta["help"] + shown}
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
            kw["help"] = meta["help"] + f" (default: {'on' if default else 'off'})"
        else:
            kw["type"] = kind
            if meta["choices"]:
                kw["choices"] = list(meta["choices"])
        groups[meta["section"]].add_argument(flag(f.name), **kw)


def engine_config_from_args(a: argparse.Namespace, **overrides: Any) -> EngineConfig:
    """The EngineConfig the parsed flags describe; `overrides` win (e.g. progress=False)."""
    values = {f.name: getattr(a, f.name) for f in fields(EngineConfig) if hasattr(a, f.name)}
    values.update(overrides)
    return EngineConfig(**values)
