"""WeftClient / AsyncWeftClient without a server: request building and the retry policy."""
from __future__ import annotations

import grpc
import pytest

from clients.client import NO_RETRY, AsyncWeftClient, RetryPolicy, WeftClient, build_generate_request
from clients.weft.v1 import guided_pb2
from clients.weft.v1 import inference_pb2 as pb


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code


class Flaky:
    """A stub method failing with the given codes first, then answering "ok"."""

    def __init__(self, *codes: grpc.StatusCode) -> None:
        self.codes = list(codes)
        self.calls: list[dict] = []

    def __call__(self, request, timeout=None, metadata=()):
        self.calls.append({"timeout": timeout, "metadata": metadata})
        if self.codes:
            raise FakeRpcError(self.codes.pop(0))
        return "ok"


FAST = RetryPolicy(max_attempts=4, initial_backoff_s=0.001, max_backoff_s=0.002)


def test_prompt_kinds() -> None:
    assert build_generate_request("hi").WhichOneof("prompt") == "text"
    ids = build_generate_request([1, 2, 3])
    assert ids.WhichOneof("prompt") == "token_ids" and list(ids.token_ids.ids) == [1, 2, 3]
    chat = build_generate_request([{"role": "user", "content": "hi"}], add_generation_prompt=False)
    assert chat.WhichOneof("prompt") == "chat"
    assert chat.chat.messages[0].role == "user" and chat.chat.add_generation_prompt is False
    assert build_generate_request(messages=[]).WhichOneof("prompt") == "chat"
    assert build_generate_request([]).WhichOneof("prompt") == "token_ids"   # empty, sent as such
    assert build_generate_request().WhichOneof("prompt") is None
    ready = pb.GenerateRequest(text="as is")
    assert build_generate_request(ready) is ready


def test_unset_parameters_stay_unset() -> None:
    req = build_generate_request("hi")
    for name in ("temperature", "top_p", "top_k", "seed"):
        assert not req.sampling.HasField(name)
    assert not req.stopping.HasField("max_tokens")
    assert not req.HasField("n") and not req.HasField("logprobs") and not req.HasField("guided")
    req = build_generate_request("hi", temperature=0.0, max_tokens=5, n=2, logprobs=0, seed=7, stop=["\n"],
                                 guided=guided_pb2.GuidedDecoding(regex="a+"), num_speculative_tokens=0)
    assert req.sampling.HasField("temperature") and req.sampling.temperature == 0.0
    assert req.stopping.max_tokens == 5 and list(req.stopping.stop) == ["\n"]
    assert req.n == 2 and req.HasField("logprobs") and req.logprobs == 0 and req.sampling.seed == 7
    assert req.guided.regex == "a+" and req.HasField("num_speculative_tokens")


def test_retries_unavailable_then_succeeds() -> None:
    client = WeftClient("localhost:1", api_key="k", retry=FAST)
    method = Flaky(grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE)
    assert client._unary(method, None, None, "rid") == "ok"
    assert len(method.calls) == 3
    assert method.calls[0]["metadata"] == (("authorization", "Bearer k"), ("x-request-id", "rid"))
    client.close()


@pytest.mark.parametrize("code", [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL])
def test_other_codes_are_not_retried(code) -> None:
    client = WeftClient("localhost:1", retry=FAST)
    method = Flaky(code)
    with pytest.raises(grpc.RpcError):
        client._unary(method, None, None)
    assert len(method.calls) == 1
    client.close()


def test_retries_are_bounded() -> None:
    client = WeftClient("localhost:1", retry=FAST)
    method = Flaky(*[grpc.StatusCode.UNAVAILABLE] * 10)
    with pytest.raises(grpc.RpcError):
        client._unary(method, None, None)
    assert len(method.calls) == FAST.max_attempts
    method = Flaky(grpc.StatusCode.UNAVAILABLE)
    with pytest.raises(grpc.RpcError):
        WeftClient("localhost:1", retry=NO_RETRY)._unary(method, None, None)
    assert len(method.calls) == 1


def test_retries_stop_at_the_deadline() -> None:
    slow = RetryPolicy(max_attempts=100, initial_backoff_s=0.2, max_backoff_s=0.2)
    client = WeftClient("localhost:1", retry=slow)
    method = Flaky(*[grpc.StatusCode.UNAVAILABLE] * 100)
    with pytest.raises(grpc.RpcError):
        client._unary(method, None, 0.5)
    # Delays are jittered within [0.1, 0.2] s: at most a call at 0, 0.1, 0.2, 0.3 and 0.4 s fit in 0.5 s.
    assert 1 <= len(method.calls) <= 5
    assert all(c["timeout"] <= 0.5 for c in method.calls)


def test_backoff_grows_and_is_capped() -> None:
    policy = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=1.0, multiplier=2.0)
    for retry, cap in [(0, 0.1), (1, 0.2), (2, 0.4), (3, 0.8), (4, 1.0), (10, 1.0)]:
        assert cap / 2 <= policy.delay(retry) <= cap


async def test_async_client_retries_unavailable() -> None:
    async with AsyncWeftClient("localhost:1", retry=FAST) as client:
        codes = [grpc.StatusCode.UNAVAILABLE]

        async def method(request, timeout=None, metadata=()):
            if codes:
                raise FakeRpcError(codes.pop())
            return "ok"

        assert await client._unary(method, None, None) == "ok"
        assert not codes
