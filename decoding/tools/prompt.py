"""How tools and tool history reach the model.

A chat template that handles tools (it reads `tools`, as Qwen's, Llama 3.1's, Mistral's and
Hermes' do) gets them in the shape Hugging Face templates expect. A template that knows
nothing of tools (SmolLM2's) gets Weft's tool prompt: a system block listing each tool's name,
description and parameters schema and how to write a call in the chosen format; an assistant
turn's calls are written into its content in that format, and a tool result becomes a user
turn `<tool_response>...</tool_response>`. Either way every model can call tools: the grammar,
not the prompt, is what makes the calls valid.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from decoding.tools.formats import ToolFormat
from decoding.tools.spec import ToolRequest

Message = dict[str, Any]


def template_handles_tools(chat_template: str | None) -> bool:
    """Whether a Jinja chat template renders the `tools` it is given."""
    return bool(chat_template) and "tools" in chat_template


def tool_prompt(req: ToolRequest, fmt: ToolFormat) -> str:
    """Weft's system block for a model whose template has no tool support."""
    lines = ["You can call functions. The functions, each with the JSON Schema of its arguments:"]
    for t in req.tools:
        lines.append(json.dumps({"name": t.name, "description": t.description, "parameters": t.arguments_schema()},
                                ensure_ascii=False))
    example = fmt.render([("<function name>", "<arguments as a JSON object>")])
    lines.append(f"To call a function, write exactly:\n{example}")
    mode = req.choice.mode
    if mode == "named":
        lines.append(f"Call the function {req.choice.name} now.")
    elif mode == "required":
        lines.append("Answer with one or more function calls." if req.parallel else "Answer with one function call.")
    else:
        lines.append("Call a function when it helps answer; otherwise answer in plain text.")
    return "\n".join(lines)


def render_tool_history(messages: Sequence[Message], req: ToolRequest | None, fmt: ToolFormat,
                        template_tools: bool) -> tuple[list[Message], list[dict[str, Any]] | None]:
    """Messages (and the `tools` argument) for the chat template.

    `messages` are {"role", "content"} dicts; an assistant turn may carry "tool_calls"
    ([{"id", "name", "arguments" (JSON text)}]), a tool turn "tool_call_id" and "name"."""
    names = {c["id"]: c["name"] for m in messages for c in m.get("tool_calls") or () if c.get("id")}
    if template_tools:
        out = []
        for m in messages:
            msg: Message = {"role": m["role"], "content": m.get("content") or ""}
            if m.get("tool_calls"):
                msg["tool_calls"] = [{"id": c.get("id") or "", "type": "function",
                                      "function": {"name": c["name"], "arguments": _as_object(c["arguments"])}}
                                     for c in m["tool_calls"]]
            if m["role"] == "tool":
                msg["tool_call_id"] = m.get("tool_call_id") or ""
                msg["name"] = m.get("name") or names.get(m.get("tool_call_id"), "")
            out.append(msg)
        tools = None
        if req is not None and req.tools:
            tools = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                       "parameters": t.arguments_schema()}} for t in req.tools]
        return out, tools
    out = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if m.get("tool_calls"):
            calls = fmt.render([(c["name"], c["arguments"]) for c in m["tool_calls"]])
            out.append({"role": role, "content": f"{content}\n{calls}" if content else calls})
        elif role == "tool":
            name = m.get("name") or names.get(m.get("tool_call_id"), "")
            body = json.dumps({"name": name, "content": content}, ensure_ascii=False) if name else content
            out.append({"role": "user", "content": f"<tool_response>\n{body}\n</tool_response>"})
        else:
            out.append({"role": role, "content": content})
    if req is not None and req.constrained:
        block = tool_prompt(req, fmt)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{block}"}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out, None


def _as_object(arguments: str) -> Any:
    """HF templates write `arguments | tojson`: give them the object, not its text."""
    try:
        return json.loads(arguments)
    except (TypeError, ValueError):
        return arguments
