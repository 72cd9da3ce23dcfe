"""`weft run NAME [PROMPT]`: Ollama's `ollama run` — a conversation in the terminal.

It talks to the server at `$WEFT_HOST` (host:port of a `weft serve`) when set, otherwise it
starts the model in this process (a store name or a path, as `weft serve --model` takes).
With a PROMPT, or when stdin is not a terminal, it answers once and exits. Interactively:

    >>> a message                  answered as it is generated; the conversation is kept
    >>> \"\"\"                        a message over several lines, until a line ending in \"\"\"
    /set parameter NAME VALUE      temperature, top_k, top_p, min_p, seed, num_predict, stop, ...
    /set system TEXT               the system prompt from now on
    /show info                     the model's name, context, parameters
    /clear                         forget the conversation
    /bye, Ctrl-D                   leave
    Ctrl-C                         stop the answer being written (the conversation goes on)
"""
from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

from common import env
from service.modelfile import parameter_value

# Ollama parameter -> build_generate_request keyword.
_KEYWORDS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p", "seed": "seed",
             "num_predict": "max_tokens", "repeat_penalty": "repetition_penalty",
             "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty"}
HELP = """Available commands:
  /set parameter NAME VALUE   set a sampling parameter (temperature, top_k, top_p, min_p, seed, num_predict, stop ...)
  /set system TEXT            set the system prompt
  /show info                  show the model
  /clear                      clear the conversation
  /bye                        leave
Use \"\"\" to begin and end a message over several lines. Ctrl-C stops an answer; Ctrl-D leaves."""


class Chat:
    def __init__(self, client: Any, model: str, out: Any = sys.stdout) -> None:
        self.client, self.model, self.out = client, model, out
        self.history: list[dict[str, str]] = []
        self.system: str | None = None
        self.params: dict[str, Any] = {}

    def answer(self, text: str) -> str:
        """Stream the answer to `text`; Ctrl-C stops it (what was written so far is kept)."""
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.history
        messages.append({"role": "user", "content": text})
        stream = self.client.generate_stream(messages, model=self.model, **self.params)
        parts: list[str] = []
        try:
            for msg in stream:
                if msg.choice.text:
                    parts.append(msg.choice.text)
                    self.out.write(msg.choice.text)
                    self.out.flush()
        except KeyboardInterrupt:
            stream.close()   # cancels the call: the server aborts the request
        self.out.write("\n\n")
        self.out.flush()
        reply = "".join(parts)
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
        return reply

    def command(self, line: str) -> bool:
        """Run a /command; False to leave."""
        words = line.split(maxsplit=3)
        if words[0] in ("/bye", "/exit"):
            return False
        if words[0] == "/clear":
            self.history = []
            self._say("Cleared session context")
        elif words[:2] == ["/set", "parameter"] and len(words) == 4:
            self._set(words[2], words[3])
        elif words[:2] == ["/set", "system"] and len(words) >= 3:
            self.system = line.split(maxsplit=2)[2]
            self._say("Set system message.")
        elif words[:2] == ["/show", "info"]:
            info = self.client.model_info(self.model)
            self._say(f"  model     {info.name}\n  context   {info.max_model_len}\n  parameters {self.params or '{}'}")
        elif words[0] in ("/?", "/help"):
            self._say(HELP)
        else:
            self._say(f"Unknown command {line!r}. Type /? for help")
        return True

    def _set(self, name: str, raw: str) -> None:
        try:
            value = parameter_value(name, raw.strip().strip('"'))
        except ValueError as exc:
            self._say(f"Couldn't set parameter: {exc}")
            return
        if name == "stop":
            self.params.setdefault("stop", []).append(value)
        elif name in _KEYWORDS:
            self.params[_KEYWORDS[name]] = value
        else:
            self._say(f"Parameter {name!r} is set when the model is created (Modelfile), not here")
            return
        self._say(f"Set parameter '{name}' to '{raw}'")

    def _say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()


def _read_message(first: str) -> str:
    """A message, over several lines when it opens with three double quotes (until a line that
    ends with them)."""
    if not first.startswith('"""'):
        return first
    body = first[3:]
    if body.strip() and body.rstrip().endswith('"""'):
        return body.rstrip()[:-3]
    lines = [body] if body else []
    while True:
        line = input("... ")
        if line.rstrip().endswith('"""'):
            lines.append(line.rstrip()[:-3])
            return "\n".join(lines).strip("\n")
        lines.append(line)


def _ctrl_c_interrupts() -> None:
    """Make Ctrl-C raise KeyboardInterrupt, however this process was started: a parent that
    ignores SIGINT (`nohup`, a background job, a test runner) passes SIG_IGN on through exec, and
    Python then installs no handler, so Ctrl-C would neither stop an answer nor reach the prompt."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def interactive(chat: Chat) -> int:
    _ctrl_c_interrupts()
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print("\nUse Ctrl + d or /bye to exit.")
            continue
        if not line.strip():
            continue
        if line.startswith("/"):
            if not chat.command(line.strip()):
                return 0
            continue
        try:
            text = _read_message(line)
        except EOFError:
            return 0
        chat.answer(text)


def cmd_run(a: argparse.Namespace) -> int:
    from clients.client import NO_RETRY, WeftClient

    host = a.host or env.weft_host()
    server = None
    if host:
        client = WeftClient(host, retry=NO_RETRY)
        model = a.model
    else:
        from service.config import EngineConfig
        from service.server import BackgroundServer, ServerOptions
        from service.server_cli import from_store

        config, options = from_store(EngineConfig(model=a.model, progress=False),
                                     ServerOptions(host="127.0.0.1", port=0))
        server = BackgroundServer(options, config=config).start()
        client = WeftClient(server.target, retry=NO_RETRY)
        model = ""
    try:
        client.wait_ready(300)
        chat = Chat(client, model)
        prompt = " ".join(a.prompt) if a.prompt else None
        if prompt is None and not sys.stdin.isatty():
            prompt = sys.stdin.read()
        if prompt is not None:
            chat.answer(prompt)
            return 0
        return interactive(chat)
    finally:
        client.close()
        if server is not None:
            server.stop()


def add_commands(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("run", help="chat with a model in the terminal (or answer one PROMPT)")
    r.add_argument("model", help="a store name (weft list) or a model path")
    r.add_argument("prompt", nargs="*", help="answer this once and exit")
    r.add_argument("--host", default=None, help="a running server, host:port (default: $WEFT_HOST, else in-process)")
    r.set_defaults(func=cmd_run)
