"""A store model's Modelfile as the defaults of its requests: its system prompt and few-shot
messages go before a chat's own turns, its parameters fill the sampling and stopping fields a
request leaves unset (the request's own values win, as in Ollama), and its template, when it
has one, renders the chat instead of the tokenizer's."""
from __future__ import annotations

from clients.weft.v1 import inference_pb2 as pb
from service.go_template import looks_like_go, render, to_jinja
from service.modelfile import Modelfile

# Modelfile parameter -> (message, field) of GenerateRequest.
_FIELDS = {
    "temperature": ("sampling", "temperature"), "top_p": ("sampling", "top_p"), "top_k": ("sampling", "top_k"),
    "min_p": ("sampling", "min_p"), "seed": ("sampling", "seed"), "repeat_penalty": ("sampling", "repetition_penalty"),
    "presence_penalty": ("sampling", "presence_penalty"), "frequency_penalty": ("sampling", "frequency_penalty"),
    "num_predict": ("stopping", "max_tokens"),
}


def apply_defaults(req: pb.GenerateRequest, mf: Modelfile) -> None:
    """Fill `req` from the Modelfile where the request says nothing (in place)."""
    for name, value in mf.parameters.items():
        if name == "stop":
            if not req.stopping.stop:
                req.stopping.stop.extend(value)
            continue
        where = _FIELDS.get(name)
        if where is None:
            continue   # num_ctx: the engine's context, set when the model is loaded
        msg = getattr(req, where[0])
        if not msg.HasField(where[1]):
            if name == "num_predict" and value < 0:
                continue   # -1 / -2: up to the context, the default already
            setattr(msg, where[1], value)
    if req.WhichOneof("prompt") == "chat":
        turns = list(req.chat.messages)
        head = []
        if mf.system is not None and not any(m.role == "system" for m in turns):
            head.append(pb.ChatMessage(role="system", content=mf.system))
        head += [pb.ChatMessage(role=m["role"], content=m["content"]) for m in mf.messages]
        if head:
            del req.chat.messages[:]
            req.chat.messages.extend(head + turns)


def template_renderer(template: str):
    """A function rendering chat messages ([{role, content}]) with a Modelfile's TEMPLATE: an
    Ollama Go template (translated) or a Jinja chat template."""
    if looks_like_go(template):
        jinja = to_jinja(template)
        return lambda messages: render(jinja, messages)
    import jinja2

    compiled = jinja2.Environment(autoescape=False, keep_trailing_newline=True).from_string(template)
    return lambda messages: compiled.render(messages=messages, add_generation_prompt=True)
