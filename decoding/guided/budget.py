"""Budget-aware guides: guided output that is complete when max_tokens would otherwise cut it.

A grammar alone cannot end a string the schema lets grow: a small model under greedy decoding
loops inside `"1234567890123...` until max_tokens cuts the JSON mid-value. A `BudgetGuide`
wraps a backend's guide with the request's token budget (max_tokens) and counts the tokens it
advanced (sampled and forced alike; `rollback(n)` uncounts them, as speculative decoding needs).

From the first token on it computes a *closing plan*: a short token sequence that completes
the output from the current state (`plan_completion`: jump-forward tokens as the engine
appends them, otherwise the allowed token that closes the most JSON structure, ties broken by
a fixed preference: closers, separators, short literals, digits; inside strings a few distinct
characters). With `slack = remaining - len(plan)` it narrows the mask:

- `slack > SOFT_SLACK + rise`: the backend's mask, unchanged; the plan is checked again after
  a quarter of the slack beyond that has been used, or at once when an object or array
  opens (its required members can lengthen the plan by many tokens). Planning starts at the
  first token: a large schema's shortest document can take most of max_tokens;
- `HARD_SLACK < slack <= SOFT_SLACK + rise` (JSON kinds only; `rise`: the most the plan has
  grown between two checks, i.e. what starting one more element or member has cost; at most
  MAX_RISE): only tokens that only close (`"`, `]`, `}`, `"}`, `end."` ..., EOS when
  complete), else only tokens that open and add nothing (no `[`, `{` or `,` outside a string,
  no string left open: string content, digits, `""`; not inside an object key), else the
  plan's next token: strings end, arrays and objects finish, no optional member or element
  starts, required ones get the planner's short values;
- `slack <= HARD_SLACK`: only the plan's next token; the plan fits what is left, so the output
  completes (EOS, or a grammar that terminates) before max_tokens.

"Closes" and "opens" come from a per-tokenizer table (`BudgetTables`): for every token and each
JSON scanner mode (outside a string, inside one, after a backslash) the change it makes to
phi = open brackets + open strings, its end mode, its last structural byte and whether it
opens or adds anything. Tokens carry whole bytes: `"}` inside a string closes two; `"},{"`
closes two and opens two (a new element: never allowed while narrowing softly).
For regex, choice and grammar kinds only the plan's hard deadline applies.

Requests that end well before max_tokens pay a few plans (~0.1 ms per planned token). A plan
that cannot fit (a schema whose shortest completion is longer than what is left: `minItems:
1000` with 64 tokens) is given up until a rollback returns to an earlier state.
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
        # Inside a string: the tokens that close it; the quote token and the characters a
        # search for a closable string tries.
        self.closes_string = (dphi[STR] < 0) & usable
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
        allowed = tables.unpack(words)
        scores = np.where(allowed, base[mode] if json_mode else base, _INF)
        for t, n in used.items() if (mode != OUT or not json_mode) else ():
            if scores[t] < _INF:
                scores[t] += n * _REUSE
        t = int(scores.argmin())
        if scores[t] >= _INF:
            return None
        if json_mode and mode != OUT:
            in_string = 0 if (allowed & tables.closes_string).any() else in_string + 1
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
                 "_next_check", "_checked_depth", "_gave_up_at", "_last_len", "rise", "narrowed")

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
        self._gave_up_at = -1               # the count at which no plan fitted
        self._last_len = -1                 # length of the last plan computed
        self.rise = 0                       # the most one stretch of output lengthened the plan
        self.narrowed = 0                   # masks narrowed so far (soft or hard)

    @property
    def count(self) -> int:
        """Tokens advanced so far: the output's length (EOS aside)."""
        return len(self._tokens)

    @property
    def remaining(self) -> int:
        return self.max_tokens - len(self._tokens)

    # ---- the Guide interface ----------------------------------------------------------------

    def fill_bitmask(self, row: torch.Tensor) -> None:
        self._g.fill_bitmask(row)
        count = len(self._tokens)
        if self._gave_up_at >= 0:
            return
        if self.remaining <= LOOKAHEAD_REMAINING:
            self._drop_dead_ends(row.numpy().view(np.uint32))
        if count < self._next_check:
            # Opening an object or array can add many required tokens to the plan at once.
            depth = self._depths[-1]
            if depth <= self._checked_depth:
                self._checked_depth = depth
                return
        if self._json:
            self._checked_depth = self._depths[-1]
        plan = self.plan()
        if not plan:
            return
        slack = self._slack(plan)
        # The soft zone widens by the largest rise of the plan seen so far: a new array element
        # or object member the model starts (jump-forward writes its key at once) costs about
        # what the last one did, and must not be started when it cannot be finished.
        soft = SOFT_SLACK + self.rise
        if slack > soft:
            self._next_check = count + max(1, (slack - soft) // 4)
            return
        words = row.numpy().view(np.uint32)
        n = self._t.words
        if slack <= HARD_SLACK:
            keep = self._plan_bits(plan[0]) & words[:n]
            if keep.any():
                words[:n] = keep
                words[n:] = 0
                self.narrowed += 1
            return
        if not self._json:
            return
        mode = self._modes[-1]
        stages = [self._t.close_bits[mode], self._t.noopen_bits[mode], self._plan_bits(plan[0])]
        if mode != OUT and self._in_key(plan, mode):
            del stages[1]       # an object key: the plan's (a required member), not an optional one
        for bits in stages:
            keep = words[:n] & bits
            if keep.any():
                if not np.array_equal(keep, words[:n]):
                    self.narrowed += 1
                    words[:n] = keep
                return

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
        self._tokens.append(t)
        if self._json:
            mode = self._modes[-1]
            known = 0 <= t < self._t.vocab_size
            self._modes.append(int(self._t.end_mode[mode, t]) if known else mode)
            self._depths.append(self._depths[-1] + (int(self._t.dbrackets[mode, t]) if known else 0))
        return True

    def rollback(self, n: int) -> None:
        if not n:
            return
        self._g.rollback(n)
        del self._tokens[len(self._tokens) - n:]
        if self._json:
            del self._modes[len(self._modes) - n:]
            del self._depths[len(self._depths) - n:]
        count = len(self._tokens)
        if self._plan_at > count:
            self._plan = None
        if self._gave_up_at > count:
            self._gave_up_at = -1

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
        if self._tokens or self.plan() is not None:
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
            if self._last_len >= 0:
                self.rise = min(MAX_RISE, max(self.rise, len(plan) - self._last_len))
            self._last_len = len(plan)
        if plan is None:
            if fork is not None and remaining > PLAN_HORIZON:
                self._next_check = count + remaining - PLAN_HORIZON   # try again within the horizon
            else:
                self._gave_up_at = count
        self._plan, self._plan_at = plan, count
        return plan


def _one_bit(words: int, token: int) -> np.ndarray:
    out = np.zeros(words, dtype=np.uint32)
    w, b = divmod(int(token), 32)
    if w < words:
        out[w] = np.uint32(1 << b)
    return out
