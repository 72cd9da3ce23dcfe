"""Token-level conformance: does a guide accept a JSON value, token by token?

A value is serialised (compact separators, UTF-8) and tokenised as the model's tokenizer does;
each token must be in the guide's mask and accepted, and the guide complete at the end.

A JSON value has more than one spelling, and a guide writes one: llguidance writes an object's
properties in the order the schema lists them (a documented departure; outlines-core does the
same), and a number with an integral value as an integer (`1`, not `1.0`: the same number for
JSON Schema). So a value refused in its own spelling is tried with its integral numbers written
as integers, and when a serialisation is refused at an object's key, the key order of that
object is repaired: a later key moved into the
refused place, or the refused key moved before an earlier one, the first change that the guide
takes up to the moved key's `:`; and so on until the value is accepted or no change helps. The
value then counts as accepted (`reordered`: in another spelling). The whole serialisation is replayed each time:
where the text is forced llguidance admits only the tokenizer's own tokens (`{"`, `}}`), so text
is never fed piecewise. Invalid values get the same search: "invalid accepted" means that some
key order got through.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jsonschema
import torch

# Replays of one value while repairing its key order, at most.
MAX_REPLAYS = 1000

Encode = Callable[[str], list[int]]
Decode = Callable[[list[int]], str]


def serialise(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class _Slot:
    start: int            # where the member starts: its `,` (or just after the object's `{`)
    end: int              # just after its key's `:`
    path: tuple           # the object's path in the value
    index: int            # the member's position among the object's keys


def _serialise(value: Any, orders: dict[tuple, list]) -> tuple[str, list[_Slot]]:
    out: list[str] = []
    slots: list[_Slot] = []
    pos = 0

    def put(text: str) -> None:
        nonlocal pos
        out.append(text)
        pos += len(text)

    def walk(v: Any, path: tuple) -> None:
        if isinstance(v, dict):
            put("{")
            for i, key in enumerate(orders.get(path) or list(v)):
                start = pos
                put(("," if i else "") + serialise(key) + ":")
                slots.append(_Slot(start, pos, path, i))
                walk(v[key], path + (key,))
            put("}")
        elif isinstance(v, list):
            put("[")
            for i, item in enumerate(v):
                if i:
                    put(",")
                walk(item, path + (i,))
            put("]")
        else:
            put(serialise(v))

    walk(value, ())
    return "".join(out), slots


class _Replayer:
    def __init__(self, grammar: Any, encode: Encode, decode: Decode, words: int) -> None:
        self.grammar, self.encode, self.decode = grammar, encode, decode
        self.row = torch.zeros(words, dtype=torch.int32)
        self.replays = 0

    def refused(self, text: str, mask_times: list[float] | None = None) -> tuple[int, int] | None:
        """None when the guide accepts `text` in full (and is complete); else the character span
        of the refused token (the text's end when it is incomplete). The guide's own check of a
        token sequence finds a refusal fast; a text it takes is replayed token by token, each in
        the mask, before it counts as accepted."""
        self.replays += 1
        ids = self.encode(text)
        if mask_times is None:
            n = self.grammar.new_guide().accepts(ids)
            if n < len(ids):
                return self._span(ids, n)
        guide = self.grammar.new_guide()
        for i, t in enumerate(ids):
            t0 = time.perf_counter()
            guide.fill_bitmask(self.row)
            if mask_times is not None:
                mask_times.append(time.perf_counter() - t0)
            if not (int(self.row[t >> 5]) >> (t & 31)) & 1 or not guide.advance(t):
                return self._span(ids, i)
        return None if guide.is_complete() else (len(text), len(text))

    def _span(self, ids: list[int], i: int) -> tuple[int, int]:
        return len(self.decode(ids[:i])), len(self.decode(ids[:i + 1]))


def accepts(grammar: Any, value: Any, encode: Encode, decode: Decode, words: int,
            mask_times: list[float] | None = None, schema: Any = None) -> tuple[bool, bool]:
    """(accepted, reordered): whether the guide accepts `value`, and whether that took a
    spelling other than the value's own. `mask_times` gets the mask time of each token of the
    value's own serialisation. `schema`: the schema the grammar was compiled from; integral
    numbers are respelt as integers only when `jsonschema` gives the respelt value the same
    verdict under it (not so in drafts 3 and 4, where 1.0 is not an integer); None: never."""
    replayer = _Replayer(grammar, encode, decode, words)
    orders: dict[tuple, list] = {}
    text, slots = _serialise(value, orders)
    span = replayer.refused(text, mask_times)
    if span is not None and _integral(value) is not value and _same_verdict(schema, value, _integral(value)):
        value = _integral(value)
        text, slots = _serialise(value, orders)
        span = replayer.refused(text)
        if span is None:
            return True, True
    while span is not None:
        # The members whose separator or key the refused token overlaps, innermost first, and
        # the one starting just after it: where the text is forced llguidance admits only the
        # tokenizer's own tokens (`}}` closing two objects), so a `}` is refused before the `,`
        # of a key that may not follow.
        hits = [s for s in slots if s.start <= span[1] and span[0] < s.end][::-1]
        for slot in hits:
            repaired = _repair(replayer, value, orders, slot)
            if repaired is not None:
                orders, span, slots = repaired
                break
        else:
            return False, False
    return True, bool(orders)


def _repair(replayer: _Replayer, value: Any, orders: dict, slot: _Slot) -> tuple[dict, Any, list[_Slot]] | None:
    """Key orders with one change at `slot`'s object that the guide takes up to the moved key's
    `:`, with the replay's result; None when no change does (or the replays are spent)."""
    keys = orders.get(slot.path) or list(_at(value, slot.path))
    j = slot.index
    candidates = [(keys[:j] + [keys[m]] + keys[j:m] + keys[m + 1:], j) for m in range(j + 1, len(keys))]
    candidates += [(keys[:p] + [keys[j]] + keys[p:j] + keys[j + 1:], p) for p in range(j - 1, -1, -1)]
    for trial_keys, placed in candidates:
        if replayer.replays >= MAX_REPLAYS:
            return None
        trial = {**orders, slot.path: trial_keys}
        text, slots = _serialise(value, trial)
        span = replayer.refused(text)
        moved = next(s for s in slots if s.path == slot.path and s.index == placed)
        if span is None or span[0] >= moved.end:
            return trial, span, slots
    return None


def _same_verdict(schema: Any, value: Any, other: Any) -> bool:
    """Whether `jsonschema` (the schema's own draft, formats asserted) says the same of both."""
    if schema is None:
        return False
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    validator = cls(schema, format_checker=cls.FORMAT_CHECKER)
    try:
        return validator.is_valid(value) == validator.is_valid(other)
    except Exception:   # a schema the validator cannot evaluate (a remote $ref, say): no respelling
        return False


def _integral(value: Any) -> Any:
    """`value` with its integral floats as ints (`1.0` -> `1`); `value` itself when it has none."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2 ** 63:
        return int(value)
    if isinstance(value, list):
        items = [_integral(v) for v in value]
        return items if any(a is not b for a, b in zip(items, value)) else value
    if isinstance(value, dict):
        entries = {k: _integral(v) for k, v in value.items()}
        return entries if any(entries[k] is not value[k] for k in value) else value
    return value


def _at(value: Any, path: tuple) -> Any:
    for part in path:
        value = value[part]
    return value
