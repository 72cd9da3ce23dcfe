"""Budget-aware guides: guided output that is complete when max_tokens would otherwise cut it.

A grammar alone cannot end a string the schema lets grow: a small model under greedy decoding
loops inside `"1234567890123...` until max_tokens cuts the JSON mid-value. A `BudgetGuide`
wraps a backend's guide with the request's token budget (max_tokens) and counts the tokens it
advanced (sampled and forced alike; `rollback(n)` uncounts them, as speculative decoding needs).

From the first token on it computes a *closing plan*: a short token sequence that completes
the output from the current state (`plan_completion`: jump-forward tokens as the engine
appends them, otherwise the allowed token that closes the most JSON structure, ties broken by
a fixed preference: closers, separators, short literals, digits; inside strings a few distinct
characters). The invariant it keeps: some plan fits what is left. With `slack = remaining -
len(plan)` it narrows the mask:

- `slack > SOFT_SLACK + rise`: the backend's mask, except (JSON kinds) the tokens that *grow*
  the structure (a bracket left open, a `,` outside strings: a new element or member) after
  which no plan fits what is left (`_verify_growth`). One such token can lengthen the plan by
  more than any slack (`[{` into an array whose objects have fifty required properties), so
  each is verified by planning from just after it, at most MAX_GROWTH_CHECKS per step; inside
  a string the verdicts of its closing tokens (`","`, `"}`) are kept until the room left nears
  them. The plan is checked again after a quarter of the slack beyond the soft zone has been
  used, or at once when an object or array opens;
- `HARD_SLACK < slack <= SOFT_SLACK + rise` (JSON kinds only; `rise`: the most the plan has
  grown between two checks, i.e. what tokens that are not verified have cost; at most
  MAX_RISE): the plan's next token, plus at most SOFT_CHOICES of the model's own choices, each
  verified: tokens that only close (`"`, `]`, `}`, `"}`, `end."` ...), else tokens that open
  and add nothing (string content, digits, `""`; not inside an object key); EOS when complete.
  Strings end, arrays and objects finish, no optional member or element starts, required ones
  get the planner's short values;
- `slack <= HARD_SLACK`: only the plan's next token; the plan fits what is left, so the output
  completes (EOS, or a grammar that terminates) before max_tokens.

A token verified this way brings its plan along: taking it makes that plan the current one.

"Closes", "opens" and "grows" come from a per-tokenizer table (`BudgetTables`): for every token
and each JSON scanner mode (outside a string, inside one, after a backslash) the change it
makes to phi = open brackets + open strings, its end mode, its last structural byte and
whether it opens or adds anything. Tokens carry whole bytes: `"}` inside a string closes two;
`"},{"` closes two and opens two (a new element). For regex, choice and grammar kinds only the
plan's hard deadline applies; tool calls are planned as JSON, and where the output may end (the
text before an auto-mode call) nothing counts as open: the scanner restarts there, a `,` at the
top level grows nothing, a growth token after which the output may still end needs no plan,
and the soft zone offers no `]` that would close nothing.

The mask at a position is a function of the tokens before it, as speculative decoding needs
(its output must be plain decoding's): the planner's state (schedule, cached and verified plans,
verdicts, rise) is saved at every position, `rollback(n)` restores the state of the position it
returns to, and accepted drafts re-advanced without a new mask continue from the state their
draft mask left. At positions the grammar forces (the engine appends them without a mask) the
planner does not step, and the mask is the forced token.

Requests that end well before max_tokens pay a few plans (~0.04 ms per planned token) and the
verification of the growth tokens their masks allow. A plan that cannot fit (a schema whose
shortest completion is longer than what is left: `minItems: 1000` with 64 tokens) is tried
again after 1, 2, 4 ... MAX_BACKOFF tokens: the planner may find one again a few tokens on.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from decoding.guided.base import CompiledGrammar, Guide

if TYPE_CHECKING:
    from decoding.sampling import SamplingParams

# A plan is at most this long: with more left than this, a plan that does not fit is tried
# again later instead of given up.
PLAN_HORIZON = 1024
# Narrow softly (close what can be closed, open nothing) when the plan leaves this little slack.
SOFT_SLACK = 8
# ... plus the largest rise of the plan between two checks, up to this much.
MAX_RISE = 48
# With this few tokens left, a choice between at most LOOKAHEAD_CHOICES tokens drops those after
# which no complete output fits (`_drop_dead_ends`): a plan per candidate, only near the end.
LOOKAHEAD_REMAINING = 96
LOOKAHEAD_CHOICES = 4
# In the soft zone, at most this many of the model's own closing choices are kept beside the
# plan's next token, each verified (a plan after it must fit), and only while plans are this short.
SOFT_CHOICES = 4
VERIFY_MAX_PLAN = 96
# Tokens that grow the structure (open a bracket, add a `,`) are verified before they are
# allowed, at most this many per step (the best by preference; the others are not allowed).
MAX_GROWTH_CHECKS = 16
# A plan that did not fit is tried again after this many tokens, doubling up to MAX_BACKOFF.
MAX_BACKOFF = 32
# The state on reaching each position and after each mask (with the plans its verified tokens
# found) is kept this many positions back: as deep as a backend rolls back (outlines-core: 64), deeper than any draft.
KEEP_FILLED = 64
# Follow the plan when it leaves this little slack: the output ends HARD_SLACK tokens early at
# worst, a margin for a plan that is not the shortest.
HARD_SLACK = 1
# Inside a string the planner writes preferred characters; after this many without the string
# becoming closable it searches strings of SEARCH_CHARS up to SEARCH_DEPTH long for one that
# makes it closable (an unanchored `[0-9]+,[0-9]+` needs "0,0" somewhere; 12**3 probes at most).
SEARCH_AFTER = 12
SEARCH_DEPTH = 3
SEARCH_CHARS = "0,a.-:/@_ 1A"

# Candidates (best preference first) the planner tries one token ahead for regex and grammar
# kinds: a matcher copy and one token each (~2 us, more when the lexer meets a new state).
LOOKAHEAD = 32

EOS = -1          # a plan's last element when the output ends with an EOS token

# JSON scanner modes.
OUT, STR, ESC = 0, 1, 2
_INF = np.int64(1) << 62
_DPHI_SHIFT = 40      # score = dphi << 40 | rank + reuses * _REUSE: closing first
_REUSE = 16           # inside a string, a character used n times yields to ones 16 * n ranks worse
_SPECIAL = frozenset(b'"[]{}\\')


def _scan(data: bytes, mode: int) -> tuple[int, int, int, bool]:
    """Read `data` from scanner `mode`: (change in phi, end mode, last structural byte or 0,
    whether it opens or adds anything: a `[`, `{` or `,` outside strings, or a string it
    leaves open).
    Structural: any non-whitespace byte outside a string, and a string's closing quote."""
    d = 0
    last = 0
    adds = False
    start = mode
    for c in data:
        if mode == OUT:
            if c in (0x5B, 0x7B):          # [ {
                d += 1
                adds = True
            elif c in (0x5D, 0x7D):        # ] }
                d -= 1
            elif c == 0x22:                # "
                d += 1
                mode = STR
            elif c == 0x2C:                # ,
                adds = True
            if c not in (0x20, 0x09, 0x0A, 0x0D):
                last = c
        elif mode == STR:
            if c == 0x5C:                  # backslash
                mode = ESC
            elif c == 0x22:
                d -= 1
                mode = OUT
                last = c
        else:
            mode = STR
    # A string opened here and still open at the end adds one (`"abc`; not `""`, `"a"`).
    opened_string = mode == STR and (start == OUT or data.count(b'"') >= 2)
    return d, mode, last, adds or opened_string


