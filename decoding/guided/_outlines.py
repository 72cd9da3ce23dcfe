"""outlines-core backend: a regular expression compiled ahead of time into a token-level index.

Regex, choice and JSON Schema (through outlines-core's schema -> regex translation, after
`_schema_check` has refused what that translation would not enforce). No grammars.

Before the index is built (a pass over the whole vocabulary per DFA state), `interegular`
parses the regex and bounds its DFA: a regex it cannot parse is refused with its reason, and one
whose DFA has more than `MAX_DFA_STATES` states is refused as too large, instead of building an
index for minutes. The index then makes a mask a table look-up (a copy of one precomputed row).
"""
from __future__ import annotations

import json
import threading
import time

import interegular
import numpy as np
import outlines_core as oc
import torch

from decoding.guided._llguidance import TokenizerInfo, strip_anchors
from decoding.guided._schema_check import check_outlines_schema
from decoding.guided.base import CompiledGrammar, Guide, set_bits
from decoding.guided.spec import GuidedSpec, schema_json
from common.errors import InvalidArgumentError

MAX_POSITIONS = 4_000
MAX_DFA_STATES = 4_000
MAX_REGEX_CHARS = 200_000
MAX_ROLLBACK = 64
_MAX_FORCED = 64

WHITESPACE_PATTERNS = {"compact": "", "flexible": r"[ \t\n\r]*"}


class OutlinesGrammar(CompiledGrammar):
    backend = "outlines-core"

    def __init__(self, kind: str, index: oc.Index, info: TokenizerInfo, oc_eos: int, compile_time_s: float) -> None:
        self.kind = kind
        self.index = index
        self.words = info.words
        self.eos_ids = info.eos_ids
        self.oc_eos = oc_eos
        self.compile_time_s = compile_time_s
        self.final_states = frozenset(index.get_final_states())
        # Per DFA state: allowed tokens without EOS (computed on first use, shared by all guides).
        self._allowed: dict[int, tuple[int, ...]] = {}
        self._rows: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def allowed(self, state: int) -> tuple[int, ...]:
        got = self._allowed.get(state)
        if got is None:
            tokens = self.index.get_allowed_tokens(state) or []
            got = tuple(t for t in tokens if t != self.oc_eos and t not in self.eos_ids)
            with self._lock:
                self._allowed[state] = got
        return got

    def row(self, state: int) -> np.ndarray:
        """The bitmask words of a state, EOS bits included when it is final (cached; for forks)."""
        got = self._rows.get(state)
        if got is None:
            got = np.zeros(self.words, dtype=np.uint32)
            ids = np.asarray(self.allowed(state), dtype=np.int64)
            if ids.size:
                np.bitwise_or.at(got, ids >> 5, (np.uint32(1) << (ids & 31).astype(np.uint32)))
            if state in self.final_states:
                for t in self.eos_ids:
                    got[t >> 5] |= np.uint32(1 << (t & 31))
            with self._lock:
                self._rows[state] = got
        return got

    def forced_from(self, state: int) -> list[int]:
        out: list[int] = []
        while len(out) < _MAX_FORCED and state not in self.final_states:
            allowed = self.allowed(state)
            if len(allowed) != 1:
                break
            out.append(allowed[0])
            state = self.index.get_next_state(state, allowed[0])
            if state is None:
                break
        return out

    def _new_guide(self) -> OutlinesGuide:
        return OutlinesGuide(self)


class OutlinesGuide(Guide):
    __slots__ = ("_g", "_guide", "_error")

    def __init__(self, grammar: OutlinesGrammar) -> None:
        self._g = grammar
        self._guide = oc.Guide(grammar.index, max_rollback=MAX_ROLLBACK)
        self._error: str | None = None

    def fill_bitmask(self, row: torch.Tensor) -> None:
        g = self._g
        if self._error is not None:
            row.zero_()
            return
        row.zero_()
        self._guide.write_mask_into(row.data_ptr(), g.words, 4)
        # outlines-core knows one EOS id; the engine may have several. EOS iff complete.
        complete = self._guide.is_finished()
        set_bits(row, (g.oc_eos,), False)
        if complete:
            set_bits(row, g.eos_ids, True)

    def advance(self, token_id: int) -> bool:
        if self._error is not None:
            return False
        try:
            self._guide.advance(int(token_id), return_tokens=False)
        except Exception as exc:  # outlines-core raises ValueError for a token with no transition
            self._error = f"token {token_id} rejected: {exc}"
            return False
        return True

    def rollback(self, n: int) -> None:
        if n:
            self._guide.rollback_state(n)
            self._error = None

    def is_complete(self) -> bool:
        return self._error is None and self._guide.is_finished()

    def is_terminated(self) -> bool:
        return self.is_complete() and not self._g.allowed(self._guide.get_state())

    def forced_tokens(self) -> list[int]:
        if self._error is not None:
            return []
        return self._g.forced_from(self._guide.get_state())

    def error(self) -> str | None:
        return self._error

    def fork(self) -> Guide:
        if self._error is not None:
            raise NotImplementedError
        return _StateCursor(self._g, self._guide.get_state())


