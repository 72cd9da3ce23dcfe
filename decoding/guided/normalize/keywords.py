"""Which keys of a schema object constrain instances, and which formats are asserted.

Everything a validator ignores (title, description, default, examples, `$defs`, unknown keys)
is an annotation: a rewrite may keep or drop it. A rewrite that meets a constraint it does not
understand leaves the schema alone.
"""
from __future__ import annotations

from typing import Any

# Every keyword that constrains instances, drafts 4 to 2020-12.
VALIDATION = frozenset({
    "type", "enum", "const", "multipleOf", "maximum", "exclusiveMaximum", "minimum", "exclusiveMinimum",
    "maxLength", "minLength", "pattern", "format", "items", "additionalItems", "prefixItems", "contains",
    "maxContains", "minContains", "maxItems", "minItems", "uniqueItems", "unevaluatedItems",
    "properties", "patternProperties", "additionalProperties", "propertyNames", "required",
    "maxProperties", "minProperties", "dependentRequired", "dependentSchemas", "dependencies",
    "unevaluatedProperties", "allOf", "anyOf", "oneOf", "not", "if", "then", "else", "$ref",
    "$dynamicRef", "$recursiveRef",
})

# The formats the drafts define (2020-12's list, which contains the earlier ones). Draft 2020-12
# makes `format` an annotation unless a vocabulary asserts it; Weft asserts these (the backend
# enforces them, or refuses the schema naming the format) and treats any other format as the
# annotation it is: no constraint (`color`, `path`, `int32`, ...).
DEFINED_FORMATS = frozenset({
    "date-time", "date", "time", "duration", "email", "idn-email", "hostname", "idn-hostname", "ipv4",
    "ipv6", "uri", "uri-reference", "iri", "iri-reference", "uuid", "uri-template", "json-pointer",
    "relative-json-pointer", "regex",
})


def asserted_format(schema: dict) -> bool:
    """`schema` has a `format` that Weft asserts."""
    return schema.get("format") in DEFINED_FORMATS


def constrains(schema: dict, key: str) -> bool:
    """Whether `key` of `schema` constrains instances (an unknown format does not)."""
    if key == "format":
        return asserted_format(schema)
    return key in VALIDATION


def is_true(schema: Any) -> bool:
    """`schema` accepts every value: `true`, `{}`, or only annotations."""
    if schema is True:
        return True
    return isinstance(schema, dict) and not any(constrains(schema, k) for k in schema)
