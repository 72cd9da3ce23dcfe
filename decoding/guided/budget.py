"""Budget-aware guides: guided output that is complete when max_tokens would otherwise cut it.

A grammar alone cannot end a string the schema lets grow: a small model under greedy decoding
loops inside `"1234567890123...` until max_tokens cuts the JSON mid-value. A `BudgetGuide`
wraps a backend's guide with the request's token budget (max_tokens) and counts the tokens it
advanced (sampled and forced alike; `rollback(n)` uncounts them, as speculative decoding needs).

Once at most `PLAN_HORIZON` tokens remain it computes a *closing plan*: a short token sequence
that completes the output from the current state (`plan_completion`: jump-forward tokens as the
engine appends them, otherwise the allowed token that closes the most JSON structure, ties
broken by a fixed preference: closers, separators, short literals, digits; inside strings a few
distinct characters). With `slack = remaining - len(plan)` it narrows the mask:

- `slack > SOFT_SLACK`: the backend's mask, unchanged; the plan is checked again after a
  quarter of the slack beyond SOFT_SLACK has been used (cheap: a few plans per request);
- `HARD_SLACK < slack <= SOFT_SLACK` (JSON kinds only): only tokens that end with closing
  something (`"`, `]`, `}`, `"}` ..., EOS when complete), else only tokens that open nothing and
  add no `,` (no new string, array, object or element), else unchanged: strings end, arrays
  and objects finish;
- `slack <= HARD_SLACK`: only the plan's next token; the plan fits what is left, so the output
  completes (EOS, or a grammar that terminates) before max_tokens.

"Closes" and "opens" come from a per-tokenizer table (`BudgetTables`): for every token and each
JSON scanner mode (outside a string, inside one, after a backslash) the change it makes to
phi = open brackets + open strings, its end mode and its last structural byte. Tokens carry
whole bytes: `"}` inside a string closes two, `"},` closes two and commits to a next element.
For regex, choice and grammar kinds only the plan's hard deadline applies.

Requests that end well before max_tokens pay nothing beyond a counter. A plan that cannot fit
(a schema whose shortest completion is longer than what is left: `minItems: 1000` with 64
tokens) is given up until a rollback returns to an earlier state.
"""
from __future__ import annotations

import threading
from typing import Any, Callable

import numpy as np
import torch

from decoding.guided.base import Guide

# Planning starts when this many tokens (or fewer) remain; a plan is at most this long.
PLAN_HORIZON = 256
# Narrow softly (close what can be closed, open nothing) when the plan leaves this little slack.
SOFT_SLACK = 8
# Follow the plan when it leaves this little slack: the output ends HARD_SLACK tokens early at
# worst, a margin for a plan that is not the shortest.
HARD_SLACK = 1

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


def _scan(data: bytes, mode: int) -> tuple[int, int, int]:
    """(change in phi, end mode, last structural byte or 0) of `data` read from scanner `mode`.
    Structural: any non-whitespace byte outside a string, and a string's closing quote."""
    d = 0
    last = 0
    for c in data:
        if mode == OUT:
            if c in (0x5B, 0x7B):          # [ {
                d += 1
            elif c in (0x5D, 0x7D):        # ] }
                d -= 1
            elif c == 0x22:                # "
                d += 1
                mode = STR
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
    return d, mode, last


_LITERALS = ('""', "[]", "{}", "0", "null", "true", "false")
_FIRST_CONTENT = "a0@.-_+:/"


