"""Tool calling as guided decoding: tools and tool choice (`spec`), the wire formats a model
writes calls in (`formats`), the grammar that makes every call valid (`grammar`), the parser
that turns generated text back into calls, streamed or not (`parser`), and the prompt that
shows tools to a model whose chat template knows nothing of them (`prompt`)."""
from decoding.tools.formats import FORMATS, ToolFormat, detect_format
from decoding.tools.grammar import tool_grammar, tool_guided_spec
from decoding.tools.parser import ParsedOutput, ToolCall, ToolCallDelta, ToolCallParser, parse_output
from decoding.tools.prompt import render_tool_history, template_handles_tools
from decoding.tools.spec import ToolChoice, ToolRequest, ToolSpec

__all__ = [
    "FORMATS", "ParsedOutput", "ToolCall", "ToolCallDelta", "ToolCallParser", "ToolChoice", "ToolFormat",
    "ToolRequest", "ToolSpec", "detect_format", "parse_output", "render_tool_history", "template_handles_tools",
    "tool_grammar", "tool_guided_spec",
]
