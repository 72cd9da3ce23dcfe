"""Tensor parallelism over torch.distributed (gloo, two local ranks): greedy tokens equal one
rank's for several families — GQA with fewer KV heads than 2 x ranks, KV heads replicated, MoE
experts, MLP biases — with batching, chunked prefill and preemption forced; each rank holds about
half the weights and half the KV; guided decoding, n-gram speculation and prefix caching work
on top; and a killed rank takes the server to NOT_SERVING and its requests to UNAVAILABLE."""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator

import grpc
import jsonschema
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.weft.v1 import inference_pb2 as pb
from clients.weft.v1 import inference_pb2_grpc as pb_grpc
from decoding.guided import GuidedSpec
from decoding.sampling import SamplingParams
from common.net import free_port
from service.llm import LLM

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
FAMILIES = [
    # Llama: 4 heads, 2 KV heads -> one KV head a rank (2 < 2 x 2 ranks).
    ("llama", {}),
    # Qwen3 (per-head q/k norms) with a single KV head: replicated on both ranks.
    ("qwen3", {"num_key_value_heads": 1}),
    # Qwen2-MoE: every expert's columns split, the shared expert's too, the router whole.
    ("qwen2_moe", {}),
    # StarCoder2: biases on every projection (the row-parallel ones added once).
    ("starcoder2", {}),
    # Gemma 2: soft-capped attention and logits, sliding windows, sandwich norms.
    ("gemma2", {}),
    # Cohere: attention and MLP side by side, per-head q/k norms (a weight per head, split too).
    ("cohere", {"use_qk_norm": True}),
    ("mixtral", {}),
    ("phi3", {}),
]


def _prompts(n: int, seed: int = 7) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [3, 250, 17, 64, 1, 129, 40, 90, 8, 200, 33, 16][:n]
    return [[rng.randrange(1000, 40000) for _ in range(k)] for k in lengths]


def _tokens(llm: LLM, prompts, params=GREEDY) -> list[list[int]]:
    return [r.outputs[0].token_ids for r in llm.generate(prompts, params)]


@pytest.mark.parametrize("kind,overrides", FAMILIES, ids=[k for k, _ in FAMILIES])
def test_two_ranks_equal_one(tiny_model_factory, kind, overrides) -> None:
    path = str(tiny_model_factory(kind, **overrides))
    heavy = kind == "llama"
    prompts = _prompts(12 if heavy else 3)
    with LLM(path, dtype="float32", progress=False, num_blocks=512) as one:
        want = _tokens(one, prompts)
        whole_weights, whole_kv = one.engine.rank_memory[0]
    # The llama run also forces chunked prefill (64-token budget) and preemption (40 blocks of 16
    # tokens cannot hold the 12 sequences at once).
    kw = {"num_blocks": 40, "max_num_batched_tokens": 64} if heavy else {"num_blocks": 64 * 2}
    threads = torch.get_num_threads()
    with LLM(path, dtype="float32", progress=False, tensor_parallel_size=2, **kw) as two:
        assert _tokens(two, prompts) == want
        assert two.engine.pool_is_whole()
        if heavy:
            assert two.engine.scheduler.num_preemptions > 0
        memory = two.engine.rank_memory
    assert torch.get_num_threads() == threads   # the driver's share of the cores is given back
    assert len(memory) == 2
    blocks_one, blocks_two = 512, kw["num_blocks"]
    for weights, kv in memory:
        # Norms and routers stay whole on every rank; everything else is split in two.
        assert 0.5 <= weights / whole_weights < 0.52, (weights, whole_weights)
        kv_share = kv / blocks_two / (whole_kv / blocks_one)
        # Two KV heads: one a rank; a single KV head: replicated, the whole on each rank.
        assert kv_share == pytest.approx(1.0 if overrides.get("num_key_value_heads") == 1 else 0.5)


def test_guided_speculative_and_prefix_cached_on_two_ranks(tiny_llama) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "n": {"type": "integer"}}, "required": ["name", "n"]}
    guided = SamplingParams(temperature=0, max_tokens=60, guided=GuidedSpec("json_schema", schema))
    prompt = [list(range(5000, 5020)) * 6]
    plain = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    with LLM(str(tiny_llama), dtype="float32", progress=False, num_blocks=256) as one:
        want_json = one.generate("Write a name and a number:", guided)[0].outputs[0].text
        want = _tokens(one, prompt, plain)
    with LLM(str(tiny_llama), dtype="float32", progress=False, num_blocks=256, tensor_parallel_size=2,
             speculative_method="suffix", num_speculative_tokens=4) as two:
        text = two.generate("Write a name and a number:", guided)[0].outputs[0].text
        # Valid, always; equal to one rank's only up to near-ties: the all-reduce adds partial
        # sums in another order, and a tiny random model's digits run is full of near-ties.
        jsonschema.validate(json.loads(text), schema)
        jsonschema.validate(json.loads(want_json), schema)
        first = two.generate(prompt, plain)[0].outputs[0]
        # The same prompt again: suffix decoding drafts the first answer (verified on both ranks),
        # and the prompt's full blocks come from the prefix cache.
        hits = two.engine.stats().prefix_hit_tokens
        again = two.generate(prompt, plain)[0].outputs[0]
        assert first.token_ids == again.token_ids == want[0]
        assert again.spec is not None and again.spec["num_accepted_tokens"] >= 12
        assert two.engine.stats().prefix_hit_tokens - hits >= 96
        # n-gram (prompt lookup) asked for by the request verifies the same way.
        ngram = two.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                    num_speculative_tokens=3))[0].outputs[0]
        assert ngram.token_ids == want[0]