def _comma_outside(data: bytes, mode: int) -> bool:
    """Whether `data`, read from scanner `mode`, has a `,` outside strings (a new member or element)."""
    for c in data:
        if mode == OUT:
            if c == 0x2C:
                return True
            if c == 0x22:
                mode = STR
        elif mode == STR:
            mode = ESC if c == 0x5C else (OUT if c == 0x22 else STR)
        else:
            mode = STR
    return False


_LITERALS = ('""', "[]", "{}", "0", "null", "true", "false")
_FIRST_CONTENT = "a1@.-_+:/0"   # 1 before 0: year 0000 is no date for Python


def _rank(data: bytes, in_string: bool) -> int:
    """Static preference among tokens that change phi equally (lower first), below 2**19.

    Outside strings the shortest way to finish is a closer, a separator, a short literal, a
    digit. Inside a string (and for regex/grammar kinds) a few distinct single characters that
    formats need early (`a1@.-_+:/0`: emails, URIs, dates), then other letters and digits, then
    the rest; a character used before yields to the next ones (`_REUSE`), so a pattern that
    needs a rarer character reaches it after a few steps."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        return 200_000 + len(data)
    if text.strip() == "" and not (in_string and text == " "):
        return 400_000 + len(text)                    # whitespace: never needed to finish
    if not in_string:
        if set(text) <= set('"]}'):
            return len(text)                          # among equal closers, the shortest
        if text in (",", ":"):
            return 10
        if text in _LITERALS:
            return 20 + _LITERALS.index(text)
        if len(text) == 1:
            if text.isdigit():
                return 100 + int(text)
            return 200 + ord(text)                    # - . e E t f n ...
        return 1_000 + 10 * len(text)
    if len(text) == 1:
        if text in _FIRST_CONTENT:
            return 100 + _FIRST_CONTENT.index(text)
        if text.isalnum():
            return 200 + ord(text)
        return 400 + ord(text)
    return 1_000 + 10 * len(text) + (0 if text.isalnum() else 5)


class BudgetTables:
    """Per-tokenizer tables for budget-aware guides (built once, ~0.5 s for a 49k vocabulary)."""

    def __init__(self, token_bytes: list[bytes | None], eos_ids: tuple[int, ...], words: int) -> None:
        v = len(token_bytes)
        self.vocab_size = v
        self.words = words
        self.eos_ids = tuple(int(t) for t in eos_ids)
        self.token_bytes = token_bytes
        dphi = np.zeros((3, v), dtype=np.int64)
        end = np.tile(np.arange(3, dtype=np.int8)[:, None], (1, v))
        last = np.zeros((3, v), dtype=np.uint8)
        adds = np.zeros((3, v), dtype=bool)
        rank = np.full((2, v), _INF, dtype=np.int64)      # [outside a string, inside one]
        for i, b in enumerate(token_bytes):
            if b is None or i in self.eos_ids:
                continue
            rank[0, i] = _rank(b, False)
            rank[1, i] = _rank(b, True)
            if _SPECIAL.isdisjoint(b):
                end[ESC, i] = STR                     # its first byte ends a pending escape
                stripped = b.strip(b" \t\n\r")
                last[OUT, i] = stripped[-1] if stripped else 0
                adds[OUT, i] = b"," in b
                continue
            for m in (OUT, STR, ESC):
                dphi[m, i], end[m, i], last[m, i], adds[m, i] = _scan(b, m)
        self.dphi = dphi
        self.end_mode = end
        usable = rank[0] < _INF
        # Planner scores per mode: JSON (close first, then preference) and plain (preference only).
        by_mode = rank[[0, 1, 1]]
        self.json_score = np.where(usable, (dphi << _DPHI_SHIFT) + by_mode, _INF)
        self.plain_score = rank[1]
        eos = np.zeros(words * 32, dtype=bool)
        eos[list(self.eos_ids)] = True
        # Soft narrowing: per mode, the tokens that only close (`"`, `"}`, `end."`; not `"},{"`)
        # and the tokens that open and add nothing (string content, digits, `]`; not `","`).
        closer = np.isin(last, np.frombuffer(b'"]}', dtype=np.uint8)) & (end == OUT) & ~adds
        self.close_bits = np.stack([self._pack((dphi[m] < 0) & closer[m] & usable, eos) for m in range(3)])
        self.noopen_bits = np.stack([self._pack((dphi[m] <= 0) & ~adds[m] & usable, eos) for m in range(3)])
        # Open brackets (not strings) per token and mode, for re-planning when structure opens.
        self.dbrackets = dphi - (end != OUT) + (np.arange(3)[:, None] != OUT)
        self.eos_bits = self._pack(np.zeros(v, dtype=bool), eos)
        # Tokens that grow the structure: a bracket left open, or a `,` outside strings. Each
        # can lengthen the shortest completion by a whole element or member: verified first.
        comma = np.zeros((3, v), dtype=bool)
        for i, b in enumerate(token_bytes):
            if b is not None and b"," in b and i not in self.eos_ids:
                for m in (OUT, STR, ESC):
                    comma[m, i] = _comma_outside(b, m)
        grows = ((self.dbrackets > 0) | comma) & usable
        self.grow_bits = np.stack([self._pack(grows[m], np.zeros_like(eos)) for m in range(3)])
        # At the top level (no bracket open) a `,` separates nothing in JSON: only brackets grow
        # there. (Auto-mode tool calls: commas in the text before a call are prose.)
        self.open_bits = np.stack([self._pack((self.dbrackets[m] > 0) & usable, np.zeros_like(eos))
                                   for m in range(3)])
        # Tokens that close anything (`]`, `].`, `"}` ...): none is a choice where nothing is open.
        self.shut_bits = np.stack([self._pack((dphi[m] < 0) & usable, np.zeros_like(eos)) for m in range(3)])
        # Inside a string: the tokens that close it; the quote token and the characters a
        # search for a closable string tries.
        self.closes_string = (dphi[STR] < 0) & usable
        self.closes_string_bits = self._pack(self.closes_string, np.zeros_like(eos))
        # Token ids by JSON score, per mode (ties by id, as argmin breaks them): the planner finds
        # its choice among the first few instead of scoring the whole vocabulary.
        self.json_order = np.argsort(self.json_score, axis=1, kind="stable")
        self.json_sorted = np.take_along_axis(self.json_score, self.json_order, axis=1)
        single = {b: i for i, b in reversed(list(enumerate(token_bytes)))
                  if b is not None and len(b) == 1 and i not in self.eos_ids}
        self.quote: int | None = single.get(b'"')
        self.search_chars = [single[bytes([c])] for c in SEARCH_CHARS.encode() if bytes([c]) in single]
        self._by_bytes: dict[bytes, int] | None = None

    def encode(self, data: bytes) -> list[int] | None:
        """Token ids spelling `data`, longest match first: a plan needs some spelling the grammar
        accepts, not the tokenizer's own. None if a byte has no token."""
        if self._by_bytes is None:
            by: dict[bytes, int] = {}
            for i, b in enumerate(self.token_bytes):
                if b and len(b) <= 16 and i not in self.eos_ids:
                    by.setdefault(b, i)
            self._by_bytes = by
        out, i = [], 0
        while i < len(data):
            for n in range(min(16, len(data) - i), 0, -1):
                t = self._by_bytes.get(data[i:i + n])
                if t is not None:
                    out.append(t)
                    i += n
                    break
            else:
                return None
        return out

    def _pack(self, sel: np.ndarray, extra: np.ndarray) -> np.ndarray:
        bits = extra.copy()
        bits[: self.vocab_size] |= sel
        return np.packbits(bits, bitorder="little").view(np.uint32).copy()

    def unpack(self, row_words: np.ndarray) -> np.ndarray:
        """A bitmask row (uint32 words) as one bool per token id (the tokenizer's vocabulary)."""
        return np.unpackbits(row_words.view(np.uint8), bitorder="little")[: self.vocab_size].astype(bool)