def _rank(data: bytes, in_string: bool) -> int:
    """Static preference among tokens that change phi equally (lower first), below 2**19.

    Outside strings the shortest way to finish is a closer, a separator, a short literal, a
    digit. Inside a string (and for regex/grammar kinds) a few distinct single characters that
    formats need early (`a0@.-_+:/`: emails, URIs, dates), then other letters and digits, then
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
                continue
            for m in (OUT, STR, ESC):
                dphi[m, i], end[m, i], last[m, i] = _scan(b, m)
        self.dphi = dphi
        self.end_mode = end
        usable = rank[0] < _INF
        # Planner scores per mode: JSON (close first, then preference) and plain (preference only).
        by_mode = rank[[0, 1, 1]]
        self.json_score = np.where(usable, (dphi << _DPHI_SHIFT) + by_mode, _INF)
        self.plain_score = rank[1]
        # Soft narrowing: per mode, the tokens that close something / that open nothing.
        eos = np.zeros(words * 32, dtype=bool)
        eos[list(self.eos_ids)] = True
        closer = np.isin(last, np.frombuffer(b'"]}', dtype=np.uint8)) & (end == OUT)
        commits = last == ord(",")
        self.close_bits = np.stack([self._pack((dphi[m] < 0) & closer[m] & usable, eos) for m in range(3)])
        self.noopen_bits = np.stack([self._pack((dphi[m] <= 0) & ~commits[m] & usable, eos) for m in range(3)])
        self.eos_bits = self._pack(np.zeros(v, dtype=bool), eos)

    def _pack(self, sel: np.ndarray, extra: np.ndarray) -> np.ndarray:
        bits = extra.copy()
        bits[: self.vocab_size] |= sel
        return np.packbits(bits, bitorder="little").view(np.uint32).copy()

    def unpack(self, row_words: np.ndarray) -> np.ndarray:
        """A bitmask row (uint32 words) as one bool per token id (the tokenizer's vocabulary)."""
        return np.unpackbits(row_words.view(np.uint8), bitorder="little")[: self.vocab_size].astype(bool)


_tables_lock = threading.Lock()


def tables_for(info: Any) -> BudgetTables:
    """The `BudgetTables` of a `TokenizerInfo`, built on first use (on a compiler thread)."""
    got = getattr(info, "_budget_tables", None)
    if got is None:
        with _tables_lock:
            got = getattr(info, "_budget_tables", None)
            if got is None:
                got = BudgetTables(info.token_bytes(), info.eos_ids, info.words)
                info._budget_tables = got
    return got


def plan_completion(fork: Guide, tables: BudgetTables, json_mode: bool, mode: int, limit: int) -> list[int] | None:
    """A short token sequence that completes the output from `fork`'s state (advancing `fork`);
    ends with EOS unless the grammar terminates by itself. None if none fits in `limit` tokens
    or the grammar allows nothing."""
    plan: list[int] = []
    used: dict[int, int] = {}
    row = torch.zeros(tables.words, dtype=torch.int32)
    words = row.numpy().view(np.uint32)
    base = tables.json_score if json_mode else tables.plain_score
    end_mode = tables.end_mode
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


class BudgetGuide(Guide):
    """A backend guide plus the request's token budget: see the module docstring."""

    __slots__ = ("_g", "_t", "_json", "max_tokens", "_tokens", "_modes", "_plan", "_plan_at", "_next_check",
                 "_gave_up_at", "narrowed")

    def __init__(self, inner: Guide, max_tokens: int, tables: BudgetTables, json_mode: bool) -> None:
        self._g = inner
        self._t = tables
        self._json = json_mode
        self.max_tokens = int(max_tokens)
        self._tokens: list[int] = []        # advanced tokens (sampled + forced), net of rollbacks
        self._modes = [OUT]                 # JSON scanner mode after each of them
        self._plan: list[int] | None = None
        self._plan_at = -1                  # the count at which _plan starts
        self._next_check = 0                # no planning before this count
        self._gave_up_at = -1               # the count at which no plan fitted
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
        remaining = self.max_tokens - count
        if remaining > PLAN_HORIZON or count < self._next_check or self._gave_up_at >= 0:
            return
        plan = self.plan()
        if not plan:
            return
        slack = self._slack(plan)
        if slack > SOFT_SLACK:
            self._next_check = count + max(1, (slack - SOFT_SLACK) // 4)
            return
        words = row.numpy().view(np.uint32)
        n = self._t.words
        if slack <= HARD_SLACK:
            keep = self._t.eos_bits.copy() if plan[0] == EOS else _one_bit(n, plan[0])
            keep &= words[:n]
            if keep.any():
                words[:n] = keep
                words[n:] = 0
                self.narrowed += 1
            return
        if not self._json:
            return
        mode = self._modes[-1]
        for bits in (self._t.close_bits[mode], self._t.noopen_bits[mode]):
            keep = words[:n] & bits
            if keep.any():
                if not np.array_equal(keep, words[:n]):
                    self.narrowed += 1
                    words[:n] = keep
                return

    def advance(self, token_id: int) -> bool:
        t = int(token_id)
        if not self._g.advance(t):
            return False
        self._tokens.append(t)
        if self._json:
            mode = self._modes[-1]
            self._modes.append(int(self._t.end_mode[mode, t]) if 0 <= t < self._t.vocab_size else mode)
        return True

    def rollback(self, n: int) -> None:
        if not n:
            return
        self._g.rollback(n)
        del self._tokens[len(self._tokens) - n:]
        if self._json:
            del self._modes[len(self._modes) - n:]
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

    # ---- planning -------------------------------------------------------------------------

    def slack(self) -> int | None:
        """Tokens to spare beyond the closing plan (None: no plan, or it does not fit)."""
        plan = self.plan()
        return None if not plan else self._slack(plan)

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
        limit = min(self.max_tokens - count, PLAN_HORIZON)
        plan = None if fork is None else plan_completion(
            fork, self._t, self._json, self._modes[-1] if self._json else OUT, limit)
        if plan is None:
            self._gave_up_at = count
        self._plan, self._plan_at = plan, count
        return plan


def _one_bit(words: int, token: int) -> np.ndarray:
    out = np.zeros(words, dtype=np.uint32)
    w, b = divmod(int(token), 32)
    if w < words:
        out[w] = np.uint32(1 << b)
    return out