def test_bad_sizes_are_refused(tiny_model_factory) -> None:
    # 4 heads cannot be shared by 3 ranks: refused when building the shard, the ranks stopped.
    with pytest.raises(ValueError, match="not divisible by --tensor-parallel-size 3"):
        LLM(str(tiny_model_factory("llama")), dtype="float32", progress=False, tensor_parallel_size=3)
    with pytest.raises(ValueError, match="LoRA adapters are not supported with tensor parallelism"):
        LLM(str(tiny_model_factory("llama")), dtype="float32", progress=False, tensor_parallel_size=2,
            enable_lora=True)


def _worker(model: str, port: int, *flags: str) -> subprocess.Popen:
    """`weft worker` as rank 1 of 2, as a second host would start it (torchrun's variables)."""
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    return subprocess.Popen([sys.executable, "-m", "service.cli", "worker", "--model", model,
                             "--tensor-parallel-size", "2", *flags], env=env, stderr=subprocess.PIPE, text=True)


def test_rendezvous_from_the_environment(tiny_model_factory, monkeypatch) -> None:
    """Rank 0 in this process, rank 1 a `weft worker` joining through MASTER_ADDR/PORT: the
    layout of two hosts, on loopback."""
    path = str(tiny_model_factory("llama"))
    prompts = _prompts(3)
    with LLM(path, dtype="float32", progress=False, num_blocks=64) as one:
        want = _tokens(one, prompts)
    port = free_port()
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    worker = _worker(path, port)
    with LLM(path, dtype="float32", progress=False, num_blocks=64, tensor_parallel_size=2) as two:
        assert two.engine.tp is not None and two.engine.tp.workers == []   # nothing started locally
        assert _tokens(two, prompts) == want
    rc = worker.wait(60)
    assert rc == 0, worker.stderr.read()[-4000:]          # stopped by rank 0's close
    # A rank given another model is refused at start, naming the mismatch.
    other = str(tiny_model_factory("llama", num_hidden_layers=3))
    port = free_port()
    monkeypatch.setenv("MASTER_PORT", str(port))
    worker = _worker(other, port)
    with pytest.raises(ValueError, match=r"rank\(s\) \[1\] loaded another model"):
        LLM(path, dtype="float32", progress=False, num_blocks=64, tensor_parallel_size=2)
    assert worker.wait(60) == 1


# ---- a rank lost under a real server --------------------------------------------------------


class Server:
    """`weft serve --tensor-parallel-size 2` as a subprocess, its log read until it serves."""

    def __init__(self, model: str) -> None:
        env = {**os.environ, "WEFT_API_KEY": ""}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--model", model, "--host", "127.0.0.1", "--port", "0",
             "--http-port", "0", "--embedding-model", "none", "--tensor-parallel-size", "2", "--num-blocks", "128"],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        assert self.proc.stderr is not None
        self.lines: list[str] = []
        try:
            self._wait_serving()
        except BaseException:
            self.stop()   # a server that did not come up is not left running (with its rank 1)
            raise

    def _wait_serving(self) -> None:
        assert self.proc.stderr is not None
        # Wait on the log, not on a timer: for rank 0's "serving" line and for rank 1's own line
        # (a separate process writing to the same pipe, so it may come after rank 0's).
        port = worker = None
        for line in self.proc.stderr:
            self.lines.append(line)
            port = port or re.search(r"serving .* on 127\.0\.0\.1:(\d+)", line)
            worker = worker or re.search(r"rank 1 of 2 \(pid (\d+)\)", line)
            if port and worker:
                break
        else:
            raise AssertionError("exited before serving:\n" + "".join(self.lines))
        threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True).start()
        self.port = int(port.group(1))
        self.worker_pid = int(worker.group(1))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def tp_server(tiny_llama) -> Iterator[Server]:
    server = Server(str(tiny_llama))
    yield server
    server.stop()


def test_killed_rank_means_not_serving_and_unavailable(tp_server) -> None:
    channel = grpc.insecure_channel(f"127.0.0.1:{tp_server.port}")
    stub = pb_grpc.InferenceServiceStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
    request = pb.GenerateRequest(text="Once upon a time", sampling=pb.SamplingParameters(temperature=0),
                                 stopping=pb.StoppingCriteria(max_tokens=100000, ignore_eos=True))
    stream = stub.GenerateStream(request, timeout=60)
    next(stream)                                   # the request is running on both ranks
    os.kill(tp_server.worker_pid, signal.SIGKILL)
    with pytest.raises(grpc.RpcError) as err:
        for _ in stream:
            pass
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
    assert "rank was lost" in err.value.details()
    # Health follows within seconds (watched, not polled on a timer).
    watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=10)
    assert any(r.status == health_pb2.HealthCheckResponse.NOT_SERVING for r in watch)
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(pb.GenerateRequest(text="hi"), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    channel.close()


def test_rank_killed_while_idle_is_noticed(tp_server) -> None:
    channel = grpc.insecure_channel(f"127.0.0.1:{tp_server.port}")
    health = health_pb2_grpc.HealthStub(channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=15)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    os.kill(tp_server.worker_pid, signal.SIGKILL)
    # No request runs: the idle engine's heartbeat finds the lost rank.
    assert any(r.status == health_pb2.HealthCheckResponse.NOT_SERVING for r in watch)
    channel.close()