def plan_completion(fork: Guide, tables: BudgetTables, json_mode: bool, mode: int, limit: int,
                    hints: tuple[tuple[int, ...], ...] = ()) -> list[int] | None:
    """A short token sequence that completes the output from `fork`'s state (advancing `fork`);
    ends with EOS unless the grammar terminates by itself. None if none fits in `limit` tokens
    or the grammar allows nothing. `hints`: strings (token ids) that satisfy the schema's
    patterns (hints.py), tried when characters alone do not make a string closable."""
    plan: list[int] = []
    used: dict[int, int] = {}
    row = torch.zeros(tables.words, dtype=torch.int32)
    words = row.numpy().view(np.uint32)
    base = tables.json_score if json_mode else tables.plain_score
    end_mode = tables.end_mode
    in_string = 0           # content tokens since the current string could last have closed
    while True:
        if fork.is_terminated():
            return plan
        if fork.is_complete():
            plan.append(EOS)
            return plan if len(plan) <= limit else None
        if len(plan) >= limit:
            return None
        forced = fork.forced_tokens()
        if forced:
            for t in forced:
                if not fork.advance(t):
                    return None
                plan.append(t)
                mode = int(end_mode[mode, t])
            continue
        fork.fill_bitmask(row)
        if json_mode:
            t = _best_json(tables, words, mode, used if mode != OUT else None)
            if t < 0:
                return None
            scores = None
        else:
            scores = np.where(tables.unpack(words), base, _INF)
            for t, n in used.items():
                if scores[t] < _INF:
                    scores[t] += n * _REUSE
            t = int(scores.argmin())
            if scores[t] >= _INF:
                return None
        if json_mode and mode != OUT:
            closable = bool((words[:tables.words] & tables.closes_string_bits).any())
            in_string = 0 if closable else in_string + 1
            if in_string == SEARCH_AFTER:
                # The preferred characters have not made this string closable: search for a
                # short way there. On failure keep going as before.
                path = _search_closable(fork, tables, limit - len(plan), hints)
                if path:
                    plan += path
                    for t in path:
                        mode = int(end_mode[mode, t])
                    continue
        if not json_mode:
            # Regex / grammar: look one token ahead, among the preferred ones, for one after
            # which the output is complete (`a[b-y]*z` needs the z). (JSON strings get by
            # without: a lexer state per probe is too dear for minLength counts.)
            t = _lookahead(fork, scores, t)
        if not fork.advance(t):
            return None
        if mode != OUT or not json_mode:     # content: try another character next time
            used[t] = used.get(t, 0) + 1
        plan.append(t)
        mode = int(end_mode[mode, t])


