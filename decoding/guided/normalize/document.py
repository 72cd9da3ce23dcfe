"""The schema document a rewrite works in: its draft, its local `$ref`s, and a validator.

Rewrites need three things from the whole document:
- the draft (`$schema`), because a few keywords changed meaning between drafts (draft 4's
  boolean `exclusiveMinimum`; `$ref` beside other keywords is ignored up to draft 7);
- the targets of local `$ref`s (`#/definitions/x`), to reason about a referenced schema, and
  the JSON pointers that some `$ref` points into: a subtree someone references is never moved;
- a validator (`jsonschema`, the reference implementation of the drafts) to evaluate a subschema
  on a literal value, e.g. which members of an `enum` also satisfy their siblings.
"""
from __future__ import annotations

import re
from functools import cached_property
from typing import Any

from decoding.guided.normalize.walk import all_schemas, has_key, unescape

# Steps of proof work (complements, disjointness proofs) one document may take: past it the
# normaliser gives up and the schema goes to the backend as sent.
MAX_WORK = 50_000


class Unprovable(Exception):
    """A rewrite cannot be shown exact here (the validator cannot evaluate a subschema): the
    node it was working on is left alone."""


class WorkExceeded(Unprovable):
    """The document took more proof work than MAX_WORK: no rewrite at all."""


# Draft numbers, by the year-free name each `$schema` URI carries.
_DRAFTS = (("draft-03", 3), ("draft-04", 4), ("draft-06", 6), ("draft-07", 7), ("2019-09", 2019), ("2020-12", 2020))
DEFAULT_DRAFT = 2020


def draft_of(root: Any) -> int:
    """The draft a schema declares; 2020-12 when it declares none (the validators' default)."""
    uri = root.get("$schema") if isinstance(root, dict) else None
    if isinstance(uri, str):
        for name, number in _DRAFTS:
            if name in uri:
                return number
    return DEFAULT_DRAFT


class Document:
    """One schema document (the root a request sent). Never mutated."""

    def __init__(self, root: Any) -> None:
        self.root = root
        self.draft = draft_of(root)
        self.id_key = "$id" if self.draft >= 6 else "id"
        self.work = 0
        self._root_id = root.get(self.id_key) if isinstance(root, dict) else None

    # ---- $ref -------------------------------------------------------------------------------

    @cached_property
    def _scan(self) -> tuple[frozenset[str], bool]:
        """(every `$ref` value in the document, whether some schema below the root sets its id)."""
        refs: set[str] = set()
        nested_id = False
        for node in all_schemas(self.root):
            if not isinstance(node, dict):
                continue
            for key in ("$ref", "$dynamicRef", "$recursiveRef"):
                if isinstance(node.get(key), str):
                    refs.add(node[key])
            if node is not self.root and isinstance(node.get(self.id_key), str):
                nested_id = True
        return frozenset(refs), nested_id

    @cached_property
    def depends_on_evaluation(self) -> bool:
        """Some keyword's result depends on what other keywords evaluated (`unevaluated*`) or on
        the dynamic scope (`$dynamicRef`, `$recursiveRef`): a rewrite of any subschema could
        change it, so none is made."""
        return has_key(self.root, ("unevaluatedProperties", "unevaluatedItems", "$dynamicRef", "$recursiveRef"))

    @property
    def has_nested_ids(self) -> bool:
        """A schema below the root sets `$id`: `$ref`s beneath it resolve against another base,
        which this module does not follow (rewrites that need a ref then leave the schema alone)."""
        return self._scan[1]

    @cached_property
    def ref_pointers(self) -> frozenset[str]:
        """The JSON pointers (`/definitions/x`) that local `$ref`s point at."""
        out = set()
        for ref in self._scan[0]:
            pointer = self._local_pointer(ref)
            if pointer is not None:
                out.add(pointer)
        return frozenset(out)

    def referenced_under(self, pointer: str) -> bool:
        """Some `$ref` points at `pointer` or below it: that subtree must stay where it is."""
        return any(p == pointer or p.startswith(pointer + "/") for p in self.ref_pointers) or \
            any(not r.startswith("#/") and r != "#" for r in self._scan[0])

    def _local_pointer(self, ref: str) -> str | None:
        base, sep, fragment = ref.partition("#")
        if base and base != self._root_id:
            return None
        if not sep:
            return ""
        if fragment and not fragment.startswith("/"):
            return None     # a named anchor: not followed
        return fragment

    def resolve(self, ref: Any) -> Any:
        """The subschema a local `$ref` points at, or None (remote, anchor, dangling, or the
        document has nested `$id`s)."""
        if not isinstance(ref, str) or self.has_nested_ids:
            return None
        pointer = self._local_pointer(ref)
        if pointer is None:
            return None
        node: Any = self.root
        for part in pointer.split("/")[1:]:
            part = unescape(part)
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and re.fullmatch(r"0|[1-9][0-9]*", part) and int(part) < len(node):
                node = node[int(part)]
            else:
                return None
        return node if isinstance(node, (dict, bool)) else None

    # ---- evaluating subschemas -----------------------------------------------------------------

    @cached_property
    def _validator(self) -> Any:
        import jsonschema

        cls = jsonschema.validators.validator_for(self.root, default=jsonschema.Draft202012Validator)
        return cls(self.root)

    def evaluable(self, schema: Any) -> bool:
        """Whether `is_valid` can evaluate `schema` exactly: its `$ref`s (if any) resolve against
        the root, and it sets no base of its own."""
        if self.has_nested_ids:
            return not has_key(schema, ("$ref", "$dynamicRef", "$recursiveRef", self.id_key))
        return not has_key(schema, ("$dynamicRef", "$recursiveRef", self.id_key))

    def is_valid(self, value: Any, schema: Any) -> bool:
        """`value` is valid under `schema` (a subschema of this document), by `jsonschema`.
        Formats are annotations here: callers leave subschemas with formats alone. Raises
        Unprovable when the validator cannot evaluate it (a pattern Python's `re` rejects, say)."""
        self.spend()
        try:
            return self._validator.evolve(schema=schema).is_valid(value)
        except Exception as exc:
            raise Unprovable(str(exc)) from None

    def spend(self, steps: int = 1) -> None:
        """Count proof work; raises WorkExceeded past MAX_WORK."""
        self.work += steps
        if self.work > MAX_WORK:
            raise WorkExceeded(f"more than {MAX_WORK} steps")
