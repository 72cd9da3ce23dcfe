"""Unknown formats are annotations: `format` values the drafts do not define are dropped.

Draft 2020-12 makes `format` an annotation unless a vocabulary asserts it. Weft asserts the
formats the drafts define (keywords.DEFINED_FORMATS: the backend enforces them, or refuses the
schema naming the format) and drops every other one (`color`, `path`, `byte`, `int32`, ...): it
constrains nothing, as a validator that does not know it does not check it.
"""
from __future__ import annotations

from typing import Any

from decoding.guided.normalize.document import Document
from decoding.guided.normalize.keywords import DEFINED_FORMATS


def drop_unknown_format(node: dict, pointer: str, doc: Document) -> Any:
    if "format" in node and node["format"] not in DEFINED_FORMATS:
        return {k: v for k, v in node.items() if k != "format"}
    return node
