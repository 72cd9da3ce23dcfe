"""The official JSON-Schema-Test-Suite's Draft 2020-12 files through Weft's guided decoding.

For each keyword file: how many of its schemas Weft compiles ("auto": the normaliser, then the
backends) and refuses, and, token by token (bench/conformance.py), how many of their valid
instances it accepts and how many invalid ones it accepts (the latter must be 0). The suite's
labels are the oracle. Weft asserts the formats the drafts define while the suite treats them
as annotations by default (format.json), and writes numbers with integral values without a
fraction (1.0 is written 1): both show as valid instances rejected.
"""
from __future__ import annotations

import collections
import json
import os
from pathlib import Path
from typing import Any

from bench.conformance import accepts
from common.errors import InvalidArgumentError
from decoding.guided import GuidedSpec

SUITE = Path(os.environ.get("WEFT_SCHEMA_SUITE", Path(__file__).resolve().parents[2]
                            / "shared/data/json-schema-test-suite/draft2020-12"))


def suite_conformance(core: Any) -> list[dict]:
    compiler = core.guide_compiler
    tok = core.tokenizer
    encode = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    rows = []
    for path in sorted(SUITE.glob("*.json")):
        c: collections.Counter = collections.Counter()
        refusals: collections.Counter = collections.Counter()
        for group in json.loads(path.read_text()):
            c["groups"] += 1
            schema = group["schema"]
            try:
                if not isinstance(schema, dict):
                    raise InvalidArgumentError("guided.json_schema", "a boolean schema is not a JSON object")
                grammar = compiler.compile_uncached(GuidedSpec("json_schema", schema))
            except InvalidArgumentError as exc:
                c["refused"] += 1
                refusals[exc.message.split(" (at ")[0][:70]] += 1
                continue
            c["compiled"] += 1
            for test in group["tests"]:
                ok, _ = accepts(grammar, test["data"], encode, tok.decode, compiler.bitmask_words, schema=schema)
                c[("valid_" if test["valid"] else "invalid_") + ("accepted" if ok else "rejected")] += 1
        rows.append({"keyword": path.stem, **{k: c[k] for k in ("groups", "compiled", "refused", "valid_accepted",
                                                                "valid_rejected", "invalid_accepted",
                                                                "invalid_rejected")},
                     "refusals": dict(refusals.most_common(4))})
    return rows
