"""Which JSON Schemas outlines-core's regex translation enforces faithfully.

outlines-core 0.2.x turns a schema into one regular expression, dispatching on the *first* of
these keys a schema object has: properties, allOf, anyOf, oneOf, prefixItems, enum, const, $ref,
type. Everything else in that object is dropped without a word, and a few translations are wrong
outright (allOf concatenates its members; oneOf is anyOf; numeric bounds are ignored; a $ref cycle
is cut at depth 3 by silently leaving properties out). A regex that admits invalid JSON would
break Weft's guarantee, so before translating we walk the schema and refuse, naming the keyword,
every construct the translation would ignore or get wrong. What remains is enforced exactly or
more strictly (e.g. properties in schema order, no undeclared properties): outputs always validate.
"""
from __future__ import annotations

import json
import re
from typing import Any

from common.errors import InvalidArgumentError

# Every JSON Schema keyword that constrains instances (draft 4 .. 2020-12). Other keys are
# annotations (title, description, default, $defs ...) or not keywords at all: no effect on validation.
_VALIDATION = frozenset({
    "type", "enum", "const", "multipleOf", "maximum", "exclusiveMaximum", "minimum", "exclusiveMinimum",
    "maxLength", "minLength", "pattern", "format", "items", "additionalItems", "prefixItems", "contains",
    "maxContains", "minContains", "maxItems", "minItems", "uniqueItems", "unevaluatedItems",
    "properties", "patternProperties", "additionalProperties", "propertyNames", "required",
    "maxProperties", "minProperties", "dependentRequired", "dependentSchemas", "dependencies",
    "unevaluatedProperties", "allOf", "anyOf", "oneOf", "not", "if", "then", "else", "$ref",
    "$dynamicRef", "$recursiveRef",
})
# outlines-core 0.2.14's string formats that it enforces faithfully. Its "uri" and "email"
# regexes lack the quotes, "time" admits a stray backslash, "date" does not know month lengths
# (2022-02-31) and "date-time" makes the UTC offset optional: all refused.
_FORMATS = frozenset({"uuid"})
_TYPES = ("string", "number", "integer", "boolean", "null", "array", "object")
# A `pattern` may only produce characters that are legal, unescaped, inside a JSON string.
_JSON_STRING_CHAR = r'[^"\\\x00-\x1f]'


def check_outlines_schema(schema: dict, field: str) -> dict:
    """Raise InvalidArgumentError naming the first construct outlines-core would not enforce;
    return the schema normalised for its translator (annotation-only subschemas become {},
    `additionalProperties: false` without properties becomes `maxProperties: 0`)."""
    schema = _normalise(schema)
    _Checker(schema, field).check(schema, "#", ())
    return schema


_ANY = ({"type": "boolean"}, {"type": "null"}, {"type": "number"}, {"type": "string"}, {"type": "array"},
        {"type": "object"})
_SUBSCHEMA_MAPS = ("properties", "definitions", "$defs")
_SUBSCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")
_SUBSCHEMA_ONE = ("items", "additionalProperties")