# The planner's JSON choice is looked for among this many best-scored tokens first.
_CHUNK = 256


def _best_json(tables: BudgetTables, words: np.ndarray, mode: int, used: dict[int, int] | None) -> int:
    """The allowed token with the least JSON score (plus the reuse penalty of `used` ones), ties
    to the lower id: what an argmin over the whole vocabulary picks; -1 when none is allowed."""
    order, ranked = tables.json_order[mode], tables.json_sorted[mode]
    start = 0
    while start < 2 * _CHUNK and ranked[start] < _INF:
        ids = order[start:start + _CHUNK]
        hit = ids[((words[ids >> 5] >> (ids & 31).astype(np.uint32)) & 1).astype(bool)]
        if hit.size:
            scores = tables.json_score[mode][hit].copy()
            if used:
                for i, t in enumerate(hit.tolist()):
                    scores[i] += used.get(t, 0) * _REUSE
            best = int(np.lexsort((hit, scores))[0])
            end = start + _CHUNK
            # Penalties only raise scores: no token further down the order can beat this one.
            if end >= order.shape[0] or scores[best] < ranked[end]:
                return int(hit[best])
            break
        start += _CHUNK
    return _best_json_full(tables, words, mode, used)


def _best_json_full(tables: BudgetTables, words: np.ndarray, mode: int, used: dict[int, int] | None) -> int:
    scores = np.where(tables.unpack(words), tables.json_score[mode], _INF)
    for t, n in (used or {}).items():
        if scores[t] < _INF:
            scores[t] += n * _REUSE
    t = int(scores.argmin())
    return t if scores[t] < _INF else -1


def _search_closable(fork: Guide, tables: BudgetTables, room: int,
                     hints: tuple[tuple[int, ...], ...] = ()) -> list[int] | None:
    """The shortest string of SEARCH_CHARS (iterative deepening, up to SEARCH_DEPTH) after which
    the JSON string `fork` is in can close; failing that, a hint (a pattern's shortest match)
    followed by at most two such characters. Advances `fork` along what it returns. A mask says
    nothing about the state of an unanchored pattern's lexer (`.*` allows every character), so
    probing the closing quote after each candidate is the only test: a small alphabet keeps it
    cheap."""
    quote, chars = tables.quote, tables.search_chars
    if quote is None:
        return None

    def dfs(node: Guide, depth: int, path: list[int]) -> list[int] | None:
        for t in chars:
            if depth == 1:
                if node.accepts([t, quote]) == 2:
                    return path + [t]
                continue
            if not node.accepts([t]):
                continue
            child = node.fork()
            if child.advance(t):
                found = dfs(child, depth - 1, path + [t])
                if found:
                    return found
        return None

    def deepen(node: Guide, max_depth: int, prefix: list[int]) -> list[int] | None:
        for depth in range(1, max_depth + 1):
            path = dfs(node, depth, prefix)
            if path:
                return path
        return None

    try:
        path = deepen(fork, min(SEARCH_DEPTH, room), [])
        for hint in hints if path is None else ():
            hint = list(hint)
            if len(hint) >= room:
                continue
            n = fork.accepts(hint + [quote])
            if n == len(hint) + 1:
                path = hint
                break
            if n == len(hint):
                child = fork.fork()
                if all(child.advance(t) for t in hint):
                    path = deepen(child, min(2, room - len(hint) - 1), hint)
                    if path:
                        break
        if path:
            for t in path:
                fork.advance(t)
        return path
    except NotImplementedError:
        return None


