"""weft.v1.InferenceService against a real server on a loopback port (tiny random Llama).

One server (and one offline LLM to compare with) for the whole module. The model's context is
4096 so that a long request runs for seconds (~1 ms per step): long enough that deadline and
cancel tests can only pass by aborting it.
"""
from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections.abc import Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from clients.client import NO_RETRY, AsyncWeftClient, WeftClient, build_generate_request
from clients.weft.v1 import guided_pb2
from clients.weft.v1 import inference_pb2 as pb
from decoding.sampling import SamplingParams
from service.config import EngineConfig
from service.llm import LLM
from service.server import INVALID_FIELD_KEY, BackgroundServer

CONTEXT = 4096
NUM_BLOCKS = 1024
LONG = 4000     # tokens: seconds of work, so only an abort ends such a request early


class Outcomes:
    """How each request ended, as the server reports it (WeftServer's on_request_end hook)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._seen: dict[str, list[str]] = {}

    def __call__(self, request_id: str, outcome: str) -> None:
        with self._cond:
            self._seen.setdefault(request_id, []).append(outcome)
            self._cond.notify_all()

    def wait(self, request_id: str, timeout: float = 10.0) -> str:
        """The outcome of the first call with this id, once it has ended."""
        with self._cond:
            assert self._cond.wait_for(lambda: request_id in self._seen, timeout), f"{request_id} never ended"
            return self._seen[request_id][0]

    def wait_for(self, request_id: str, outcome: str, timeout: float = 10.0) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: outcome in self._seen.get(request_id, ()), timeout), \
                f"{request_id}: {self._seen.get(request_id)}"


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory):
    return tiny_model_factory("llama", max_position_embeddings=CONTEXT)


@pytest.fixture(scope="module")
def outcomes() -> Outcomes:
    return Outcomes()


@pytest.fixture(scope="module")
def server(model_dir, outcomes):
    config = EngineConfig(model=str(model_dir), num_blocks=NUM_BLOCKS, progress=False)
    srv = BackgroundServer(config=config, on_request_end=outcomes).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with WeftClient(server.target, retry=NO_RETRY, timeout=60) as c:
        c.wait_ready(30)
        yield c


@pytest.fixture(scope="module")
def llm(model_dir) -> LLM:
    return LLM(str(model_dir), num_blocks=NUM_BLOCKS, progress=False)


def _stream_choices(msgs: list[pb.GenerateStreamResponse]) -> dict[int, dict]:
    """Fold stream deltas into {index: {text, token_ids, finish_reason}}."""
    out: dict[int, dict] = {}
    for m in msgs:
        c = out.setdefault(m.choice.index, {"text": "", "token_ids": [], "finish_reason": 0})
        c["text"] += m.choice.text
        c["token_ids"] += list(m.choice.token_ids)
        if m.choice.finish_reason:
            c["finish_reason"] = m.choice.finish_reason
    return out


def _wait_pool_whole(server: BackgroundServer, max_steps: int = 2, timeout: float = 5.0) -> None:
    """The aborted request's blocks must be back within `max_steps` engine steps of the abort."""
    engine, core = server.engine, server.core
    start = engine.steps
    deadline = time.monotonic() + timeout
    while not core.pool_is_whole():
        assert engine.steps - start <= max_steps, f"pool still short after {engine.steps - start} steps"
        assert time.monotonic() < deadline, "pool never whole"
        time.sleep(0.001)


# ---- same tokens as the offline engine -----------------------------------------------------


@pytest.mark.parametrize("prompt", ["The loom and the shuttle", [1, 504, 3451, 28, 253, 1132, 29]])
def test_unary_and_stream_match_offline_engine(client, llm, prompt) -> None:
    expect = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24))[0]
    unary = client.generate(prompt, temperature=0, max_tokens=24)
    stream = _stream_choices(list(client.generate_stream(prompt, temperature=0, max_tokens=24)))

    [choice] = unary.choices
    assert list(choice.token_ids) == expect.outputs[0].token_ids
    assert choice.text == expect.outputs[0].text
    assert stream[0]["token_ids"] == expect.outputs[0].token_ids
    assert stream[0]["text"] == expect.outputs[0].text
    assert choice.finish_reason == stream[0]["finish_reason"] == pb.FINISH_REASON_LENGTH
    assert unary.usage.prompt_tokens == expect.num_prompt_tokens
    assert unary.usage.completion_tokens == 24
    assert unary.usage.total_tokens == expect.num_prompt_tokens + 24