def _normalise(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    out = {}
    for k, v in node.items():
        if k in _SUBSCHEMA_MAPS and isinstance(v, dict):
            v = {name: _normalise(sub) for name, sub in v.items()}
        elif k in _SUBSCHEMA_LISTS and isinstance(v, list):
            v = [_normalise(sub) for sub in v]
        elif k in _SUBSCHEMA_ONE and isinstance(v, dict):
            v = _normalise(v)
        out[k] = v
    if not any(k in _VALIDATION for k in out):
        # Annotations only: any JSON value. outlines-core spells {} as an alternation it does not
        # parenthesise, so inside a property or a tuple it would split the surrounding regex
        # (`"a":(true|false)|(null)|...` matches a bare `null`). An explicit anyOf is wrapped.
        # Definitions stay (a $ref may point into them).
        kept = {k: v for k, v in out.items() if k in ("definitions", "$defs")}
        return {"anyOf": [dict(t) for t in _ANY], **kept}
    if isinstance(out.get("pattern"), str):
        # outlines-core pastes the pattern between quotes, as `("` + p + `")`: a top-level
        # alternation in p would escape the quotes. Group it (anchors kept for its stripping).
        p = out["pattern"]
        inner = p[1:-1] if p.startswith("^") and p.endswith("$") and not p.endswith("\\$") else p
        out["pattern"] = f"^({inner})$"
    t = out.get("type")
    if out.get("additionalProperties") is False and "properties" not in out and t == "object":
        del out["additionalProperties"]
        out["maxProperties"] = 0
    return out


class _Checker:
    def __init__(self, root: dict, field: str) -> None:
        self.root = root
        self.field = field

    def fail(self, where: str, message: str) -> None:
        raise InvalidArgumentError(self.field, f"{message} (at {where}; backend outlines-core)")

    def unsupported(self, where: str, keyword: str, why: str = "") -> None:
        self.fail(where, f"unsupported keyword {keyword!r}" + (f": {why}" if why else ""))

    def check(self, node: Any, where: str, refs: tuple[str, ...]) -> None:
        if isinstance(node, bool):
            # true/false schemas are not translated by outlines-core
            self.fail(where, f"boolean schema {json.dumps(node)} is not supported")
        if not isinstance(node, dict):
            self.fail(where, "a schema must be a JSON object")
        keys = {k for k in node if k in _VALIDATION}
        if not keys:
            return  # {}: any JSON value (outlines-core nests it two levels deep at most)
        for kw in ("not", "if", "then", "else", "dependentRequired", "dependentSchemas", "dependencies",
                   "patternProperties", "propertyNames", "unevaluatedItems", "unevaluatedProperties",
                   "contains", "minContains", "maxContains", "uniqueItems", "multipleOf", "minimum",
                   "maximum", "exclusiveMinimum", "exclusiveMaximum", "additionalItems", "$dynamicRef",
                   "$recursiveRef"):
            if kw in node:
                self.unsupported(where, kw)
        branch = next((k for k in ("properties", "allOf", "anyOf", "oneOf", "prefixItems", "enum", "const",
                                   "$ref", "type") if k in node), None)
        if branch is None:
            # e.g. only "required" or "minLength" without "type": outlines-core refuses these itself,
            # but say which keyword it is.
            self.unsupported(where, sorted(keys)[0], "needs a \"type\" beside it")
        getattr(self, "_" + branch.lstrip("$"))(node, where, refs, keys - {branch})

    # ---- dispatch branches ---------------------------------------------------------------------

    def _only(self, where: str, extra: set[str], allowed: set[str]) -> None:
        for kw in sorted(extra - allowed):
            self.unsupported(where, kw, "ignored next to the keyword that decides this schema")

    def _type_allows(self, node: dict, name: str) -> bool:
        t = node.get("type")
        return t is None or t == name or (isinstance(t, list) and name in t)

    def _properties(self, node: dict, where: str, refs: tuple, extra: set[str]) -> None:
        # Only the listed properties are produced, in schema order: stricter than the schema,
        # hence sound, but "type" must admit an object and every required key must be listed.
        self._only(where, extra, {"type", "required", "additionalProperties", "minProperties", "maxProperties"})
        if not self._type_allows(node, "object"):
            self.unsupported(where, "type", f"{node['type']!r} beside \"properties\"")
        props = node["properties"]
        if not isinstance(props, dict):
            self.fail(where, "\"properties\" must be an object")
        required = node.get("required", [])
        if not isinstance(required, list):
            self.fail(where, "\"required\" must be a list")
        for name in required:
            if name not in props:
                self.unsupported(where, "required", f"{name!r} is required but not in \"properties\"")
        n_required = len(set(required))
        if "minProperties" in node and node["minProperties"] > n_required:
            self.unsupported(where, "minProperties", "only enforced when every property is required")
        if "maxProperties" in node and node["maxProperties"] < len(props):
            self.unsupported(where, "maxProperties", "only enforced when it is at least the number of properties")
        for name, sub in props.items():
            self.check(sub, f"{where}/properties/{name}", refs)

    def _allOf(self, node: dict, where: str, refs: tuple, extra: set[str]) -> None:
        members = node["allOf"]
        if not isinstance(members, list) or len(members) != 1:
            self.unsupported(where, "allOf", "outlines-core concatenates the members instead of intersecting them")
        self._only(where, extra, set())
        self.check(members[0], f"{where}/allOf/0", refs)

    def _anyOf(self, node: dict, where: str, refs: tuple, extra: set[str]) -> None:
        members = node["anyOf"]
        if not isinstance(members, list) or not members:
            self.fail(where, "\"anyOf\" must be a non-empty list")
        self._only(where, extra, set())
        for i, sub in enumerate(members):
            self.check(sub, f"{where}/anyOf/{i}", refs)

    def _oneOf(self, node: dict, where: str, refs: tuple, extra: set[str]) -> None:
        members = node["oneOf"]
        if not isinstance(members, list) or len(members) != 1:
            self.unsupported(where, "oneOf", "outlines-core treats it as anyOf (exclusivity not enforced)")
        self._only(where, extra, set())
        self.check(members[0], f"{where}/oneOf/0", refs)

    def _prefixItems(self, node: dict, where: str, refs: tuple, extra: set[str]) -> None:
        items = node["prefixItems"]
        if not isinstance(items, list) or not items:
            self.fail(where, "\"prefixItems\" must be a non-empty list")
        # Exactly len(prefixItems) elements are produced.
        self._only(where, extra, {"type", "items", "minItems", "maxItems"})
        if not self._type_allows(node, "array"):
            self.unsupported(where, "type", f"{node['type']!r} beside \"prefixItems\"")
        n = len(items)
        if node.get("minItems", 0) > n or node.get("maxItems", n) < n:
            self.unsupported(where, "minItems" if node.get("minItems", 0) > n else "maxItems",
                             "outlines-core produces exactly the prefixItems")
        for i, sub in enumerate(items):
            self.check(sub, f"{where}/prefixItems/{i}", refs)

    def _enum(self, node: dict, where: str, refs: tuple, extra: set[str]) -> None:
        values = node["enum"]
        if not isinstance(values, list) or not values:
            self.fail(where, "\"enum\" must be a non-empty list")
        self._literals(node, where, extra, values, "enum")

    def _const(self, node: dict, where: str, refs: tuple, extra: set[str]) -> None:
        self._literals(node, where, extra, [node["const"]], "const")

    def _literals(self, node: dict, where: str, extra: set[str], values: list, kw: str) -> None:
        self._only(where, extra, {"type"} | ({"enum"} if kw == "const" else set()))
        if "enum" in extra:
            if node["const"] not in node["enum"]:
                self.fail(where, "\"const\" is not one of \"enum\"")
        for v in values:
            if isinstance(v, (dict, list)):
                self.unsupported(where, kw, "object and array values are not supported by outlines-core")
            if isinstance(v, float) and v == int(v) and abs(v) < 2**53:
                # serde prints 1.0 as "1.0"; fine for JSON, still equal to 1 for a validator
                pass
            if "type" in node and not _is_type(v, node["type"]):
                self.unsupported(where, "type", f"{v!r} in \"{kw}\" is not of type {node['type']!r}")

    def _ref(self, node: dict, where: str, refs: tuple, extra: set[str]) -> None:
        self._only(where, extra, set())
        ref = node["$ref"]
        if not isinstance(ref, str):
            self.fail(where, "\"$ref\" must be a string")
        if ref in refs:
            self.unsupported(where, "$ref", f"recursive reference {ref!r} (outlines-core truncates recursion)")
        target = self._resolve(ref, where)
        self.check(target, ref, refs + (ref,))

    def _resolve(self, ref: str, where: str) -> Any:
        base, _, fragment = ref.partition("#")
        if base and base != self.root.get("$id"):
            self.unsupported(where, "$ref", f"external reference {ref!r}")
        node: Any = self.root
        for part in [p for p in fragment.split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                self.fail(where, f"\"$ref\" {ref!r} does not resolve")
        return node

    def _type(self, node: dict, where: str, refs: tuple, extra: set[str]) -> None:
        t = node["type"]
        types = t if isinstance(t, list) else [t]
        if not types or any(x not in _TYPES for x in types):
            self.fail(where, f"\"type\" must name JSON types, got {t!r}")
        allowed: set[str] = set()
        for x in types:
            allowed |= {
                "string": {"minLength", "maxLength", "pattern", "format"},
                "array": {"items", "minItems", "maxItems"},
                "object": {"additionalProperties", "minProperties", "maxProperties", "required"},
            }.get(x, set())
        self._only(where, extra, allowed)
        if "string" in types:
            self._string(node, where)
        if "array" in types:
            if "items" in node:
                self.check(node["items"], f"{where}/items", refs)
            if node.get("maxItems", 1) < node.get("minItems", 0):
                self.fail(where, "\"maxItems\" is below \"minItems\"")
        if "object" in types:
            if node.get("required"):
                self.unsupported(where, "required", "needs \"properties\" listing the required keys")
            ap = node.get("additionalProperties")
            if ap is False and node.get("minProperties", 0) > 0:
                self.fail(where, "no properties allowed but minProperties > 0")
            if isinstance(ap, (dict, bool)) and ap is not True and ap is not False:
                self.check(ap, f"{where}/additionalProperties", refs)
            if ap is False:
                self.unsupported(where, "additionalProperties", "false beside a non-object type")

    def _string(self, node: dict, where: str) -> None:
        present = [k for k in ("minLength", "maxLength", "pattern", "format") if k in node]
        if "pattern" in present and len(present) > 1:
            self.unsupported(where, present[-1] if present[-1] != "pattern" else present[0],
                             "outlines-core ignores it next to \"pattern\" / length bounds")
        if "format" in present and len(present) > 1:
            self.unsupported(where, "format", "outlines-core ignores it next to length bounds")
        if "format" in node and node["format"] not in _FORMATS:
            self.unsupported(where, "format", f"format {node['format']!r} (outlines-core knows {sorted(_FORMATS)})")
        if "pattern" in node:
            self._pattern(node["pattern"], where)

    def _pattern(self, pattern: Any, where: str) -> None:
        if not isinstance(pattern, str):
            self.fail(where, "\"pattern\" must be a string")
        anchored = pattern.startswith("^") and pattern.endswith("$")
        inner = pattern[1:-1] if anchored else pattern
        if re.search(r"(?<!\\)[\^$]", inner.replace("\\\\", "")):
            self.unsupported(where, "pattern", "anchors other than a leading ^ and trailing $")
        # The regex is pasted between the quotes of a JSON string: it must not be able to produce
        # a quote, a backslash or a control character, or the output would not be JSON.
        import interegular

        try:
            fsm = interegular.parse_pattern(inner).to_fsm()
            safe = interegular.parse_pattern(_JSON_STRING_CHAR + "*").to_fsm()
            ok = fsm.issubset(safe)
        except Exception as exc:
            self.unsupported(where, "pattern", f"cannot analyse {pattern!r}: {exc}")
        if not ok:
            self.unsupported(where, "pattern", "it admits quotes, backslashes or control characters, "
                                               "which outlines-core would emit unescaped")


def _is_type(value: Any, t: Any) -> bool:
    types = t if isinstance(t, list) else [t]
    for x in types:
        if x == "null" and value is None:
            return True
        if x == "boolean" and isinstance(value, bool):
            return True
        if x == "string" and isinstance(value, str):
            return True
        if x == "integer" and isinstance(value, int) and not isinstance(value, bool):
            return True
        if x == "number" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
    return False
