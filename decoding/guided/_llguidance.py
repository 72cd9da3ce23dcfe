"""llguidance backend: JSON Schema, Lark/GBNF grammars, regex and choices.

llguidance compiles lazily (an Earley parser over a lexer built on demand), so compiling takes
about a millisecond and a mask ~10 µs on SmolLM2's 49k vocabulary. It enforces what it accepts
and refuses what it cannot enforce ("Unimplemented keys: [...]", "Unknown format: ..."), which
is the property Weft needs: we run it with `lenient` forced off, so an `x-guidance` block in a
user's schema cannot switch that off.
"""
from __future__ import annotations

import copy
import json
import time
from typing import Any

import llguidance as llg
import torch

from decoding.guided.base import CompiledGrammar, Guide
from decoding.guided.spec import GuidedSpec, schema_json
from common.errors import InvalidArgumentError

# A ceiling on grammar size and per-step work; llguidance's own defaults otherwise.
_LIMITS = dict(max_grammar_size=500_000, max_lexer_states=250_000, step_lexer_fuel=200_000)


class TokenizerInfo:
    """What both backends need to know about the tokenizer, built once per compiler."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        hf = tokenizer.hf
        backend = copy.copy(hf.backend_tokenizer)
        backend.no_padding()
        backend.no_truncation()
        self.tokenizer_json = backend.to_str()
        self.eos_ids: tuple[int, ...] = tuple(int(t) for t in tokenizer.eos_token_ids)
        # The mask must cover the model's vocabulary; the tokenizer may know fewer ids (padded
        # embeddings) or, rarely, more.
        self.vocab_size = max(int(vocab_size), int(tokenizer.vocab_size))
        self.model_vocab_size = int(vocab_size)
        self.words = (self.vocab_size + 31) // 32
        self.ll_tokenizer = llg.LLTokenizer(self.tokenizer_json, n_vocab=self.vocab_size, eos_token=list(self.eos_ids))
        import hashlib

        self.fingerprint = hashlib.sha256(
            f"{self.vocab_size}|{self.eos_ids}|".encode() + self.tokenizer_json.encode()
        ).hexdigest()[:16]

    def token_bytes(self) -> list[bytes | None]:
        """Each id's bytes (None for special tokens and ids the tokenizer does not have)."""
        lt = self.ll_tokenizer
        out: list[bytes | None] = []
        for i in range(self.vocab_size):
            if lt.is_special_token(i):
                out.append(None)
                continue
            b = lt.decode_bytes([i])
            out.append(b if b else None)
        return out


