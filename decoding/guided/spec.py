"""What a request asks guided decoding for: `GuidedSpec`, and its cheap (no compilation) checks.

Kinds:
- `json_schema`: a JSON Schema (dict, or its JSON text); the output is one JSON value valid under it.
- `json_object`: any JSON object (OpenAI's response_format "json_object"); `value` is ignored.
- `regex`: the whole output matches the regular expression (anchored at both ends).
- `choice`: the output is exactly one of a list of non-empty strings.
- `grammar`: a context-free grammar, Lark notation (start rule `start`) or GBNF
  (`grammar_syntax="gbnf"`, start rule `root`).

Every error is an `InvalidArgumentError` whose field is `guided.<kind>` (or `guided.backend`,
`guided.whitespace`), so the API layers can answer INVALID_ARGUMENT naming the member.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from common.errors import InvalidArgumentError

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
BACKENDS = ("auto", "llguidance", "outlines-core")
WHITESPACE = ("compact", "flexible")
GRAMMAR_SYNTAXES = ("lark", "gbnf")

# Size limits checked before anything is compiled (bytes of UTF-8 text).
MAX_SCHEMA_BYTES = 256 * 1024
MAX_REGEX_BYTES = 16 * 1024
MAX_GRAMMAR_BYTES = 128 * 1024
MAX_CHOICES = 1024
MAX_CHOICE_BYTES = 4096


@dataclass(slots=True, frozen=True)
class GuidedSpec:
    kind: str
    value: Any = None
    backend: str = "auto"              # auto | llguidance | outlines-core
    whitespace: str = "compact"        # JSON kinds: compact (no whitespace) | flexible (any JSON whitespace)
    grammar_syntax: str = "lark"       # grammar kind only: lark | gbnf
    # Close the output before max_tokens would cut it (strings end, arrays and objects finish;
    # see budget.py). False: generate freely until max_tokens, which may cut the output mid-value.
    # Not part of the cache key: it changes each request's guide, not the compiled grammar.
    close_before_max_tokens: bool = True
    # Grammar kind: the output is JSON between literal markers (tool calls), so closing plans
    # are made as for JSON (strings end, brackets close) rather than by the plain preference.
    plan_as_json: bool = False

    @property
    def field(self) -> str:
        """The API field errors about this spec name, e.g. "guided.json_schema"."""
        return f"guided.{self.kind}" if self.kind in KINDS else "guided"

    def validate(self) -> None:
        """Cheap structural checks (types, sizes); compiling finds the rest."""
        if self.kind not in KINDS:
            raise InvalidArgumentError("guided", f"kind must be one of {', '.join(KINDS)}; got {self.kind!r}")
        if self.backend not in BACKENDS:
            raise InvalidArgumentError("guided.backend", f"must be one of {', '.join(BACKENDS)}; got {self.backend!r}")
        if self.whitespace not in WHITESPACE:
            raise InvalidArgumentError(
                "guided.whitespace", f"must be one of {', '.join(WHITESPACE)}; got {self.whitespace!r}")
        if not isinstance(self.close_before_max_tokens, bool):
            raise InvalidArgumentError("guided.close_before_max_tokens",
                                       f"must be a bool, got {type(self.close_before_max_tokens).__name__}")
        check = getattr(self, f"_check_{self.kind}")
        check()

    def _check_json_schema(self) -> None:
        schema_json(self)   # parses and size-checks

    def _check_json_object(self) -> None:
        if self.value not in (None, {}, ""):
            raise InvalidArgumentError(self.field, "takes no value")

    def _check_regex(self) -> None:
        _text(self, self.value, MAX_REGEX_BYTES, allow_empty=False)

    def _check_choice(self) -> None:
        choices = self.value
        if isinstance(choices, (str, bytes)) or not isinstance(choices, (list, tuple)):
            raise InvalidArgumentError(self.field, "must be a list of strings")
        if not choices:
            raise InvalidArgumentError(self.field, "must hold at least one string")
        if len(choices) > MAX_CHOICES:
            raise InvalidArgumentError(self.field, f"at most {MAX_CHOICES} choices, got {len(choices)}")
        for c in choices:
            if not isinstance(c, str) or not c:
                raise InvalidArgumentError(self.field, f"every choice must be a non-empty string, got {c!r}")
            if len(c.encode("utf-8", "surrogatepass")) > MAX_CHOICE_BYTES:
                raise InvalidArgumentError(self.field, f"a choice is longer than {MAX_CHOICE_BYTES} bytes")
            _no_surrogates(self, c)

    def _check_grammar(self) -> None:
        if self.grammar_syntax not in GRAMMAR_SYNTAXES:
            raise InvalidArgumentError(
                "guided.grammar.syntax", f"must be one of {', '.join(GRAMMAR_SYNTAXES)}; got {self.grammar_syntax!r}")
        _text(self, self.value, MAX_GRAMMAR_BYTES, allow_empty=False)

    def cache_key(self) -> tuple:
        """Hashable identity of the spec (key order of a schema is kept: it fixes property order)."""
        if self.kind == "json_schema":
            value: Any = schema_json(self)
        elif self.kind == "choice":
            value = tuple(self.value)
        elif self.kind == "json_object":
            value = None
        else:
            value = self.value
        return (self.kind, value, self.backend, self.whitespace,
                self.grammar_syntax if self.kind == "grammar" else None)


def schema_json(spec: GuidedSpec) -> str:
    """The schema of a json_schema spec as compact JSON text, checked to be a JSON object."""
    value = spec.value
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        if len(value.encode("utf-8", "surrogatepass")) > MAX_SCHEMA_BYTES:
            raise InvalidArgumentError(spec.field, f"is larger than {MAX_SCHEMA_BYTES} bytes")
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise InvalidArgumentError(spec.field, f"is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidArgumentError(spec.field, f"must be a JSON object, got {type(value).__name__}")
    try:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(spec.field, f"is not JSON-serialisable: {exc}") from None
    if len(text.encode("utf-8", "surrogatepass")) > MAX_SCHEMA_BYTES:
        raise InvalidArgumentError(spec.field, f"is larger than {MAX_SCHEMA_BYTES} bytes")
    return text


def _text(spec: GuidedSpec, value: Any, limit: int, allow_empty: bool) -> None:
    if not isinstance(value, str):
        raise InvalidArgumentError(spec.field, f"must be a string, got {type(value).__name__}")
    if not value and not allow_empty:
        raise InvalidArgumentError(spec.field, "must not be empty")
    if len(value.encode("utf-8", "surrogatepass")) > limit:
        raise InvalidArgumentError(spec.field, f"is larger than {limit} bytes")
    _no_surrogates(spec, value)


def _no_surrogates(spec: GuidedSpec, value: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgumentError(spec.field, "is not valid UTF-8 (lone surrogate)") from None