def test_speculative_request_matches_offline_and_reports_its_counters(client, llm) -> None:
    prompt = [1, 504, 3451, 28, 253, 1132, 29] * 3
    expect = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24))[0].outputs[0]
    plain = client.generate(prompt, temperature=0, max_tokens=24)
    fast = client.generate(prompt, temperature=0, max_tokens=24, num_speculative_tokens=4)
    assert list(fast.choices[0].token_ids) == list(plain.choices[0].token_ids) == expect.token_ids
    assert not plain.choices[0].HasField("spec_decode")
    stats = fast.choices[0].spec_decode
    assert fast.choices[0].HasField("spec_decode")
    assert stats.num_accepted_tokens <= stats.num_draft_tokens <= 4 * stats.num_drafts
    assert stats.mean_acceptance_length == pytest.approx(1 + stats.num_accepted_tokens / max(stats.num_drafts, 1))


def test_n_seeded_samples_match_offline_and_stream_tags_indexes(client, llm) -> None:
    params = dict(temperature=0.9, top_p=0.95, seed=1234, max_tokens=12, n=3)
    expect = llm.generate("Once upon a time", SamplingParams(**params))[0]
    unary = client.generate("Once upon a time", **params)
    msgs = list(client.generate_stream("Once upon a time", **params))
    stream = _stream_choices(msgs)

    assert [c.index for c in unary.choices] == [0, 1, 2]
    assert sorted(stream) == [0, 1, 2]
    for i, exp in enumerate(expect.outputs):
        assert list(unary.choices[i].token_ids) == exp.token_ids
        assert stream[i]["token_ids"] == exp.token_ids
    # Usage comes once, on the message that finishes the last of the n.
    assert [m.HasField("usage") for m in msgs] == [False] * (len(msgs) - 1) + [True]
    assert msgs[-1].usage.completion_tokens == unary.usage.completion_tokens == 36


def test_logprobs_match_offline_engine(client, llm) -> None:
    expect = llm.generate("Weaving is", SamplingParams(temperature=0, max_tokens=6, logprobs=3))[0].outputs[0]
    [choice] = client.generate("Weaving is", temperature=0, max_tokens=6, logprobs=3).choices
    assert len(choice.logprobs) == 6
    for got, exp in zip(choice.logprobs, expect.logprobs, strict=True):
        assert got.token_id == exp.token_id
        assert math.isclose(got.logprob, exp.logprob, rel_tol=1e-4, abs_tol=1e-4)
        assert [t.token_id for t in got.top_logprobs] == [t for t, _ in exp.top]
        assert got.token == client.detokenize([got.token_id], skip_special_tokens=False)
    without = client.generate("Weaving is", temperature=0, max_tokens=2).choices[0]
    assert len(without.logprobs) == 0


def test_chat_prompt_uses_the_chat_template(client, llm) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    expect = llm.chat(messages, SamplingParams(temperature=0, max_tokens=10))
    resp = client.generate(messages, temperature=0, max_tokens=10)
    assert list(resp.choices[0].token_ids) == expect.outputs[0].token_ids
    assert resp.usage.prompt_tokens == client.tokenize(messages=messages).count == expect.num_prompt_tokens


def test_stop_string_and_stop_token_are_reported(client) -> None:
    free = client.generate("The loom and the shuttle", temperature=0, max_tokens=24).choices[0]
    ids = list(free.token_ids)
    stop_text = client.detokenize(ids[5:7])
    stopped = client.generate("The loom and the shuttle", temperature=0, max_tokens=24, stop=[stop_text]).choices[0]
    assert stopped.finish_reason == pb.FINISH_REASON_STOP
    assert stopped.WhichOneof("stop_reason") == "stop_string" and stopped.stop_string == stop_text
    assert stop_text not in stopped.text and free.text.startswith(stopped.text)

    by_id = client.generate("The loom and the shuttle", temperature=0, max_tokens=24, stop_token_ids=[ids[3]]).choices[0]
    assert by_id.finish_reason == pb.FINISH_REASON_STOP
    assert by_id.stop_token_id == ids[3]
    assert list(by_id.token_ids) == ids[:4]