def _lookahead(fork: Guide, scores: np.ndarray, best: int) -> int:
    k = min(LOOKAHEAD, int((scores < _INF).sum()))
    if k <= 1:
        return best
    top = np.argpartition(scores, k - 1)[:k]
    for t in top[np.argsort(scores[top], kind="stable")]:
        t = int(t)
        try:
            probe = fork.fork()
        except NotImplementedError:
            return best
        if not probe.advance(t):
            continue
        if probe.is_complete():
            return t
    return best


class BudgetGrammar(CompiledGrammar):
    """A backend's grammar whose guides know the request's token budget: what GuideCompiler
    hands out. Backends know nothing of budgets; the compiler wraps each grammar it compiles,
    with the tokenizer's tables and the schema's string hints (hints.py)."""

    def __init__(self, inner: CompiledGrammar, tables: BudgetTables,
                 string_hints: tuple[tuple[int, ...], ...] = ()) -> None:
        self.inner = inner
        self.backend = inner.backend
        self.kind = inner.kind
        self.compile_time_s = inner.compile_time_s
        self.budget_tables = tables
        self.string_hints = string_hints      # shortest matches of the schema's patterns

    def new_guide(self, params: SamplingParams | None = None, *, max_tokens: int | None = None) -> Guide:
        """A fresh guide at the start of the grammar, for one generated sequence.

        Given the request's `params` (or a `max_tokens` budget), the guide counts the tokens it
        advances and closes the output before the budget runs out, unless
        `params.guided.close_before_max_tokens` is False. Without either it never narrows its
        masks beyond the grammar."""
        guide = self.inner.new_guide()
        spec = getattr(params, "guided", None) if params is not None else None
        if params is not None:
            max_tokens = params.max_tokens if spec is None or spec.close_before_max_tokens else None
        if max_tokens is None:
            return guide
        # Tool calls are JSON between literal markers: plan their closing as JSON.
        json_mode = self.kind in ("json_schema", "json_object") or bool(getattr(spec, "plan_as_json", False))
        return BudgetGuide(guide, max_tokens, self.budget_tables, json_mode, self.string_hints)

    def _new_guide(self) -> Guide:
        return self.inner.new_guide()


