"""The wire formats a model writes tool calls in.

Every format is the same shape: an opening text (the trigger), one or more call objects
`{"name": ..., "<args key>": {...}}` joined by a separator, a closing text. The grammar
(`grammar.py`), the parser (`parser.py`) and the history renderer (`prompt.py`) all read the
one description here, so what the model is made to write is what is parsed back.
"""
from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class ToolFormat:
    name: str
    open: str          # opens the calls; "" = calls start at the very beginning of the output
    separator: str     # between two calls
    close: str         # after the last call
    args_key: str = "arguments"

    def call_json(self, name: str, arguments: str) -> str:
        """One call object, with the separators the grammar enforces (", " and ": ")."""
        return f'{{"name": {json.dumps(name, ensure_ascii=False)}, "{self.args_key}": {arguments}}}'

    def render(self, calls: list[tuple[str, str]]) -> str:
        """Calls (name, arguments JSON text) as the model writes them, for history."""
        return self.open + self.separator.join(self.call_json(n, a) for n, a in calls) + self.close


FORMATS: dict[str, ToolFormat] = {
    # NousResearch Hermes 2 Pro, and Qwen 2.5 / 3 (their templates use the same tags).
    "hermes": ToolFormat("hermes", "<tool_call>\n", "\n</tool_call>\n<tool_call>\n", "\n</tool_call>"),
    "qwen": ToolFormat("qwen", "<tool_call>\n", "\n</tool_call>\n<tool_call>\n", "\n</tool_call>"),
    # Mistral v0.3+ / Mixtral: a JSON list after the [TOOL_CALLS] marker.
    "mistral": ToolFormat("mistral", "[TOOL_CALLS][", ", ", "]"),
    # Llama 3.1 / 3.2 JSON tool calling: the answer is the call object itself ("parameters").
    "llama3_json": ToolFormat("llama3_json", "", "; ", "", args_key="parameters"),
}


def detect_format(chat_template: str | None) -> str:
    """The format a model's chat template writes calls in; Hermes for a template without any
    (Weft's own tool prompt then teaches it, see prompt.py)."""
    t = chat_template or ""
    if "[TOOL_CALLS]" in t:
        return "mistral"
    if "<|python_tag|>" in t or "ipython" in t:
        return "llama3_json"
    if "<tool_call>" in t:
        return "qwen" if "<|im_start|>" in t else "hermes"
    return "hermes"