# ---- concurrency, cancellation, deadlines ---------------------------------------------------


async def test_64_concurrent_streams_all_complete(server, llm) -> None:
    prompts = [f"Thread number {i} runs over and under the warp" for i in range(64)]
    lengths = [8 + (i % 5) * 4 for i in range(64)]
    expect = llm.generate(prompts, [SamplingParams(temperature=0, max_tokens=n) for n in lengths])

    async with AsyncWeftClient(server.target, retry=NO_RETRY, timeout=120) as aclient:
        async def one(i: int) -> dict:
            msgs = [m async for m in aclient.generate_stream(prompts[i], temperature=0, max_tokens=lengths[i],
                                                              request_id=f"c64-{i}")]
            assert {m.request_id for m in msgs} == {f"c64-{i}"}
            return _stream_choices(msgs)[0]

        results = await asyncio.gather(*(one(i) for i in range(64)))
    for i, got in enumerate(results):
        assert got["token_ids"] == expect[i].outputs[0].token_ids, f"stream {i}"
        assert got["finish_reason"] == pb.FINISH_REASON_LENGTH
    assert server.core.pool_is_whole()


def test_cancel_mid_stream_frees_blocks(server, client, outcomes) -> None:
    stream = client.generate_stream("Cancel me", temperature=0, max_tokens=LONG, ignore_eos=True,
                                    request_id="cancel-mid-stream")
    got = [next(stream) for _ in range(3)]
    assert all(m.choice.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in got)
    assert not server.core.pool_is_whole()
    stream.close()   # cancels the RPC
    assert outcomes.wait("cancel-mid-stream") == "cancelled"
    _wait_pool_whole(server)


def test_expired_deadline_is_deadline_exceeded_and_frees_blocks(server, client, outcomes) -> None:
    with pytest.raises(grpc.RpcError) as err:
        for _ in client.generate_stream("Slow", temperature=0, max_tokens=LONG, ignore_eos=True,
                                        timeout=0.5, request_id="deadline-stream"):
            pass
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert outcomes.wait("deadline-stream") in ("deadline_exceeded", "cancelled")
    _wait_pool_whole(server)

    with pytest.raises(grpc.RpcError) as err:
        client.generate("Slow", temperature=0, max_tokens=LONG, ignore_eos=True, timeout=0.3,
                        request_id="deadline-unary")
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert outcomes.wait("deadline-unary") in ("deadline_exceeded", "cancelled")
    _wait_pool_whole(server)


# ---- every bad field is INVALID_ARGUMENT naming it ------------------------------------------

Build = Callable[[], pb.GenerateRequest]


def _req(prompt: object = "hello", **kw) -> Build:
    return lambda: build_generate_request(prompt, **kw)


def _with(mutate: Callable[[pb.GenerateRequest], None]) -> Build:
    def build() -> pb.GenerateRequest:
        r = build_generate_request("hello")
        mutate(r)
        return r
    return build


def _guided(**kw) -> Build:
    return _req(guided=guided_pb2.GuidedDecoding(**kw))


