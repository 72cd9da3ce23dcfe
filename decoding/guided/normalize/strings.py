"""Strings that a string schema rejects, as schemas: the complements `not` needs.

Two complements are exact and regular, so a backend enforces them as a `pattern`:
- a finite set of strings (`enum`, `const`, `^(a|b)$`): every other string. The regex walks the
  set's trie: at each node, end here (unless the node is a member), or take a character no member
  continues with and then anything, or follow a member's next character;
- a pattern that is one character class repeated over the whole string (`^[a-z]+$`,
  `^\\s*$`): a string with a character outside the class (plus the empty string for `+`).
The class is reused verbatim, so backend and validator read it as they read the original.

Regex semantics differ at one point between ECMA-262 (what JSON Schema specifies, and what
llguidance implements: `$` is the end of the string) and Python's `re` (what `jsonschema`, the
oracle, uses: `$` also matches before a final newline, so `^[a-z]+$` matches "ab\n"). The
complements here hold under both readings of the regex they are given and emit regexes that read
the same under both: a pattern's complement leaves out the strings Python's `$` lets it match,
and a literal set's regex is anchored only where a final newline cannot matter.
"""
from __future__ import annotations

import re
from typing import Any

# A set of literals larger than this (total characters) is not turned into a regex.
MAX_LITERAL_CHARS = 4096
_ANY = r"[\s\S]"


def char(c: str) -> str:
    """One character as a regex atom both Python's `re` and Rust's `regex` read literally."""
    o = ord(c)
    if c.isascii() and c.isalnum():
        return c
    if o < 0x80:
        return f"\\x{o:02x}"
    if o < 0x10000:
        return f"\\u{o:04x}"
    return f"\\U{o:08x}"


def other_than(strings: list[str]) -> str | None:
    """An anchored regex matching exactly the strings not in `strings`; None when too large, or
    when a member ends with a newline that Python's `$` could match before (its prefix is not a
    member)."""
    members = set(strings)
    if sum(len(s) for s in strings) > MAX_LITERAL_CHARS or any(
            s.endswith("\n") and s[:-1] not in members for s in strings):
        return None
    trie: dict = {}
    for s in strings:
        node = trie
        for c in s:
            node = node.setdefault(c, {})
        node[""] = {}          # end marker: a member ends here

    def comp(node: dict) -> str:
        alts = [] if "" in node else [""]
        nexts = sorted(k for k in node if k)
        if nexts:
            alts.append("[^" + "".join(char(c) for c in nexts) + "]" + _ANY + "*")
            alts += [char(c) + comp(node[c]) for c in nexts]
        else:
            alts.append(_ANY + "+")
        return "(?:" + "|".join(alts) + ")"

    return "^" + comp(trie) + "$"


# `^X+$` / `^X*$` with X one class, escape or character; the pattern text is parsed by hand so
# that X is reused exactly as written.
_CLASS = r"\[(?:\\.|[^\]\\])+\]"
_ESCAPED_CLASS = r"\\[dDwWsS]"
_REPEATED = re.compile(rf"\^({_CLASS}|{_ESCAPED_CLASS}|[A-Za-z0-9 _])([+*])\$")


def _inner(atom: str) -> str | None:
    """The class body of a positive atom (`[a-z]` -> `a-z`, `\\d` -> `\\d`, `a` -> `a`), to
    build `[^...]` from; None for a negated class or one using set operations (engines differ)."""
    if atom.startswith("["):
        inner = atom[1:-1]
        if inner.startswith("^") or re.search(r"\[|&&|--|~~", inner):
            return None
        return inner
    return atom


def not_matching(pattern: str) -> Any:
    """A schema accepting exactly the strings `pattern` does not match (other types aside:
    the caller adds them), or None when this module cannot say."""
    m = _REPEATED.fullmatch(pattern)
    if m:
        atom, repeat = m.group(1), m.group(2)
        inner = _inner(atom)
        try:
            newline_inside = re.fullmatch(atom, "\n") is not None
        except re.error:
            return None
        if inner is None:
            return None
        if newline_inside:
            outside = {"type": "string", "pattern": f"[^{inner}]"}
            extra: list[str] = []
        else:
            # Python's `$` also matches `^X*$` on "t\n" (t in X*): a character outside X other
            # than the newline, or a newline with something after it. For `+`, "\n" itself is out.
            outside = {"type": "string", "pattern": f"[^\\n{inner}]|\\n[\\s\\S]"}
            extra = ["\n"]
        if repeat == "*":
            return outside
        return {"anyOf": [{"type": "string", "enum": ["", *extra]}, outside]}
    members = literal_alternatives(pattern)
    if members is not None:
        # Python's `$` also matches before a final newline: "cat\n" matches `^(cat|dog)$`.
        rx = other_than(members + [s + "\n" for s in members])
        return None if rx is None else {"type": "string", "pattern": rx}
    return None


def literal_alternatives(pattern: str) -> list[str] | None:
    """The strings an anchored pattern of plain alternatives (`^(a|b)$`, `^abc$`) matches."""
    atom = r"(?:[A-Za-z0-9_ -]|\\[./-])*"
    m = re.fullmatch(rf"\^\(({atom}(?:\|{atom})*)\)\$|\^({atom})\$", pattern)
    if not m:
        return None
    body = m.group(1) if m.group(1) is not None else m.group(2)
    return [alt.replace("\\", "") for alt in body.split("|")]
