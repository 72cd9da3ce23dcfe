"""Command-line flags generated from EngineConfig's fields: `--max-num-seqs` for
`max_num_seqs`, the type, default, choices and help from the field, one argument group per
section. A bool field gets `--flag / --no-flag`."""
from __future__ import annotations

import argparse
import types
import typing
from dataclasses import fields
from typing import Any

from service.config import SECTIONS, EngineConfig

_TITLES = {"model": "model", "cache": "KV cache", "scheduler": "scheduler",
           "speculative": "speculative decoding", "lora": "LoRA adapters", "output": "output"}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(hint: Any) -> type:
    """int for `int` and `int | None` (the annotations are strings: get_type_hints resolves them)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    return hint


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """One flag per EngineConfig field, grouped by section."""
    groups = {s: parser.add_argument_group(f"engine: {_TITLES[s]}") for s in SECTIONS}
    hints = typing.get_type_hints(EngineConfig)
    for f in fields(EngineConfig):
        meta = f.metadata
        default = f.default
        kind = _base_type(hints[f.name])
        shown = "" if default is None else f" (default: {default})"
        kw: dict[str, Any] = {"dest": f.name, "default": default, "help": meta["help"] + shown}
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
            kw["help"] = meta["help"] + f" (default: {'on' if default else 'off'})"
        elif typing.get_origin(kind) is tuple:   # repeatable: --lora a=x --lora b=y
            kw.update(action="append", type=typing.get_args(kind)[0], default=None, help=meta["help"])
        if meta["metavar"]:
            kw["metavar"] = meta["metavar"]
        else:
            kw["type"] = kind
            if meta["choices"]:
                kw["choices"] = list(meta["choices"])
        groups[meta["section"]].add_argument(flag(f.name), **kw)


def engine_config_from_args(a: argparse.Namespace, **overrides: Any) -> EngineConfig:
    """The EngineConfig the parsed flags describe; `overrides` win (e.g. progress=False)."""
    values: dict[str, Any] = {}
    for f in fields(EngineConfig):
        if hasattr(a, f.name):
            v = getattr(a, f.name)
            # A repeatable flag never given is None (argparse's append): the field's empty tuple.
            values[f.name] = f.default if v is None and isinstance(f.default, tuple) else v
    values.update(overrides)
    return EngineConfig(**values)