INVALID: list[tuple[str, Build, str]] = [
    ("no_prompt", lambda: pb.GenerateRequest(), "prompt"),
    ("empty_text", lambda: pb.GenerateRequest(text=""), "text"),
    ("empty_token_ids", _req(prompt=[]), "token_ids"),
    ("text_too_long", _req(prompt="weft " * (CONTEXT + 10)), "text"),
    ("token_ids_too_long", _req(prompt=[100] * CONTEXT), "token_ids"),
    ("negative_token_id", _req(prompt=[5, -1]), "token_ids"),
    ("token_id_past_vocab", _req(prompt=[5, 49152]), "token_ids"),
    ("chat_bad_role", _req(prompt=[{"role": "wizard", "content": "hi"}]), "chat.messages[0].role"),
    ("chat_empty_role", _req(prompt=[{"role": "user", "content": "a"}, {"role": "", "content": "b"}]),
     "chat.messages[1].role"),
    ("chat_no_messages", _req(prompt=None, messages=[]), "chat.messages"),
    ("max_tokens_0", _req(max_tokens=0), "stopping.max_tokens"),
    ("max_tokens_negative", _req(max_tokens=-3), "stopping.max_tokens"),
    ("temperature_negative", _req(temperature=-1.0), "sampling.temperature"),
    ("temperature_nan", _req(temperature=float("nan")), "sampling.temperature"),
    ("top_p_0", _req(top_p=0.0), "sampling.top_p"),
    ("top_p_1.5", _req(top_p=1.5), "sampling.top_p"),
    ("top_k_-2", _req(top_k=-2), "sampling.top_k"),
    ("min_p_2", _req(min_p=2.0), "sampling.min_p"),
    ("repetition_penalty_0", _req(repetition_penalty=0.0), "sampling.repetition_penalty"),
    ("presence_penalty_3", _req(presence_penalty=3.0), "sampling.presence_penalty"),
    ("frequency_penalty_-3", _req(frequency_penalty=-3.0), "sampling.frequency_penalty"),
    ("seed_too_big", _req(seed=2**63), "sampling.seed"),
    ("n_0", _req(n=0), "n"),
    ("n_too_many", _req(n=17), "n"),
    ("logprobs_21", _req(logprobs=21), "logprobs"),
    ("logprobs_negative", _req(logprobs=-1), "logprobs"),
    ("stop_empty_string", _req(stop=[""]), "stopping.stop"),
    ("stop_too_many", _req(stop=[f"s{i}" for i in range(17)]), "stopping.stop"),
    ("stop_token_id_negative", _req(stop_token_ids=[-1]), "stopping.stop_token_ids"),
    ("stop_token_id_past_vocab", _req(stop_token_ids=[10**6]), "stopping.stop_token_ids"),
    ("guided_json_schema", _guided(json_schema='{"type": "objekt"}'), "guided.json_schema"),
    ("guided_json_schema_not_json", _guided(json_schema='{"type": '), "guided.json_schema"),
    ("guided_regex", _guided(regex="([a-z]+"), "guided.regex"),
    ("guided_choice", _guided(choice=guided_pb2.ChoiceList(choices=[])), "guided.choice"),
    ("guided_grammar", _guided(grammar=guided_pb2.Grammar(definition="start: (")), "guided.grammar"),
    ("num_speculative_tokens_17", _req(num_speculative_tokens=17), "num_speculative_tokens"),
    ("num_speculative_tokens_negative", _with(lambda r: setattr(r, "num_speculative_tokens", -1)),
     "num_speculative_tokens"),
    ("cache_salt_too_long", _req(cache_salt="s" * 257), "cache_salt"),
    ("logit_bias_token_past_vocab", _req(logit_bias={49152: 1.0}), "sampling.logit_bias"),
    ("logit_bias_token_negative", _req(logit_bias={-1: 1.0}), "sampling.logit_bias"),
    ("logit_bias_101", _req(logit_bias={5: 101.0}), "sampling.logit_bias"),
    ("logit_bias_nan", _req(logit_bias={5: float("nan")}), "sampling.logit_bias"),
    ("logit_bias_301_entries", _req(logit_bias={t: 1.0 for t in range(301)}), "sampling.logit_bias"),
]