class _StateCursor(Guide):
    """A guide that is just a DFA state: cheap to copy, for budget planning (no rollback)."""

    __slots__ = ("_g", "_state")

    def __init__(self, grammar: OutlinesGrammar, state: int) -> None:
        self._g = grammar
        self._state: int | None = state

    def fill_bitmask(self, row: torch.Tensor) -> None:
        words = row.numpy().view(np.uint32)
        words[:] = 0
        if self._state is not None:
            words[: self._g.words] = self._g.row(self._state)

    def advance(self, token_id: int) -> bool:
        if self._state is None or int(token_id) in self._g.eos_ids:
            return False
        self._state = self._g.index.get_next_state(self._state, int(token_id))
        return self._state is not None

    def rollback(self, n: int) -> None:
        raise NotImplementedError

    def is_complete(self) -> bool:
        return self._state is not None and self._state in self._g.final_states

    def is_terminated(self) -> bool:
        return self.is_complete() and not self._g.allowed(self._state)

    def forced_tokens(self) -> list[int]:
        return [] if self._state is None else self._g.forced_from(self._state)

    def fork(self) -> Guide:
        if self._state is None:
            raise NotImplementedError
        return _StateCursor(self._g, self._state)


class OutlinesBackend:
    name = "outlines-core"
    kinds = frozenset({"json_schema", "json_object", "regex", "choice"})

    def __init__(self, info: TokenizerInfo) -> None:
        self.info = info
        token_bytes = info.token_bytes()
        # outlines-core's Vocabulary needs an EOS id it keeps out of the token map.
        self.eos = info.eos_ids[0] if info.eos_ids else info.vocab_size - 1
        vocab: dict[bytes, list[int]] = {}
        for i, b in enumerate(token_bytes):
            if b is not None and i not in info.eos_ids:
                vocab.setdefault(b, []).append(i)
        self.vocabulary = oc.Vocabulary(self.eos, vocab)

    def regex_for(self, spec: GuidedSpec) -> str:
        field = spec.field
        if spec.kind == "regex":
            return strip_anchors(spec.value)
        if spec.kind == "choice":
            return "(" + "|".join(escape(c) for c in spec.value) + ")"
        if spec.kind in ("json_schema", "json_object"):
            schema = json.loads(schema_json(spec)) if spec.kind == "json_schema" else {"type": "object"}
            schema = check_outlines_schema(schema, field)
            try:
                return oc.json_schema.build_regex_from_schema(
                    json.dumps(schema), whitespace_pattern=WHITESPACE_PATTERNS[spec.whitespace])
            except Exception as exc:
                raise InvalidArgumentError(field, f"outlines-core: {_first_line(exc)}") from None
        raise InvalidArgumentError(field, f"backend outlines-core does not support kind {spec.kind!r}; use llguidance")

    def compile(self, spec: GuidedSpec) -> OutlinesGrammar:
        t0 = time.perf_counter()
        regex = self.regex_for(spec)
        bound_regex(regex, spec.field)
        try:
            index = oc.Index(regex, self.vocabulary)
        except Exception as exc:
            raise InvalidArgumentError(spec.field, f"outlines-core: {_first_line(exc)}") from None
        return OutlinesGrammar(spec.kind, index, self.info, self.eos, time.perf_counter() - t0)


def bound_regex(regex: str, field: str) -> int:
    """Parse the regex with interegular and refuse it when it is too large: first a size estimate
    from the parse tree (cheap: expanded character positions, counted repetitions multiplied
    out), then the DFA itself (interegular builds it in Python, so the estimate keeps that bounded
    too). Returns the number of DFA states."""
    if len(regex) > MAX_REGEX_CHARS:
        raise InvalidArgumentError(field, f"the regex is {len(regex)} characters; the limit is {MAX_REGEX_CHARS}")
    try:
        pattern = interegular.parse_pattern(regex)
        size = _positions(pattern)
        if size > MAX_POSITIONS:
            raise InvalidArgumentError(
                field, f"the regex expands to about {size} character positions; the limit is {MAX_POSITIONS}")
        fsm = pattern.to_fsm()
    except InvalidArgumentError:
        raise
    except interegular.patterns.Unsupported as exc:
        raise InvalidArgumentError(field, f"unsupported regex construct: {exc}") from None
    except Exception as exc:
        raise InvalidArgumentError(field, f"invalid regex: {type(exc).__name__} {exc}".rstrip()) from None
    n = len(fsm.states)
    if n > MAX_DFA_STATES:
        raise InvalidArgumentError(field, f"the regex needs {n} DFA states; the limit is {MAX_DFA_STATES}")
    return n


def _positions(node) -> int:
    """Character positions of a parsed regex with counted repetitions expanded (an upper bound
    on the size of its Glushkov automaton, up to unbounded repetitions counted once)."""
    from interegular import patterns as P

    if isinstance(node, P._Repeated):
        times = node.max if node.max is not None else max(node.min, 1)
        return _positions(node.base) * max(times, 1)
    if isinstance(node, P._Concatenation):
        return sum(_positions(p) for p in node.parts)
    if isinstance(node, P.Pattern):
        return sum(_positions(o) for o in node.options)
    if isinstance(node, P._NonCapturing):
        raise interegular.patterns.Unsupported("look-around (outlines-core cannot compile it)")
    return 1


_META = set("\\.+*?()|[]{}^$#&-~")


def escape(text: str) -> str:
    """A regex matching `text` literally, valid for both Python's re and Rust's regex crate."""
    out = []
    for ch in text:
        if ch in _META:
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ord(ch) < 0x20:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:500]