class BudgetGuide(Guide):
    """A backend guide plus the request's token budget: see the module docstring."""

    __slots__ = ("_g", "_t", "_json", "_hints", "max_tokens", "_tokens", "_modes", "_depths", "_plan", "_plan_at",
                 "_next_check", "_checked_depth", "_gave_up_at", "_retry_at", "_backoff", "_last_len", "_last_depth", "_pending",
                 "_anchors", "_verdicts", "_verdict_anchor", "rise", "narrowed", "refused_growth",
                 "_trail", "_after", "_filled", "_dirty")

    # The planner's state that a step changes (the check schedule, the cached and verified plans,
    # the verdicts, the rise, the counters). It is saved at every position so that the mask at
    # a position is a function of the tokens before it: a speculative draft fills masks ahead
    # and is rolled back, and the output must be the one plain decoding gives.
    _STATE = ("_plan", "_plan_at", "_next_check", "_checked_depth", "_gave_up_at", "_retry_at", "_backoff",
              "_last_len", "_last_depth", "_pending", "_verdicts", "_verdict_anchor", "rise", "narrowed",
              "refused_growth")

    def __init__(self, inner: Guide, max_tokens: int, tables: BudgetTables, json_mode: bool,
                 hints: tuple[tuple[int, ...], ...] = ()) -> None:
        self._g = inner
        self._t = tables
        self._json = json_mode
        self._hints = hints
        self.max_tokens = int(max_tokens)
        self._tokens: list[int] = []        # advanced tokens (sampled + forced), net of rollbacks
        self._modes = [OUT]                 # JSON scanner mode after each of them
        self._depths = [0]                  # and open brackets
        self._plan: list[int] | None = None
        self._plan_at = -1                  # the count at which _plan starts
        self._next_check = 0                # no planning before this count ...
        self._checked_depth = 0             # ... unless brackets opened beyond this depth since
        self._gave_up_at = -1               # the count at which no plan fitted ...
        self._retry_at = 0                  # ... and when to try again (backing off)
        self._backoff = 1
        self._last_len = -1                 # length of the last plan computed ...
        self._last_depth = 0                # ... and the open brackets then
        self._pending: dict[int, list[int]] = {}   # this step's verified tokens -> the plan after each
        self._anchors = [0]                 # per count: the last count at which no string was open
        self._verdicts: dict[int, int] = {}  # token -> tokens needed after it (-1: none fits), at ...
        self._verdict_anchor = 0            # ... this anchor (verdicts at other anchors are dropped)
        self.rise = 0                       # the most one stretch of output lengthened the plan
        self.narrowed = 0                   # masks narrowed so far (soft or hard)
        self.refused_growth = 0             # growth tokens taken out because no completion fitted after them
        # Per position k (the tokens in _trail[:k], always the current tokens' prefix as far as
        # they go): _after[k] the state on reaching k, _filled[k] the state after the mask at k
        # was computed (None: none was, e.g. jump-forward). Kept beyond the current count after a
        # rollback: re-advancing the same tokens (accepted drafts) picks up where plain
        # decoding would be, without filling those masks again.
        self._trail: list[int] = []
        self._after: list[tuple | None] = [self._save()]
        self._filled: list[tuple | None] = [None]
        self._dirty = False                 # a mask was computed at the current count

    @property
    def count(self) -> int:
        """Tokens advanced so far: the output's length (EOS aside)."""
        return len(self._tokens)

    @property
    def remaining(self) -> int:
        return self.max_tokens - len(self._tokens)

    # ---- the Guide interface ----------------------------------------------------------------

    def _save(self) -> tuple:
        return tuple(dict(v) if isinstance(v, dict) else v for v in (getattr(self, f) for f in self._STATE))

    def _load(self, state: tuple) -> None:
        # Dicts are copied both ways: the live ones are changed in place.
        for f, v in zip(self._STATE, state):
            setattr(self, f, dict(v) if isinstance(v, dict) else v)

    def fill_bitmask(self, row: torch.Tensor) -> None:
        self._g.fill_bitmask(row)
        count = len(self._tokens)
        if self._dirty:     # a second mask at this count starts from the same state as the first
            self._load(self._after[count])
        words = row.numpy().view(np.uint32)
        forced = self._g.forced_tokens()
        if forced:
            # The engine mostly appends forced tokens without a mask (jump-forward after a
            # sampled token; not at the first token, nor for requests with logprobs, nor after
            # an accepted draft that is not the last), so the planner never steps here: a draft
            # walking through them sees the state plain decoding has. The mask is the token
            # jump-forward appends (a draft of another spelling of the same text would make the
            # output differ from plain decoding's).
            keep = _one_bit(self._t.words, forced[0]) & words[:self._t.words]
            if keep.any():
                words[:self._t.words] = keep
                words[self._t.words:] = 0
            self._filled[count] = None
            self._dirty = False
            return
        self._dirty = True
        self._step(words, count)
        self._filled[count] = self._save()

    def _step(self, words: np.ndarray, count: int) -> None:
        """The planner's part of the mask at `count` (`words`: the backend's mask, narrowed in place)."""
        self._pending = {}
        if self.remaining <= LOOKAHEAD_REMAINING:
            self._drop_dead_ends(words)
        if self._gave_up_at >= 0 and count < self._retry_at:
            return
        # Opening an object or array can add many required tokens to the plan at once.
        opened = self._json and self._depths[-1] > self._checked_depth
        if count >= self._next_check or opened or self._gave_up_at >= 0:
            if self._json:
                self._checked_depth = self._depths[-1]
            plan = self.plan()
            if not plan:
                return
            slack = self._slack(plan)
            # The soft zone widens by the largest rise of the plan seen so far (what the tokens
            # that are not verified have cost).
            soft = SOFT_SLACK + self.rise
            if slack <= soft:
                # In the soft zone every step is checked (the plan is cached while followed):
                # the next token may be the model's own choice again.
                self._next_check = count + 1
                self._narrow(words, plan, slack)
                return
            self._next_check = count + max(1, (slack - soft) // 4)
        else:
            self._checked_depth = min(self._checked_depth, self._depths[-1])
        if self._json:
            self._verify_growth(words)

    def _verify_growth(self, words: np.ndarray) -> None:
        """Take out of the mask the tokens that grow the structure (a new element or member, an
        opened bracket) after which no complete output fits what is left: one such token can
        lengthen the shortest completion by more than any slack (`[{` into an array of objects
        with fifty required properties). At most MAX_GROWTH_CHECKS are verified, the best by
        the planner's preference; the others are taken out too. Never empties the mask."""
        n = self._t.words
        grows = self._t.grow_bits if self._depths[-1] > 0 else self._t.open_bits
        risky = words[:n] & grows[self._modes[-1]]
        if not risky.any():
            return
        # Where the output may end (free text before an auto-mode tool call), a token after
        # which it still may end needs no plan: the end fits. Such tokens are not capped.
        complete = self._g.is_complete()
        ids = np.flatnonzero(self._t.unpack(risky))
        order = ids[np.argsort(self._t.json_score[self._modes[-1]][ids], kind="stable")]
        room = self.remaining - 1
        # Inside a string the verdicts of its closing tokens (`","`, `"}` ...) are kept: what
        # follows a string does not depend on its content, only the room shrinks. Near the edge
        # (within the soft zone's width) they are verified again.
        anchor, margin = self._anchors[-1], SOFT_SLACK + self.rise
        if anchor != self._verdict_anchor:      # verdicts of another string: no longer used
            self._verdicts, self._verdict_anchor = {}, anchor
        out, checks = [], 0
        for t in order.tolist():
            need = self._verdicts.get(t)
            if need is not None and (need < 0 or need + margin <= room):
                if need < 0:
                    out.append(t)
                continue
            if complete and room >= 1 and self._still_complete(t):
                self._verdicts[t] = 1           # the end (EOS) right after it
                continue
            checks += 1
            if checks > MAX_GROWTH_CHECKS or not self._fits_after(t, room):
                out.append(t)
                self._verdicts[t] = -1
            else:
                plan = self._pending[t]
                self._verdicts[t] = len(plan) + (not plan or plan[-1] != EOS)
        if not out:
            return
        keep = words[:n].copy()
        for t in out:
            w, b = divmod(t, 32)
            keep[w] &= np.uint32(~(1 << b) & 0xFFFFFFFF)
        if keep.any():
            words[:n] = keep
            self.refused_growth += len(out)

    def _still_complete(self, token: int) -> bool:
        """Whether the output may still end after `token` (no lookahead: False)."""
        try:
            fork = self._g.fork()
        except NotImplementedError:
            return False
        return fork.advance(token) and fork.is_complete()

    def _fits_after(self, token: int, room: int) -> bool:
        """Whether a complete output fits in `room` tokens after `token`; the plan found is kept
        for the step (advance() adopts it)."""
        if token in self._pending:
            return True
        try:
            fork = self._g.fork()
        except NotImplementedError:
            return True     # no way to look ahead: the token stays
        if not fork.advance(token):
            return False
        mode = int(self._t.end_mode[self._modes[-1], token]) if self._json and token < self._t.vocab_size else OUT
        plan = plan_completion(fork, self._t, self._json, mode, max(room, 0), self._hints)
        if plan is None or len(plan) + (not plan or plan[-1] != EOS) > room:
            return False
        self._pending[token] = plan
        return True

    def _narrow(self, words: np.ndarray, plan: list[int], slack: int) -> None:
        """The mask near the end: the plan's next token, plus (JSON kinds, slack above HARD_SLACK)
        up to SOFT_CHOICES of the model's own choices, each verified: tokens that only close
        (`"`, `"}`, `end."` ...) or, when none is allowed, tokens that open and add nothing
        (digits, `""`, `null`; not inside an object key). EOS stays when the output is complete."""
        if slack > HARD_SLACK and not self._json:
            return          # regex, choice, grammar: the hard deadline only
        n = self._t.words
        allowed = words[:n].copy()
        keep = self._plan_bits(plan[0]) & allowed
        if slack > HARD_SLACK and len(plan) <= VERIFY_MAX_PLAN:
            mode = self._modes[-1]
            keep |= allowed & self._t.eos_bits
            # At the top level outside strings nothing is open: a `]` there closes nothing
            # (text before an auto-mode tool call), so no closers are offered.
            top = mode == OUT and self._depths[-1] == 0
            choices = allowed & self._t.close_bits[mode] & ~self._t.eos_bits if not top else allowed & 0
            if not choices.any() and not (mode != OUT and self._in_key(plan, mode)):
                choices = allowed & self._t.noopen_bits[mode] & ~self._t.eos_bits
                if top:
                    choices &= ~self._t.shut_bits[mode]
            ids = np.flatnonzero(self._t.unpack(choices))
            ids = ids[np.argsort(self._t.json_score[mode][ids], kind="stable")]
            room = self.remaining - 1
            for t in ids[:SOFT_CHOICES + 1].tolist():
                if t != plan[0] and self._fits_after(t, room):
                    w, b = divmod(t, 32)
                    keep[w] |= np.uint32(1 << b)
        if keep.any() and not np.array_equal(keep, allowed):
            words[:n] = keep
            words[n:] = 0
            self.narrowed += 1

    def _drop_dead_ends(self, words: np.ndarray) -> None:
        """At a choice between a few tokens (another tool call or the end, one more enum value
        or the closing bracket), forbid those after which no complete output fits what is
        left: the plan from the current state cannot see that a separator commits to a whole
        new element. Never forbids them all."""
        n = self._t.words
        if not 2 <= int(np.bitwise_count(words[:n]).sum()) <= LOOKAHEAD_CHOICES:
            return
        allowed = np.flatnonzero(self._t.unpack(words[:n]))
        left = self.remaining - 1
        dead = []
        for t in allowed.tolist():
            if t == EOS or t in self._t.eos_ids:
                continue
            try:
                fork = self._g.fork()
            except NotImplementedError:
                return
            mode = int(self._t.end_mode[self._modes[-1], t]) if self._json and 0 <= t < self._t.vocab_size else OUT
            if not fork.advance(t) or plan_completion(fork, self._t, self._json, mode, max(left, 0), self._hints) is None:
                dead.append(t)
        if dead and len(dead) < len(allowed):
            for t in dead:
                w, b = divmod(t, 32)
                words[w] &= np.uint32(~(1 << b) & 0xFFFFFFFF)
            self.narrowed += 1

    def advance(self, token_id: int) -> bool:
        t = int(token_id)
        if not self._g.advance(t):
            return False
        count = len(self._tokens)
        if not self._dirty and self._filled[count] is not None:
            # The mask here was computed before a rollback (a draft position): go on from the
            # state it left, as plain decoding does after computing it.
            self._load(self._filled[count])
        self._tokens.append(t)
        verified = self._pending.get(t)
        self._pending = {}
        if verified is not None:        # the plan its verification found: the plan from here
            self._plan, self._plan_at, self._last_len = verified, len(self._tokens), len(verified)
            self._last_depth = self._depths[-1] if self._json else 0
        if self._json:
            mode = self._modes[-1]
            known = 0 <= t < self._t.vocab_size
            self._modes.append(int(self._t.end_mode[mode, t]) if known else mode)
            self._depths.append(self._depths[-1] + (int(self._t.dbrackets[mode, t]) if known else 0))
            if (self._modes[-1] != OUT or self._depths[-1]) and self._g.is_complete():
                # The output may end here, so nothing is open: what the scanner counted was not
                # JSON (text before an auto-mode tool call: a quote, a bracket in prose).
                self._modes[-1], self._depths[-1] = OUT, 0
            self._anchors.append(len(self._tokens) if self._modes[-1] == OUT else self._anchors[-1])
        self._dirty = False
        self._record(count, t)
        return True

    def _record(self, count: int, token: int) -> None:
        """Save the state reached by `token` at position `count`; a different token than the
        trail's there drops the trail beyond (its states belong to another prefix)."""
        if count < len(self._trail) and self._trail[count] == token:
            self._after[count + 1] = self._save()
            return
        del self._trail[count:], self._after[count + 1:], self._filled[count + 1:]
        self._trail.append(token)
        self._after.append(self._save())
        self._filled.append(None)
        if count >= KEEP_FILLED:
            # States that far back are memory no rollback reaches (a long output kept one per token).
            self._filled[count - KEEP_FILLED] = None
            self._after[count - KEEP_FILLED] = None

    def rollback(self, n: int) -> None:
        if not n:
            return
        self._g.rollback(n)
        del self._tokens[len(self._tokens) - n:]
        if self._json:
            del self._modes[len(self._modes) - n:]
            del self._depths[len(self._depths) - n:]
            del self._anchors[len(self._anchors) - n:]
        # Exactly the state plain decoding had on reaching this count: schedule, plans, verdicts.
        self._load(self._after[len(self._tokens)])
        self._dirty = False

    def is_complete(self) -> bool:
        return self._g.is_complete()

    def is_terminated(self) -> bool:
        return self._g.is_terminated()

    def forced_tokens(self) -> list[int]:
        return self._g.forced_tokens()

    def error(self) -> str | None:
        return self._g.error()

    def fork(self) -> Guide:
        return self._g.fork()

    def _in_key(self, plan: list[int], mode: int) -> bool:
        """Whether the string being written is an object key: the plan closes it with `":`."""
        tb, end = self._t.token_bytes, self._t.end_mode
        after = None
        for t in plan:
            if t == EOS:
                return False
            data = tb[t] or b""
            if after is not None:
                rest = (after + data).lstrip(b" \t\n\r")
                if rest:
                    return rest[:1] == b":"
                after = rest
                continue
            nxt = int(end[mode, t])
            if nxt == OUT:      # this token closes the string: what follows its quote?
                m, i = mode, 0
                while m != OUT and i < len(data):
                    m = ESC if m == STR and data[i] == 0x5C else (OUT if m == STR and data[i] == 0x22 else STR)
                    i += 1
                after = data[i:].lstrip(b" \t\n\r")
                if after:
                    return after[:1] == b":"
            mode = nxt
        return False

    def _plan_bits(self, token: int) -> np.ndarray:
        return self._t.eos_bits.copy() if token == EOS else _one_bit(self._t.words, token)

    # ---- planning -------------------------------------------------------------------------

    def slack(self) -> int | None:
        """Tokens to spare beyond the closing plan (None: no plan, or it does not fit)."""
        plan = self.plan()
        return None if not plan else self._slack(plan)

    def shortfall(self) -> int | None:
        """Before the first token: the length of the shortest complete output the planner finds,
        when max_tokens is too small for it (the output could only be cut); None when it fits
        or no length is known."""
        if self._tokens:
            return None
        state = self._save()
        fits = self.plan() is not None
        self._load(state)       # a question, not a step: the first mask is planned as usual
        if fits:
            return None
        try:
            fork = self._g.fork()
        except NotImplementedError:
            return None
        plan = plan_completion(fork, self._t, self._json, OUT, PLAN_HORIZON, self._hints)
        if plan is None:
            return None
        need = len(plan) + (plan[-1] != EOS)
        return need if need > self.max_tokens else None

    def _slack(self, plan: list[int]) -> int:
        # A plan that ends by terminating the grammar (no EOS) gets one token more: ending on
        # the max_tokens-th token would report finish reason "length" for a complete output.
        return self.max_tokens - len(self._tokens) - len(plan) - (plan[-1] != EOS)

    def plan(self) -> list[int] | None:
        """The closing plan from the current state: cached while the sequence follows it (a
        draft that was rolled back leaves it valid); None when none fits what is left."""
        count = len(self._tokens)
        plan, at = self._plan, self._plan_at
        if plan is not None and at <= count and count - at < len(plan) and \
                self._tokens[at:] == plan[: count - at]:
            return plan[count - at:]
        try:
            fork = self._g.fork()
        except NotImplementedError:
            fork = None
        remaining = self.max_tokens - count
        plan = None if fork is None else plan_completion(
            fork, self._t, self._json, self._modes[-1] if self._json else OUT, min(remaining, PLAN_HORIZON),
            self._hints)
        if plan is not None:
            # What the plan grew by since the last one, unless structure opened in between
            # (a growth token, verified; or forced ones, which leave no choice): that is what
            # the unverified tokens cost, and the soft zone widens by it.
            depth = self._depths[-1] if self._json else 0
            if self._last_len >= 0 and depth <= self._last_depth:
                self.rise = min(MAX_RISE, max(self.rise, len(plan) - self._last_len))
            self._last_len, self._last_depth = len(plan), depth
            self._gave_up_at, self._backoff = -1, 1
        if plan is None:
            if fork is not None and remaining > PLAN_HORIZON:
                self._next_check = count + remaining - PLAN_HORIZON   # try again within the horizon
            else:
                # Not for good: the planner may find a way again a few tokens on (out of a
                # string it could not close, say).
                self._gave_up_at = count
                self._retry_at = count + self._backoff
                self._backoff = min(MAX_BACKOFF, 2 * self._backoff)
        self._plan, self._plan_at = plan, count
        return plan


def _one_bit(words: int, token: int) -> np.ndarray:
    out = np.zeros(words, dtype=np.uint32)
    w, b = divmod(int(token), 32)
    if w < words:
        out[w] = np.uint32(1 << b)
    return out