@pytest.mark.parametrize("build,field", [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
@pytest.mark.parametrize("rpc", ["unary", "stream"])
def test_invalid_field_is_invalid_argument_naming_it(client, server, build, field, rpc) -> None:
    request = build()
    with pytest.raises(grpc.RpcError) as err:
        if rpc == "unary":
            client.generate(request)
        else:
            list(client.generate_stream(request))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert err.value.details().startswith(f"{field}: "), err.value.details()
    assert (INVALID_FIELD_KEY, field) in tuple(err.value.trailing_metadata())
    assert server.core.pool_is_whole()


def test_server_keeps_serving_after_bad_requests(client) -> None:
    for build, _ in [(c[1], c[2]) for c in INVALID[:5]]:
        with pytest.raises(grpc.RpcError):
            client.generate(build())
    assert client.generate("still here", max_tokens=2, temperature=0).usage.completion_tokens == 2


def test_bad_request_id_is_invalid_argument(client) -> None:
    with pytest.raises(grpc.RpcError) as err:
        client.generate("hello", max_tokens=1, request_id="x" * 300)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("x-request-id: ")


def test_unknown_model_is_not_found(client) -> None:
    for call in (lambda: client.generate("hi", model="gpt-17"), lambda: list(client.generate_stream("hi", model="gpt-17")),
                 lambda: client.tokenize("hi", model="gpt-17"), lambda: client.model_info("gpt-17")):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "gpt-17" in err.value.details()
    name = client.models()[0].name
    assert client.generate("hi", model=name, max_tokens=1).choices[0].token_ids


def test_request_id_is_echoed(client, server) -> None:
    resp, call = client.stub.Generate.with_call(build_generate_request("hello", max_tokens=2),
                                               metadata=(("x-request-id", "my-id-1"),))
    assert resp.request_id == "my-id-1"
    assert ("x-request-id", "my-id-1") in tuple(call.initial_metadata())
    call = client.stub.GenerateStream(build_generate_request("hello", max_tokens=2), metadata=(("x-request-id", "my-id-2"),))
    msgs = list(call)
    assert ("x-request-id", "my-id-2") in tuple(call.initial_metadata())
    assert {m.request_id for m in msgs} == {"my-id-2"}
    generated = client.generate("hello", max_tokens=1).request_id
    assert len(generated) >= 16 and generated != client.generate("hello", max_tokens=1).request_id


def test_request_id_in_flight_twice_is_invalid_argument(client, server, outcomes) -> None:
    first = client.generate_stream("twice", max_tokens=LONG, ignore_eos=True, request_id="same-id")
    next(first)
    with pytest.raises(grpc.RpcError) as err:
        client.generate("twice", max_tokens=1, request_id="same-id")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("x-request-id: ")
    first.close()
    outcomes.wait_for("same-id", "cancelled")
    _wait_pool_whole(server)
    assert client.generate("twice", max_tokens=1, request_id="same-id").request_id == "same-id"


# ---- tokens, models, health, reflection ----------------------------------------------------


def test_tokenize_detokenize_roundtrip(client, llm) -> None:
    text = "Warp and weft, 42 threads."
    resp = client.tokenize(text, return_tokens=True)
    assert list(resp.token_ids) == llm.tokenizer.encode(text)
    assert resp.count == len(resp.token_ids) == len(resp.tokens)
    assert resp.max_model_len == CONTEXT
    assert client.detokenize(resp.token_ids) == llm.tokenizer.decode(list(resp.token_ids))
    with pytest.raises(grpc.RpcError) as err:
        client.detokenize([1, 10**7])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("token_ids: ")
    with pytest.raises(grpc.RpcError) as err:
        client.stub.Tokenize(pb.TokenizeRequest())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("input: ")
    with pytest.raises(grpc.RpcError) as err:
        client.tokenize(messages=[{"role": "robot", "content": "beep"}])
    assert err.value.details().startswith("chat.messages[0].role: ")


def test_models_and_model_info(client, server) -> None:
    [info] = client.models()
    core = server.core
    assert info == client.model_info() == client.model_info(info.name)
    assert info.name == core.model_name
    assert info.max_model_len == CONTEXT
    assert info.vocab_size == core.vocab_size
    assert list(info.eos_token_ids) == list(core.eos_token_ids)
    assert info.architecture == "LlamaForCausalLM"
    assert info.max_logprobs == 20 and info.max_n == 16
    assert info.kv_cache_tokens == NUM_BLOCKS * 16
    assert info.features.chat_template and info.features.logprobs
    assert info.features.guided_decoding


def test_health_reports_serving(client, server) -> None:
    assert client.health() == "SERVING"
    assert client.health("weft.v1.InferenceService") == "SERVING"
    stub = health_pb2_grpc.HealthStub(client.channel)
    with pytest.raises(grpc.RpcError) as err:
        stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_and_describes_the_service(client) -> None:
    from google.protobuf import descriptor_pb2

    stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="weft.v1.InferenceService"),
        reflection_pb2.ServerReflectionRequest(file_by_filename="weft/v1/guided.proto"),
    ]
    listed, described, dependency = list(stub.ServerReflectionInfo(iter(requests)))
    names = {s.name for s in listed.list_services_response.service}
    assert {"weft.v1.InferenceService", "grpc.health.v1.Health"} <= names
    files = [descriptor_pb2.FileDescriptorProto.FromString(b)
             for b in described.file_descriptor_response.file_descriptor_proto]
    main = next(f for f in files if f.name == "weft/v1/inference.proto")
    assert [m.name for m in main.service[0].method] == [
        "Generate", "GenerateStream", "Tokenize", "Detokenize", "ListModels", "GetModelInfo", "Embed", "ResetPrefixCache",
        "LoadAdapter", "UnloadAdapter", "CreateModel", "DeleteModel", "CopyModel"]
    assert "weft/v1/guided.proto" in main.dependency
    assert dependency.file_descriptor_response.file_descriptor_proto


