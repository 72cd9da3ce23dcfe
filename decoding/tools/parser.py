"""Generated text back into tool calls, streamed or whole.

`ToolCallParser` is fed text deltas and yields OpenAI-style deltas: content before the calls,
then for each call its index, id and name first and its arguments in pieces. `parse_output` is
the same parser run over a whole output, so the pieces a stream sends concatenate to exactly
the unary answer. The output was generated under `grammar.py`'s grammar, so the structure is
known; the arguments text is passed through as the model wrote it (valid JSON under the
tool's schema), never re-serialised.
"""
from __future__ import annotations

import re
import secrets
import string
from dataclasses import dataclass, field

from decoding.tools.formats import ToolFormat

_ALPHABET = string.ascii_letters + string.digits


def new_call_id() -> str:
    return "call_" + "".join(secrets.choice(_ALPHABET) for _ in range(24))


@dataclass(slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str      # JSON text
    index: int = 0


@dataclass(slots=True)
class ToolCallDelta:
    """A piece of a call: the first piece of each call carries id and name."""
    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(slots=True)
class ParsedOutput:
    content: str | None                      # text outside the calls; None when there is none
    tool_calls: list[ToolCall] = field(default_factory=list)


class ToolCallParser:
    """Incremental: `feed(delta)` -> (content delta, call deltas); `finish()` flushes."""

    def __init__(self, fmt: ToolFormat) -> None:
        self.fmt = fmt
        self._buf = ""
        self._state = "text" if fmt.open else "start"
        self._index = -1
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._final = False
        # Names are [a-zA-Z0-9_-] (spec.py checks them): nothing in one needs JSON escaping.
        head = re.escape('{"name": "') + r'([a-zA-Z0-9_-]{1,64})' + re.escape(f'", "{fmt.args_key}": ')
        self._head = re.compile(head)
        self.calls: list[ToolCall] = []

    def feed(self, delta: str) -> tuple[str, list[ToolCallDelta]]:
        self._buf += delta
        content: list[str] = []
        deltas: list[ToolCallDelta] = []
        while self._step(content, deltas):
            pass
        return "".join(content), deltas

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        """The end of the output: text still held back (a possible start of the opening text) is content."""
        self._final = True
        content, deltas = self.feed("")
        if self._state in ("text", "start"):
            content, self._buf = content + self._buf, ""
        return content, deltas

    # ---- the states -------------------------------------------------------------------------

    def _step(self, content: list[str], deltas: list[ToolCallDelta]) -> bool:
        """Consume what the buffer allows; True if the state moved and another step may run."""
        fmt, buf = self.fmt, self._buf
        if self._state == "start":          # calls may begin the output (no opening text)
            if not buf:
                return False
            self._state = "head" if buf[0] == "{" else "text_only"
            return True
        if self._state == "text_only":
            content.append(buf)
            self._buf = ""
            return False
        if self._state == "text":
            at = buf.find(fmt.open)
            if at >= 0:
                content.append(buf[:at])
                self._buf = buf[at + len(fmt.open):]
                self._state = "head"
                return True
            keep = _held_back(buf, fmt.open)
            content.append(buf[: len(buf) - keep])
            self._buf = buf[len(buf) - keep:]
            return False
        if self._state == "head":
            m = self._head.match(buf)
            if m is None:
                return False
            self._index += 1
            call = ToolCall(new_call_id(), m.group(1), "", self._index)
            self.calls.append(call)
            deltas.append(ToolCallDelta(call.index, call.id, call.name))
            self._buf = buf[m.end():]
            self._state, self._depth, self._in_string, self._escape = "args", 0, False, False
            return True
        if self._state == "args":
            end = self._scan(buf)
            piece = buf if end is None else buf[:end]
            if piece:
                self.calls[-1].arguments += piece
                deltas.append(ToolCallDelta(self._index, arguments=piece))
            self._buf = "" if end is None else buf[end:]
            if end is None:
                return False
            self._state = "tail"
            return True
        if self._state == "tail":           # after the arguments: "}" then a separator or the end
            if not buf:
                return False
            rest = buf[1:] if buf[0] == "}" else None
            if rest is not None and fmt.separator and rest.startswith(fmt.separator):
                self._buf = rest[len(fmt.separator):]
                self._state = "head"
                return True
            if rest is not None and fmt.separator.startswith(rest) and not self._final:
                return False                # a separator or the close: the next characters tell
            self._buf = ""
            self._state = "after"
            return True
        # "after": whatever follows the last call (whitespace) is not part of the answer.
        self._buf = ""
        return False

    def _scan(self, text: str) -> int | None:
        """Index just past the arguments object's closing brace, or None if it is not in `text`."""
        for i, ch in enumerate(text):
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif ch == "\\":
                    self._escape = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    return i + 1
        return None


def parse_output(text: str, fmt: ToolFormat) -> ParsedOutput:
    """A whole output: its content (None if only whitespace) and its calls."""
    parser = ToolCallParser(fmt)
    a, _ = parser.feed(text)
    b, _ = parser.finish()
    content = a + b
    return ParsedOutput(content if content.strip() else None, parser.calls)


def _held_back(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0

