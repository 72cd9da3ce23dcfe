"""The grammar a tool-calling request generates under (llguidance Lark with embedded JSON Schemas).

- `required`: one call (one or more with parallel calls) whose name is one of the tools and
  whose arguments are valid under that tool's parameters;
- named: exactly one call of that tool;
- `auto`: free text, and once the model writes the format's opening text the call grammar, so
  an auto-mode call is exactly as valid as a required one. The free text is a lazy `stop`
  lexeme: it ends the moment the opening text appears (llguidance commits to the lazy
  lexeme), so "<tool_call>" can never be followed by anything but a valid call. Text with no
  call and then end-of-sequence stays allowed.
For a format whose calls start the output (Llama 3.1 JSON), `auto` is: a call from the first
character, or text that does not start with "{".

Each call object is a `%json` schema `{"name": {"const": ...}, "<args key>": parameters}` with
the separators fixed (", ", ": ") and llguidance's `lenient` off, so a keyword it cannot
enforce is an error, never silently dropped — the same rule as guided `json_schema`.
"""
from __future__ import annotations

import json
from typing import Any

from decoding.guided.normalize import normalize_schema
from decoding.guided.spec import GuidedSpec
from decoding.tools.formats import ToolFormat
from decoding.tools.spec import ToolRequest, ToolSpec

# Beats any "x-guidance" block of a user's schema: nothing is relaxed, the layout is fixed.
_X_GUIDANCE = {"whitespace_flexible": False, "lenient": False, "coerce_one_of": False,
               "item_separator": ", ", "key_separator": ": "}


# Keywords whose values are schemas keyed by names (a property may be called "$ref" or "const").
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})
# Keywords whose values are instances, not schemas: a "$ref" key in them is data.
_INSTANCE_KEYWORDS = frozenset({"const", "enum", "default", "examples"})


def _rebase_refs(node: Any, base: str) -> Any:
    """`node` (a schema) with its local JSON-pointer $refs ("#", "#/$defs/X") moved under the
    pointer `base`: the arguments schema is embedded in the call object's schema, whose root is
    what "#" means there, so "#/$defs/X" would not resolve (pydantic's and MCP's schemas are
    written this way) and a recursive "#" would point at the call object."""
    if isinstance(node, list):
        return [_rebase_refs(x, base) for x in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for k, v in node.items():
        if k == "$ref" and isinstance(v, str) and (v == "#" or v.startswith("#/")):
            out[k] = "#" + base + v[1:]
        elif k in _SCHEMA_MAPS and isinstance(v, dict):
            out[k] = {name: _rebase_refs(sub, base) for name, sub in v.items()}
        elif k in _INSTANCE_KEYWORDS:
            out[k] = v
        else:
            out[k] = _rebase_refs(v, base)
    return out


def _pointer_token(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def call_schema(tool: ToolSpec, fmt: ToolFormat) -> dict[str, Any]:
    """The JSON Schema of one call object of `tool` in `fmt`."""
    # The same exact rewrite the tool's schema passed its check with (`not`, unknown formats ...):
    # the grammar must enforce what was checked, not the schema as sent.
    args = normalize_schema(tool.arguments_schema())
    args.pop("x-guidance", None)   # only the top-level block counts, and it is ours
    args = _rebase_refs(args, "/properties/" + _pointer_token(fmt.args_key))
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, fmt.args_key: args},
        "required": ["name", fmt.args_key],
        "additionalProperties": False,
        "x-guidance": _X_GUIDANCE,
    }


def _lit(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def tool_grammar(req: ToolRequest, fmt: ToolFormat) -> str:
    """The Lark grammar for a request whose tools are constrained (req.constrained)."""
    tools = req.callable_tools()
    lines = ["%llguidance {}"]
    many = req.parallel and req.choice.mode != "named"
    more = f'({_lit(fmt.separator)} call)*' if many else ""
    # The calls after the opening text: one, or several joined by the separator.
    lines.append(f"calls_body: call {more} {_lit(fmt.close)}" if fmt.close else f"calls_body: call {more}")
    lines.append("call: " + " | ".join(f"call_{i}" for i in range(len(tools))))
    for i, tool in enumerate(tools):
        lines.append(f"call_{i}: %json {json.dumps(call_schema(tool, fmt), ensure_ascii=False)}")
    if req.choice.mode in ("required", "named"):
        lines.insert(1, f"start: {_lit(fmt.open)} calls_body" if fmt.open else "start: calls_body")
    elif fmt.open:
        lines.insert(1, "start: text | prefix calls_body")
        lines.append(f"prefix[stop={_lit(fmt.open)}]: /(.|\\n)*/")
        lines.append("text: /(.|\\n)*/")
    else:
        # Calls start the output: text is anything that does not begin like a call.
        lines.insert(1, "start: text | calls_body")
        lines.append("text: /([^{ \\t\\n](.|\\n)*)?/")
    return "\n".join(lines) + "\n"


def tool_guided_spec(req: ToolRequest, fmt: ToolFormat, close_before_max_tokens: bool = True) -> GuidedSpec:
    """The guided spec the engine runs a constrained tool request under (llguidance: Lark)."""
    return GuidedSpec("grammar", tool_grammar(req, fmt), backend="llguidance",
                      close_before_max_tokens=close_before_max_tokens, plan_as_json=True)
