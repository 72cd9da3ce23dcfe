"""Ollama's Go chat templates, translated to Jinja for the cases Modelfiles use.

Supported: text; `{{ .System }}`, `.Prompt`, `.Response`, `.Messages`; `range .Messages` (also
`range $i, $m := .Messages`) with `.Role` / `.Content` inside and `$.System` for the top level;
`if` / `else if` / `else` / `end`; `eq`, `ne`, `and`, `or`, `not`, `len`; string and number
literals; parentheses; the `{{-` / `-}}` white-space trims (Jinja's `-` trims the same way).
Anything else is a clear error naming it, never a template that renders wrong.

The Jinja side sees `System`, `Prompt`, `Response` (strings) and `Messages` (a list of
{"Role", "Content"}): see `render`."""
from __future__ import annotations

import re
from typing import Any

_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)
_TOKEN = re.compile(r'\s*("(?:[^"\\]|\\.)*"|\(|\)|[^\s()]+)')
_FUNCS = {"eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}
_TOP = ("System", "Prompt", "Response", "Messages")


class GoTemplateError(ValueError):
    pass


def looks_like_go(template: str) -> bool:
    """Ollama's templates use `{{ .Field }}`; Jinja ones never start a name with a dot."""
    return bool(re.search(r"\{\{-?\s*(?:\.|\$|if\s|range\s|end\b)", template))


def to_jinja(template: str) -> str:
    out: list[str] = []
    blocks: list[tuple[str, str | None]] = []    # ("if" | "range", the loop variable)
    pos = 0
    for m in _ACTION.finditer(template):
        out.append(template[pos:m.start()].replace("{%", "{{ '{%' }}").replace("{#", "{{ '{#' }}"))
        pos = m.end()
        left, body, right = m.group(1), m.group(2), m.group(3)
        dot = next((var for kind, var in reversed(blocks) if kind == "range"), None)
        open_, close = "{%" + left, right + "%}"
        word, _, rest = body.partition(" ")
        if body.startswith("/*"):
            continue   # a comment
        if word == "if":
            blocks.append(("if", None))
            out.append(f"{open_} if {_expr(rest, dot)} {close}")
        elif word == "else":
            if not blocks or blocks[-1][0] != "if":
                raise GoTemplateError("`else` outside an `if`")
            cond = rest.strip()
            if cond.startswith("if "):
                out.append(f"{open_} elif {_expr(cond[3:], dot)} {close}")
            elif cond:
                raise GoTemplateError(f"unsupported `else {cond}`")
            else:
                out.append(f"{open_} else {close}")
        elif word == "end":
            if not blocks:
                raise GoTemplateError("`end` without an `if` or a `range`")
            kind, _ = blocks.pop()
            out.append(f"{open_} {'endif' if kind == 'if' else 'endfor'} {close}")
        elif word == "range":
            var = f"_m{len(blocks)}"
            decl = re.fullmatch(r"\$(\w+)\s*,\s*\$(\w+)\s*:=\s*(.+)|\$(\w+)\s*:=\s*(.+)", rest.strip())
            if decl and decl.group(1):
                index, var, source = decl.group(1), decl.group(2), decl.group(3)
                out.append(f"{open_} for {var} in {_expr(source, dot)} {close}{{% set {index} = loop.index0 %}}")
            else:
                if decl:
                    var, source = decl.group(4), decl.group(5)
                else:
                    source = rest
                out.append(f"{open_} for {var} in {_expr(source, dot)} {close}")
            blocks.append(("range", var))
        elif word in ("define", "template", "block", "with", "break", "continue"):
            raise GoTemplateError(f"unsupported action `{word}`")
        else:
            out.append("{{" + left + " " + _expr(body, dot) + " " + right + "}}")
    out.append(template[pos:].replace("{%", "{{ '{%' }}").replace("{#", "{{ '{#' }}"))
    if blocks:
        raise GoTemplateError(f"`{blocks[-1][0]}` without its `end`")
    return "".join(out)


def _expr(text: str, dot: str | None) -> str:
    tokens = [t for t in _TOKEN.findall(text) if t]
    if not tokens:
        raise GoTemplateError("empty expression")
    value, rest = _pipeline(tokens, dot)
    if rest:
        raise GoTemplateError(f"unexpected {' '.join(rest)!r} in {text!r}")
    return value


def _pipeline(tokens: list[str], dot: str | None) -> tuple[str, list[str]]:
    """A command: a function with its operands, or one operand."""
    head = tokens[0]
    if head in _FUNCS or head in ("and", "or", "not", "len", "index"):
        args: list[str] = []
        rest = tokens[1:]
        while rest and rest[0] != ")":
            value, rest = _operand(rest, dot)
            args.append(value)
        return _call(head, args), rest
    return _operand(tokens, dot)


def _operand(tokens: list[str], dot: str | None) -> tuple[str, list[str]]:
    head, rest = tokens[0], tokens[1:]
    if head == "(":
        value, rest = _pipeline(rest, dot)
        if not rest or rest[0] != ")":
            raise GoTemplateError("unbalanced parentheses")
        return f"({value})", rest[1:]
    if head.startswith('"') or re.fullmatch(r"-?\d+(\.\d+)?", head):
        return head, rest
    if head in ("true", "false"):
        return head, rest
    if head == ".":
        if dot is None:
            raise GoTemplateError("`.` at the top level is not supported")
        return dot, rest
    if head.startswith("$."):
        return _field(None, head[2:]), rest
    if head.startswith("$"):
        var, _, path = head[1:].partition(".")
        return (var + "".join(f"[{p!r}]" for p in path.split("."))) if path else var, rest
    if head.startswith("."):
        return _field(dot, head[1:]), rest
    raise GoTemplateError(f"unsupported {head!r}")


def _field(dot: str | None, path: str) -> str:
    parts = path.split(".")
    if dot is None:
        if parts[0] not in _TOP:
            raise GoTemplateError(f"unknown field .{path} (templates here know {', '.join('.' + t for t in _TOP)})")
        return parts[0] + "".join(f"[{p!r}]" for p in parts[1:])
    return dot + "".join(f"[{p!r}]" for p in parts)


def _call(name: str, args: list[str]) -> str:
    if name in _FUNCS:
        if len(args) != 2:
            raise GoTemplateError(f"`{name}` takes 2 operands")
        return f"({args[0]} {_FUNCS[name]} {args[1]})"
    if name in ("and", "or"):
        return "(" + f" {name} ".join(args) + ")"
    if len(args) != 1 and name != "index":
        raise GoTemplateError(f"`{name}` takes 1 operand")
    if name == "not":
        return f"(not {args[0]})"
    if name == "len":
        return f"({args[0]}|length)"
    return f"{args[0]}[{args[1]}]"


_CUT = "\x00weft-response\x00"


def render(jinja_template: str, messages: list[dict[str, str]]) -> str:
    """A chat as Ollama renders it, ready for the model's answer. A template with `.Messages`
    sees the whole conversation; an older one (`.Prompt` / `.Response`) is applied per turn —
    the system prompt with the first, each user prompt with the answer that followed it — and
    the last turn's text stops where `.Response` would go (the model writes it)."""
    import jinja2

    env = jinja2.Environment(autoescape=False, keep_trailing_newline=True, undefined=jinja2.ChainableUndefined)
    tmpl = env.from_string(jinja_template)
    system = "\n".join(m["content"] for m in messages if m["role"] == "system")
    convo = [{"Role": m["role"], "Content": m["content"]} for m in messages if m["role"] != "system"]
    if "Messages" in jinja_template:
        full = ([{"Role": "system", "Content": system}] if system else []) + convo
        return tmpl.render(System=system, Messages=full, Prompt="", Response="")
    turns: list[tuple[str, str | None]] = []
    i = 0
    while i < len(convo):
        if convo[i]["Role"] == "assistant":
            turns.append(("", convo[i]["Content"]))
        else:
            answered = i + 1 < len(convo) and convo[i + 1]["Role"] == "assistant"
            turns.append((convo[i]["Content"], convo[i + 1]["Content"] if answered else None))
            i += answered
        i += 1
    if not turns or turns[-1][1] is not None:
        turns.append(("", None))   # the model speaks next
    out = []
    for j, (prompt, response) in enumerate(turns):
        text = tmpl.render(System=system if j == 0 else "", Prompt=prompt, Messages=[],
                           Response=_CUT if response is None else response)
        out.append(text.split(_CUT)[0] if response is None else text)
    return "".join(out)