class LLGuidanceGuide(Guide):
    __slots__ = ("_m", "_nbytes")

    def __init__(self, matcher: llg.LLMatcher, words: int) -> None:
        self._m = matcher
        self._nbytes = words * 4

    def fill_bitmask(self, row: torch.Tensor) -> None:
        # The matcher writes EOS bits itself: set exactly when it is accepting.
        self._m.unsafe_compute_mask_ptr(row.data_ptr(), self._nbytes)

    def advance(self, token_id: int) -> bool:
        return self._m.consume_token(int(token_id))

    def rollback(self, n: int) -> None:
        if n and not self._m.rollback(n):
            raise ValueError(f"cannot roll back {n} tokens: {self._m.get_error()}")

    def is_complete(self) -> bool:
        return self._m.is_accepting()

    def is_terminated(self) -> bool:
        return self._m.is_stopped() and not self._m.is_error()

    def forced_tokens(self) -> list[int]:
        if self._m.is_stopped():
            return []
        return list(self._m.compute_ff_tokens())

    def error(self) -> str | None:
        return self._m.get_error() or None if self._m.is_error() else None

    def accepts(self, token_ids: list[int]) -> int:
        # llguidance checks without consuming (a rejected consume_token is ~100x dearer).
        return self._m.validate_tokens([int(t) for t in token_ids])

    def fork(self) -> LLGuidanceGuide:
        return LLGuidanceGuide(self._m.deep_copy(), self._nbytes // 4)


class LLGuidanceGrammar(CompiledGrammar):
    backend = "llguidance"

    def __init__(self, kind: str, template: llg.LLMatcher, words: int, compile_time_s: float) -> None:
        self.kind = kind
        self._template = template     # never advanced: each guide starts from a deep copy
        self._words = words
        self.compile_time_s = compile_time_s

    def _new_guide(self) -> LLGuidanceGuide:
        return LLGuidanceGuide(self._template.deep_copy(), self._words)


class LLGuidanceBackend:
    name = "llguidance"
    kinds = frozenset({"json_schema", "json_object", "regex", "choice", "grammar"})

    def __init__(self, info: TokenizerInfo) -> None:
        self.info = info
        self.limits = llg.LLParserLimits(**_LIMITS)

    def grammar_text(self, spec: GuidedSpec) -> str:
        """The llguidance grammar (JSON text) for a spec; raises InvalidArgumentError."""
        field = spec.field
        try:
            if spec.kind in ("json_schema", "json_object"):
                schema = schema_json(spec) if spec.kind == "json_schema" else '{"type":"object"}'
                # Overrides beat the schema's own "x-guidance" block: nothing is ever relaxed.
                overrides = {
                    "whitespace_flexible": spec.whitespace == "flexible",
                    "lenient": False,
                    "coerce_one_of": False,
                }
                if spec.whitespace == "compact":
                    overrides.update(item_separator=",", key_separator=":")
                return llg.LLMatcher.grammar_from_json_schema(schema, overrides=overrides)
            if spec.kind == "regex":
                return llg.LLMatcher.grammar_from_regex(strip_anchors(spec.value))
            if spec.kind == "choice":
                alts = " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.value)
                return llg.LLMatcher.grammar_from_lark(f"start: {alts}\n")
            if spec.kind == "grammar":
                text = spec.value
                if spec.grammar_syntax == "gbnf":
                    from llguidance.gbnf_to_lark import gbnf_to_lark

                    text = gbnf_to_lark(text)
                return llg.LLMatcher.grammar_from_lark(text)
        except InvalidArgumentError:
            raise
        except Exception as exc:  # ValueError from the converters, GbnfToLarkError
            raise InvalidArgumentError(field, _clean(str(exc))) from None
        raise InvalidArgumentError(field, f"backend llguidance does not support kind {spec.kind!r}")

    def compile(self, spec: GuidedSpec) -> LLGuidanceGrammar:
        t0 = time.perf_counter()
        grammar = self.grammar_text(spec)
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(
            grammar, self.info.ll_tokenizer, limits=self.limits)
        if is_error:
            raise InvalidArgumentError(spec.field, _clean(messages[0] if messages else "invalid"))
        matcher = llg.LLMatcher(self.info.ll_tokenizer, grammar, log_level=0, limits=self.limits)
        if matcher.is_error():
            raise InvalidArgumentError(spec.field, _clean(matcher.get_error()))
        return LLGuidanceGrammar(spec.kind, matcher, self.info.words, time.perf_counter() - t0)


def strip_anchors(regex: str) -> str:
    """The spec's regex always matches the whole output: a leading ^ and trailing $ are redundant
    (and not every engine accepts them), so drop them."""
    if regex.startswith("^"):
        regex = regex[1:]
    if regex.endswith("$") and not _escaped(regex, len(regex) - 1):
        regex = regex[:-1]
    return regex


def _escaped(text: str, i: int) -> bool:
    n = 0
    while i - 1 - n >= 0 and text[i - 1 - n] == "\\":
        n += 1
    return n % 2 == 1


def _clean(message: str) -> str:
    """llguidance errors can carry a multi-line parser dump; keep the first meaningful lines."""
    lines = [ln.rstrip() for ln in message.strip().splitlines() if ln.strip()]
    return " ".join(lines[:4])[:500] if lines else "invalid"