# ---- the async client and the CLI ----------------------------------------------------------


async def test_async_client_calls(server) -> None:
    async with AsyncWeftClient(server.target, retry=NO_RETRY) as aclient:
        await aclient.wait_ready(10)
        assert await aclient.health() == "SERVING"
        resp = await aclient.generate("async", temperature=0, max_tokens=3)
        assert len(resp.choices[0].token_ids) == 3
        assert (await aclient.tokenize("async")).count >= 1
        assert (await aclient.models())[0].name == server.core.model_name
        assert await aclient.detokenize(list(resp.choices[0].token_ids)) == resp.choices[0].text
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await aclient.generate("x", temperature=-1.0)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_weft_client_cli(server, client, capsys) -> None:
    from service.cli import main

    expect = client.generate("Hello", temperature=0, max_tokens=5)
    assert main(["client", "--target", server.target, "generate", "Hello", "--temperature", "0",
                 "--max-tokens", "5", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [int(t) for t in doc["choices"][0]["token_ids"]] == list(expect.choices[0].token_ids)
    assert doc["choices"][0]["finish_reason"] == "FINISH_REASON_LENGTH"

    assert main(["client", "--target", server.target, "generate", "Hello", "--temperature", "0",
                 "--max-tokens", "5", "--stream"]) == 0
    assert capsys.readouterr().out == expect.choices[0].text + "\n"

    assert main(["client", "--target", server.target, "tokenize", "Hello world"]) == 0
    assert json.loads(capsys.readouterr().out) == list(client.tokenize("Hello world").token_ids)
    assert main(["client", "--target", server.target, "models"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == server.core.model_name
    assert main(["client", "--target", server.target, "health"]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"

    assert main(["client", "--target", server.target, "generate", "x", "--max-tokens", "0"]) == 1
    assert "INVALID_ARGUMENT: stopping.max_tokens" in capsys.readouterr().err


def test_prefix_cache_usage_salts_and_reset(client) -> None:
    prompt = list(range(5000, 5040))  # 40 tokens: two full blocks of 16 can be reused
    kw = dict(max_tokens=2, temperature=0, ignore_eos=True)
    first = client.generate(prompt, **kw)
    again = client.generate(prompt, **kw)
    assert first.usage.cached_prompt_tokens == 0
    assert again.usage.cached_prompt_tokens == 32
    assert again.choices[0].token_ids == first.choices[0].token_ids
    # Another tenant's salt sees none of it; the same salt twice does.
    assert client.generate(prompt, cache_salt="tenant-b", **kw).usage.cached_prompt_tokens == 0
    assert client.generate(prompt, cache_salt="tenant-b", **kw).usage.cached_prompt_tokens == 32
    stats = client.reset_prefix_cache()
    assert 0 < stats.hit_tokens <= stats.queried_tokens
    assert client.generate(prompt, **kw).usage.cached_prompt_tokens == 0


def test_guided_regex_and_choice_hold(client) -> None:
    import re

    regex = client.generate("Say a code:", max_tokens=24, temperature=1.0, seed=3,
                            guided=guided_pb2.GuidedDecoding(regex=r"[A-Z]{2}-[0-9]{3}"))
    assert re.fullmatch(r"[A-Z]{2}-[0-9]{3}", regex.choices[0].text)
    assert regex.choices[0].finish_reason == pb.FINISH_REASON_STOP
    choice = client.generate("Pick:", max_tokens=16, temperature=0,
                             guided=guided_pb2.GuidedDecoding(choice=guided_pb2.ChoiceList(choices=["red", "green"])))
    assert choice.choices[0].text in {"red", "green"}
