"""A store model served (`weft serve --model NAME`): its Modelfile's system prompt and parameters
are the defaults of its requests — the greedy answer equals the same request with them given
explicitly, and a request's own values win — /api/show reports them, and `weft run` drives a
conversation in a real pseudo-terminal: two turns, /set parameter, Ctrl-C during an answer,
/bye."""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import ollama
import pexpect
import pytest

from clients.client import NO_RETRY, WeftClient
from service.config import EngineConfig
from service.modelfile import parse
from service.server import ServerOptions
from service.server_cli import from_store
from service.store import ModelStore
from tests.test_http_shim import ShimStack

SYSTEM = "You answer in one word."


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_model_factory):
    home = tmp_path_factory.mktemp("weft_home")
    # A long context (the KV pool below holds 4,096 tokens): the answer `weft run` is asked to
    # interrupt then runs for seconds, not the fraction of a second 512 positions take, so Ctrl-C
    # lands while it streams even when the machine is busy.
    model = tiny_model_factory("llama", max_position_embeddings=8192)
    ModelStore(home).create("terse", parse(f'FROM {model}\nSYSTEM "{SYSTEM}"\nPARAMETER temperature 0\n'
                                           "PARAMETER num_predict 9\nPARAMETER stop zzzz\n"))
    return home


class Outcomes:
    """How each call ended, as the server reports it (in order), with a wait for the n-th."""

    def __init__(self) -> None:
        self.ended: list[str] = []
        self._cond = threading.Condition()

    def __call__(self, request_id: str, outcome: str) -> None:
        with self._cond:
            self.ended.append(outcome)
            self._cond.notify_all()

    def wait_count(self, n: int, timeout: float = 30.0) -> list[str]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.ended) >= n, timeout), self.ended
            return list(self.ended)


def _start_stack(monkeypatch: pytest.MonkeyPatch, home: Path, on_request_end: Outcomes | None = None) -> ShimStack:
    monkeypatch.setenv("WEFT_HOME", str(home))
    config, options = from_store(EngineConfig(model="terse", num_blocks=256, progress=False),
                                 ServerOptions(host="127.0.0.1", port=0))
    assert options.served_model_name == "terse" and options.defaults.system == SYSTEM
    return ShimStack.start(config, options=options, on_request_end=on_request_end)


@pytest.fixture(scope="module")
def stack(home, monkeypatch_module):
    s = _start_stack(monkeypatch_module, home)
    yield s
    s.stop()


@pytest.fixture
def terminal_stack(home, monkeypatch):
    """A server of its own, so that the request ends it reports are this test's only: on the
    module's server an earlier test's last request can be reported after that test returned."""
    outcomes = Outcomes()
    s = _start_stack(monkeypatch, home, outcomes)
    yield s, outcomes
    s.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_modelfile_defaults_equal_explicit_values(stack) -> None:
    with WeftClient(stack.grpc.target, retry=NO_RETRY, timeout=60) as c:
        info = c.model_info()
        assert info.name == "terse" and parse(info.modelfile).parameters["num_predict"] == 9
        ask = [{"role": "user", "content": "Name a fruit."}]
        by_default = c.generate(ask)
        explicit = c.generate([{"role": "system", "content": SYSTEM}, *ask], temperature=0, max_tokens=9,
                              stop=["zzzz"])
        assert list(by_default.choices[0].token_ids) == list(explicit.choices[0].token_ids)
        assert len(by_default.choices[0].token_ids) == 9
        # The request's own values win.
        assert len(c.generate(ask, max_tokens=3).choices[0].token_ids) == 3
        no_system = c.generate([{"role": "system", "content": "Be verbose."}, *ask])
        assert list(no_system.choices[0].token_ids) != list(by_default.choices[0].token_ids)
    client = ollama.Client(host=stack.url)
    chat = client.chat(model="terse", messages=ask)   # no options: the Modelfile's, not Ollama's defaults
    assert chat.eval_count == 9
    show = client.show("terse")
    assert show.parameters and "temperature" in show.parameters and show.modelfile.startswith("FROM")


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})


