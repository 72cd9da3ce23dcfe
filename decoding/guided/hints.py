"""String hints for the closing planner: short strings that satisfy the schema's `pattern`s.

A JSON Schema `pattern` is unanchored: `RESTRICTED|CLASSIFIED` accepts any string that contains
one of the words. A mask says nothing about how far such a string is from closable (`.*` allows
every character), so the planner (budget.py) cannot find "CLASSIFIED" by probing characters.
It can try a pattern's shortest match instead: this module derives one per pattern (and one per
top-level alternative) from Python's regex parser, checks it with `re.search`, and turns it into
token ids of the JSON-escaped text. Patterns Python cannot parse just give no hint.
"""
from __future__ import annotations

import json
import re
from typing import Any, Iterator

try:  # Python >= 3.11 keeps the parser here; sre_parse is its deprecated alias
    import re._parser as _sre  # type: ignore[import-not-found]
    from re import _constants as _c  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover
    import sre_constants as _c  # type: ignore[no-redef]
    import sre_parse as _sre  # type: ignore[no-redef]

MAX_HINTS = 32
MAX_HINT_CHARS = 64
_CATEGORY = {_c.CATEGORY_DIGIT: "0", _c.CATEGORY_WORD: "a", _c.CATEGORY_SPACE: " ",
             _c.CATEGORY_NOT_DIGIT: "a", _c.CATEGORY_NOT_WORD: "-", _c.CATEGORY_NOT_SPACE: "a"}
_REPEATS = {_c.MAX_REPEAT, _c.MIN_REPEAT, getattr(_c, "POSSESSIVE_REPEAT", _c.MAX_REPEAT)}


def schema_patterns(schema: Any) -> Iterator[str]:
    """Every `pattern` string, `patternProperties` key and `propertyNames.pattern` of a schema."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            for key, value in node.items():
                if key == "pattern" and isinstance(value, str):
                    yield value
                elif key == "patternProperties" and isinstance(value, dict):
                    yield from (k for k in value if isinstance(k, str))
                if isinstance(value, (dict, list)):
                    stack.append(value)


def shortest_matches(pattern: str) -> list[str]:
    """Short strings `re.search(pattern)` accepts: the shortest overall, then the shortest of each
    top-level alternative (another may be what the rest of the string allows)."""
    try:
        parsed = _sre.parse(pattern)
        compiled = re.compile(pattern)
    except (re.error, RecursionError, OverflowError):
        return []
    found = []
    alternatives = [list(parsed)]
    if len(parsed) == 1 and parsed[0][0] == _c.BRANCH:
        alternatives += [list(seq) for seq in parsed[0][1][1]]
    for seq in alternatives:
        text = _shortest(seq)
        if text is not None and len(text) <= MAX_HINT_CHARS and compiled.search(text) and text not in found:
            found.append(text)
    return found


def _shortest(seq: list) -> str | None:
    out = []
    for op, av in seq:
        if op == _c.LITERAL:
            out.append(chr(av))
        elif op == _c.NOT_LITERAL:
            out.append("a" if av != ord("a") else "b")
        elif op == _c.ANY:
            out.append("a")
        elif op == _c.IN:
            ch = _class_member(av)
            if ch is None:
                return None
            out.append(ch)
        elif op == _c.BRANCH:
            options = [s for s in (_shortest(list(alt)) for alt in av[1]) if s is not None]
            if not options:
                return None
            out.append(min(options, key=len))
        elif op == _c.SUBPATTERN:
            sub = _shortest(list(av[-1]))
            if sub is None:
                return None
            out.append(sub)
        elif op in _REPEATS:
            lo, _hi, sub_seq = av
            sub = _shortest(list(sub_seq))
            if sub is None or lo * len(sub) > MAX_HINT_CHARS:
                return None
            out.append(sub * lo)
        elif op == _c.CATEGORY:
            out.append(_CATEGORY.get(av, "a"))
        elif op in (_c.AT, _c.ASSERT, _c.ASSERT_NOT):
            continue      # anchors and look-arounds add no characters (the final check decides)
        elif op == getattr(_c, "ATOMIC_GROUP", None):
            sub = _shortest(list(av))
            if sub is None:
                return None
            out.append(sub)
        else:             # back-references and the like: no hint
            return None
    return "".join(out)


def _class_member(items: list) -> str | None:
    if items and items[0][0] == _c.NEGATE:
        excluded = re.compile(_class_text(items[1:]))
        return next((ch for ch in "a0A-_ .:" if not excluded.fullmatch(ch)), None)
    for op, av in items:
        if op == _c.LITERAL:
            return chr(av)
        if op == _c.RANGE:
            return chr(av[0])
        if op == _c.CATEGORY:
            return _CATEGORY.get(av, "a")
    return None


def _class_text(items: list) -> str:
    """A character class equivalent to `items` (for testing candidates against a negated one)."""
    parts = []
    for op, av in items:
        if op == _c.LITERAL:
            parts.append(re.escape(chr(av)))
        elif op == _c.RANGE:
            parts.append(f"{re.escape(chr(av[0]))}-{re.escape(chr(av[1]))}")
        elif op == _c.CATEGORY:
            parts.append({_c.CATEGORY_DIGIT: r"\d", _c.CATEGORY_WORD: r"\w", _c.CATEGORY_SPACE: r"\s",
                          _c.CATEGORY_NOT_DIGIT: r"\D", _c.CATEGORY_NOT_WORD: r"\W",
                          _c.CATEGORY_NOT_SPACE: r"\S"}.get(av, ""))
    return f"[{''.join(parts)}]" if parts else "[^\\s\\S]"


def string_hints(schema: Any, encode: Any) -> tuple[tuple[int, ...], ...]:
    """Token ids of the JSON-escaped shortest matches of the schema's patterns (`encode`: bytes
    to token ids), at most MAX_HINTS, shortest first."""
    texts: list[str] = []
    for pattern in schema_patterns(schema):
        for text in shortest_matches(pattern):
            if text and text not in texts:
                texts.append(text)
        if len(texts) >= MAX_HINTS:
            break
    texts.sort(key=len)
    hints = []
    for text in texts[:MAX_HINTS]:
        ids = encode(json.dumps(text, ensure_ascii=False)[1:-1].encode())
        if ids:
            hints.append(tuple(ids))
    return tuple(hints)
