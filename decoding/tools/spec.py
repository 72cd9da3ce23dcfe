"""What a request says about tools: the functions (`ToolSpec`), whether and which to call
(`ToolChoice`), and the checks that need no compiler. Errors name the API field
(`tools[2].function.parameters`, `tool_choice`); the API layer passes its own prefix."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from common.errors import InvalidArgumentError

MODES = ("none", "auto", "required", "named")
MAX_TOOLS = 128
NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")   # OpenAI's rule for function names


@dataclass(slots=True, frozen=True)
class ToolSpec:
    name: str
    description: str = ""
    parameters: dict[str, Any] | None = None   # a JSON Schema of the arguments object; None: any object
    strict: bool = False                       # OpenAI's flag; every call is held to the schema anyway

    def arguments_schema(self) -> dict[str, Any]:
        """The schema the arguments are generated under: the parameters, always an object."""
        schema = dict(self.parameters) if self.parameters else {"type": "object"}
        schema.setdefault("type", "object")
        return schema


@dataclass(slots=True, frozen=True)
class ToolChoice:
    mode: str = "auto"          # none | auto | required | named
    name: str | None = None     # the tool to call, for mode "named"


@dataclass(slots=True, frozen=True)
class ToolRequest:
    tools: tuple[ToolSpec, ...]
    choice: ToolChoice = ToolChoice()
    parallel: bool = True       # more than one call per answer

    @property
    def constrained(self) -> bool:
        """Whether generation runs under the tool grammar (every mode but "none")."""
        return bool(self.tools) and self.choice.mode != "none"

    def callable_tools(self) -> tuple[ToolSpec, ...]:
        """The tools a call may name: all of them, or the one tool_choice names."""
        if self.choice.mode == "named":
            return tuple(t for t in self.tools if t.name == self.choice.name)
        return self.tools

    def validate(self, tools_field: str = "tools", choice_field: str = "tool_choice",
                 parameters_suffix: str = ".function.parameters", name_suffix: str = ".function.name") -> None:
        """Names, duplicates, parameters' shape and the choice; the compiler checks each schema's keywords."""
        if len(self.tools) > MAX_TOOLS:
            raise InvalidArgumentError(tools_field, f"at most {MAX_TOOLS} tools, got {len(self.tools)}")
        seen: dict[str, int] = {}
        for i, tool in enumerate(self.tools):
            if not NAME_RE.match(tool.name or ""):
                raise InvalidArgumentError(f"{tools_field}[{i}]{name_suffix}",
                                           f"must be 1-64 characters of a-z, A-Z, 0-9, _ and -; got {tool.name!r}")
            if tool.name in seen:
                raise InvalidArgumentError(f"{tools_field}[{i}]{name_suffix}",
                                           f"{tool.name!r} is also the name of {tools_field}[{seen[tool.name]}]")
            seen[tool.name] = i
            params = tool.parameters
            if params is not None:
                if not isinstance(params, dict):
                    raise InvalidArgumentError(f"{tools_field}[{i}]{parameters_suffix}",
                                               f"must be a JSON Schema object, got {type(params).__name__}")
                kind = params.get("type", "object")
                if kind != "object" and not (isinstance(kind, list) and "object" in kind):
                    raise InvalidArgumentError(f"{tools_field}[{i}]{parameters_suffix}",
                                               f"must describe an object (the arguments); got type {kind!r}")
        mode = self.choice.mode
        if mode not in MODES:
            raise InvalidArgumentError(choice_field, f"must be none, auto, required or a function; got {mode!r}")
        if not self.tools and mode in ("required", "named"):
            raise InvalidArgumentError(choice_field, f"{mode!r} needs tools; the request has none")
        if mode == "named" and self.choice.name not in seen:
            raise InvalidArgumentError(choice_field, f"names {self.choice.name!r}, which is not one of the tools "
                                                     f"({', '.join(seen) or 'none'})")