def test_weft_run_in_a_terminal(home, terminal_stack) -> None:
    """Against the served model ($WEFT_HOST), so that the server tells how each answer ended."""
    stack, outcomes = terminal_stack
    env = {**os.environ, "WEFT_HOME": str(home), "PYTHONUNBUFFERED": "1", "WEFT_HOST": stack.grpc.target}
    before = len(outcomes.ended)
    # Started with SIGINT ignored and blocked, as under `nohup` or a parent that ignores it (a
    # test runner can be one: the suite's earlier tests once left this child's Ctrl-C ignored, and
    # the answer ran to its end): `weft run` must make Ctrl-C work itself.
    child = pexpect.spawn(sys.executable, ["-m", "service.cli", "run", "terse"], env=env, encoding="utf-8",
                          timeout=120, dimensions=(40, 200), preexec_fn=_ignore_sigint)
    try:
        child.expect_exact(">>> ")
        child.sendline("Hello there")
        child.expect_exact(">>> ")          # the answer streamed, then the next prompt
        child.sendline('"""')
        child.expect_exact("... ")
        child.sendline("a second turn")
        child.expect_exact("... ")
        child.sendline('over two lines"""')
        child.expect_exact(">>> ")
        child.sendline("/set parameter temperature 0.7")
        child.expect_exact("Set parameter 'temperature' to '0.7'")
        child.sendline("/set parameter num_predict 100000")
        child.expect_exact("Set parameter 'num_predict'")
        # Seeded: an unseeded draw follows torch's global generator, which every earlier test in
        # the session moves, and some of its paths end the answer at once (EOS) before Ctrl-C.
        child.sendline("/set parameter seed 1")
        child.expect_exact("Set parameter 'seed'")
        child.expect_exact(">>> ")
        child.sendline("Write forever")
        child.expect_exact("Write forever")  # the terminal's echo of what was typed
        # Ctrl-C once the server is generating the answer (up to ~4,000 tokens: seconds). Not on
        # its first printed character: a tiny random model may write only blanks or tokens that
        # print nothing, and the first character would then be the next prompt's.
        deadline = time.monotonic() + 60
        while not stack.grpc.core.has_unfinished():
            assert time.monotonic() < deadline, "the answer never started on the server"
            threading.Event().wait(0.001)
        child.sendintr()                     # Ctrl-C stops it, the conversation goes on
        child.expect_exact(">>> ", timeout=30)
        child.sendline("/show info")
        child.expect_exact("context")
        child.sendline("/bye")
        child.expect(pexpect.EOF, timeout=30)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before
    # Two answers finished, the third was cancelled by Ctrl-C (its request aborted on the server).
    ended = outcomes.wait_count(before + 3)[before:]
    assert ended == ["ok", "ok", "cancelled"], ended
    stack.grpc.call(stack.grpc.engine.wait_idle(), timeout=30)
    assert stack.grpc.core.pool_is_whole()


def test_weft_run_one_shot(home) -> None:
    env = {**os.environ, "WEFT_HOME": str(home)}
    env.pop("WEFT_HOST", None)
    # The model loads in-process: minutes on a loaded 2-core CI machine, not a hang.
    out = pexpect.run(f"{sys.executable} -m service.cli run terse 'Name a fruit.'", env=env, timeout=600,
                      withexitstatus=True, encoding="utf-8")
    assert out[1] == 0 and out[0].strip()


def test_ollama_create_copy_show_delete_over_http(stack, home) -> None:
    """Ollama's library calls against the served store: a model created FROM the loaded one is
    served at once with its own system prompt and parameters; copy, show, delete; bad input."""
    client = ollama.Client(host=stack.url)
    done = client.create(model="pirate", from_="terse", system="You are a pirate.",
                         parameters={"num_predict": 5, "temperature": 0})
    assert done.status == "success"
    ask = [{"role": "user", "content": "Name a fruit."}]
    chat = client.chat(model="pirate", messages=ask)
    assert chat.eval_count == 5
    with WeftClient(stack.grpc.target, retry=NO_RETRY, timeout=60) as c:
        explicit = c.generate([{"role": "system", "content": "You are a pirate."}, *ask], temperature=0, max_tokens=5,
                              stop=["zzzz"])   # terse's stop, inherited
        by_name = c.generate(ask, model="pirate")
        assert list(by_name.choices[0].token_ids) == list(explicit.choices[0].token_ids)
        # /api/generate (a prompt, not a chat) gets the model's SYSTEM prompt too.
        generated = client.generate(model="pirate", prompt="Name a fruit.")
        assert generated.response == explicit.choices[0].text and generated.eval_count == 5
        assert by_name.model == "pirate"
        assert {"terse", "pirate"} <= {m.name for m in c.models()}
    shown = parse(client.show("pirate").modelfile)
    assert shown.system == "You are a pirate." and shown.parameters["num_predict"] == 5
    client.copy("pirate", "pirate2")
    assert {"terse", "pirate", "pirate2"} <= {m.model for m in client.list().models}
    client.delete("pirate")
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="pirate", messages=ask)
    assert err.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as err:
        client.delete("terse")           # the model the server runs
    assert err.value.status_code == 400
    with pytest.raises(ollama.ResponseError) as err:
        client.create(model="bad", from_="terse", parameters={"temperature": "hot"})
    assert err.value.status_code == 400 and "temperature" in str(err.value)
    with pytest.raises(ollama.ResponseError) as err:
        client.create(model="bad", from_="/no/such/model.gguf")
    assert err.value.status_code == 400
    assert client.chat(model="pirate2", messages=ask).eval_count == 5   # the server keeps serving
