"""Ollama's Modelfile: parse it into a `Modelfile`, check every value, and write it back.

    FROM smollm2:135m                  # a store name, a .gguf file or an HF directory
    SYSTEM \"\"\"You are a terse assistant.\"\"\"
    PARAMETER temperature 0.2
    PARAMETER stop "<|im_end|>"        # repeatable
    TEMPLATE \"\"\"{{ .System }} ...\"\"\"   # Ollama's Go template (common cases) or a Jinja one
    MESSAGE user Hello                 # few-shot history
    ADAPTER ./my-lora                  # a PEFT LoRA directory or a LoRA .gguf (llama.cpp's)
    LICENSE \"\"\"...\"\"\"

Instructions are case-insensitive; `#` starts a comment line; a value is the rest of the line,
a "double-quoted" string, or a \"\"\"triple-quoted\"\"\" one that may span lines. Errors name the
line and the instruction.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from common.errors import InvalidArgumentError

# Ollama's parameter names Weft honours, and their types.
PARAMETERS: dict[str, type] = {
    "temperature": float, "top_k": int, "top_p": float, "min_p": float, "num_ctx": int, "num_predict": int,
    "stop": str, "repeat_penalty": float, "presence_penalty": float, "frequency_penalty": float, "seed": int,
}
MESSAGE_ROLES = ("system", "user", "assistant", "tool")
INSTRUCTIONS = ("from", "parameter", "template", "system", "adapter", "license", "message")


class ModelfileError(InvalidArgumentError):
    """A Modelfile that cannot be used: `field` is "modelfile", the message names the line."""

    def __init__(self, line: int, instruction: str, message: str) -> None:
        where = f"line {line}: {instruction.upper()}: " if instruction else f"line {line}: "
        super().__init__("modelfile", where + message)
        self.line = line


@dataclass(slots=True)
class Modelfile:
    source: str = ""                                   # FROM
    system: str | None = None
    template: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)   # stop: list[str]
    messages: list[dict[str, str]] = field(default_factory=list)
    adapters: list[str] = field(default_factory=list)
    license: list[str] = field(default_factory=list)

    def render(self) -> str:
        """This Modelfile as text (what `weft show --modelfile` prints)."""
        out = [f"FROM {self.source}"]
        if self.template is not None:
            out.append(f"TEMPLATE {_quote(self.template)}")
        if self.system is not None:
            out.append(f"SYSTEM {_quote(self.system)}")
        for name, value in self.parameters.items():
            for v in value if isinstance(value, list) else [value]:
                out.append(f"PARAMETER {name} {json.dumps(v) if isinstance(v, str) else v}")
        for m in self.messages:
            out.append(f"MESSAGE {m['role']} {_quote(m['content'])}")
        out += [f"ADAPTER {a}" for a in self.adapters]
        out += [f"LICENSE {_quote(text)}" for text in self.license]
        return "\n".join(out) + "\n"


def _quote(text: str) -> str:
    """A value as the parser reads it back: triple-quoted across lines or around quotes,
    JSON-quoted around outer white space, bare otherwise."""
    if "\n" in text or '"' in text:
        return f'"""{text}"""'
    if not text or text != text.strip():
        return json.dumps(text)
    return text


def parameter_value(name: str, raw: Any) -> Any:
    """A parameter's value, typed; ValueError naming what is wrong."""
    kind = PARAMETERS.get(name)
    if kind is None:
        raise ValueError(f"unknown parameter {name!r} (Weft knows {', '.join(PARAMETERS)})")
    if kind is str:
        if not isinstance(raw, str) or not raw:
            raise ValueError(f"{name} must be a non-empty string")
        return raw
    if isinstance(raw, bool):
        raise ValueError(f"{name} must be a number, got {raw!r}")
    try:
        value = kind(raw) if not isinstance(raw, str) else kind(float(raw)) if kind is float else int(raw)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {raw!r}") from None
    if kind is float and value != value:
        raise ValueError(f"{name} must be a number, got {raw!r}")
    return value


def set_parameter(params: dict[str, Any], name: str, raw: Any) -> None:
    value = parameter_value(name, raw)
    if name == "stop":
        params.setdefault("stop", []).append(value)
    else:
        params[name] = value


_WORD = re.compile(r"\s*(\S+)")


def parse(text: str) -> Modelfile:
    """Parse a Modelfile; raises ModelfileError naming the line."""
    mf = Modelfile()
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line_no, line = i + 1, lines[i]
        i += 1
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        word, _, rest = stripped.partition(" ")
        instruction = word.lower()
        if instruction not in INSTRUCTIONS:
            raise ModelfileError(line_no, "", f"unknown instruction {word!r} (expected one of "
                                 f"{', '.join(s.upper() for s in INSTRUCTIONS)})")
        rest = rest.strip()
        if instruction in ("parameter", "message"):
            m = _WORD.match(rest)
            if m is None:
                raise ModelfileError(line_no, instruction, "needs a name and a value")
            key, rest = m.group(1), rest[m.end():].strip()
            value, i = _value(rest, lines, i, line_no, instruction)
            if instruction == "parameter":
                try:
                    set_parameter(mf.parameters, key.lower(), value)
                except ValueError as exc:
                    raise ModelfileError(line_no, instruction, str(exc)) from None
            else:
                if key.lower() not in MESSAGE_ROLES:
                    raise ModelfileError(line_no, instruction, f"role must be one of {', '.join(MESSAGE_ROLES)}, "
                                         f"got {key!r}")
                mf.messages.append({"role": key.lower(), "content": value})
            continue
        value, i = _value(rest, lines, i, line_no, instruction)
        if instruction == "from":
            if not value:
                raise ModelfileError(line_no, instruction, "needs a model name, a .gguf file or a directory")
            mf.source = value
        elif instruction == "adapter":
            if not value:
                raise ModelfileError(line_no, instruction, "needs a LoRA adapter directory or .gguf file")
            mf.adapters.append(value)
        elif instruction == "license":
            mf.license.append(value)
        else:
            setattr(mf, instruction, value)
    if not mf.source:
        raise ModelfileError(len(lines) or 1, "from", "missing: a Modelfile needs a FROM line")
    return mf


def _value(rest: str, lines: list[str], i: int, line_no: int, instruction: str) -> tuple[str, int]:
    """The value starting at `rest` (the rest of line `line_no`), and the index of the next line."""
    if rest.startswith('"""'):
        body = rest[3:]
        end = body.find('"""')
        if end >= 0:
            tail = body[end + 3:].strip()
            if tail:
                raise ModelfileError(line_no, instruction, f"unexpected text after the closing \"\"\": {tail!r}")
            return body[:end], i
        parts = [body]
        while i < len(lines):
            line = lines[i]
            i += 1
            end = line.find('"""')
            if end >= 0:
                parts.append(line[:end])
                return "\n".join(parts), i
            parts.append(line)
        raise ModelfileError(line_no, instruction, 'unterminated """ string')
    if rest.startswith('"'):
        try:
            value, end = json.JSONDecoder().raw_decode(rest)
        except ValueError:
            raise ModelfileError(line_no, instruction, f"unterminated or invalid quoted string: {rest!r}") from None
        if rest[end:].strip():
            raise ModelfileError(line_no, instruction, f"unexpected text after the string: {rest[end:].strip()!r}")
        return value, i
    return rest, i
