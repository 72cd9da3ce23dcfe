"""`weft serve` starts the REST shim beside gRPC, and `weft shim --target` serves it alone in
front of a remote server; both as real subprocesses answering SIGTERM. While `weft serve`
drains, HTTP says 503 (health and new requests) and the in-flight stream keeps going."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator

import httpx
import openai
import pytest

from common.net import free_port


class Proc:
    """A `weft ...` subprocess whose log is read until a line matches, then drained in the background."""

    def __init__(self, args: list[str], ready: str, program: list[str] | None = None) -> None:
        """`program` replaces `python -m service.cli` (tests/test_deploy.py runs the image's entrypoint)."""
        env = {**os.environ, "WEFT_API_KEY": ""}
        argv = [*(program or [sys.executable, "-m", "service.cli"]), *args]
        self.proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        assert self.proc.stderr is not None
        self.lines: list[str] = []
        for line in self.proc.stderr:          # wait on the log, not on a timer
            self.lines.append(line)
            if re.search(ready, line):
                break
        else:
            raise AssertionError("exited before ready:\n" + "".join(self.lines))
        threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True).start()

    def find(self, pattern: str) -> re.Match:
        for line in self.lines:
            if m := re.search(pattern, line):
                return m
        raise AssertionError(f"{pattern!r} not in log:\n" + "".join(self.lines))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def served(tiny_model_factory) -> Iterator[tuple[Proc, int]]:
    model = tiny_model_factory("llama", max_position_embeddings=4096)
    http_port = free_port()
    p = Proc(["serve", "--model", str(model), "--host", "127.0.0.1", "--port", "0", "--http-port", str(http_port),
              "--kv-cache-gb", "0.05", "--grace", "30"], ready=r"serving ")
    yield p, http_port
    p.stop()


def test_weft_shim_standalone_in_front_of_weft_serve(served) -> None:
    server, _ = served
    grpc_port = int(server.find(r"listening on 127\.0\.0\.1:(\d+)").group(1))
    port = free_port()
    shim = Proc(["shim", "--target", f"127.0.0.1:{grpc_port}", "--host", "127.0.0.1", "--port", str(port)],
                ready=r"HTTP on")
    try:
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/health").status_code == 200
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        model = client.models.list().data[0].id
        resp = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert resp.usage.completion_tokens == 3
        shim.proc.send_signal(signal.SIGTERM)
        assert shim.proc.wait(timeout=30) == 0, "".join(shim.lines)
    finally:
        shim.stop()


def test_weft_serve_http_drains_on_sigterm(served) -> None:
    server, port = served
    url = f"http://127.0.0.1:{port}"
    assert httpx.get(f"{url}/health").status_code == 200
    assert "weft_time_to_first_token_seconds" in httpx.get(f"{url}/metrics").text
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{url}/v1/completions", json={"prompt": "drain", "max_tokens": 3000,
                                                                "ignore_eos": True, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            server.proc.send_signal(signal.SIGTERM)
            # Draining: health and new requests say 503 while the stream in flight goes on.
            health = http.get(f"{url}/health")
            assert health.status_code == 503, health.text
            with pytest.raises(openai.InternalServerError) as e:
                client.completions.create(model="", prompt="late", max_tokens=1)
            assert e.value.status_code == 503
            received = sum(1 for line in (next(lines) for _ in range(40)) if line.startswith("data: "))
            assert received >= 10
        # Leaving the stream cancels it; the drain then has nothing left and the process exits.
    assert server.proc.wait(timeout=60) == 0, "".join(server.lines)
    assert any("HTTP on 127.0.0.1" in line for line in server.lines)
