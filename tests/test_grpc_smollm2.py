"""End to end on the real default model: a chat request over gRPC gives the offline engine's tokens.

One model load: the offline LLM runs first, then its EngineCore goes behind the server (the core
is single-threaded, so the two never run at once)."""
from __future__ import annotations

from clients.client import NO_RETRY, WeftClient
from clients.weft.v1 import inference_pb2 as pb
from decoding.sampling import SamplingParams
from service.llm import LLM
from service.server import BackgroundServer

MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def test_smollm2_chat_over_grpc_matches_offline_engine(smollm2_dir) -> None:
    llm = LLM(str(smollm2_dir), kv_cache_gb=0.1, progress=False)
    expect = llm.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=24)).outputs[0]
    with BackgroundServer(core=llm.engine) as server:
        with WeftClient(server.target, retry=NO_RETRY, timeout=120) as client:
            unary = client.generate(MESSAGES, temperature=0, max_tokens=24).choices[0]
            streamed = list(client.generate_stream(MESSAGES, temperature=0, max_tokens=24))
            info = client.model_info()
    assert list(unary.token_ids) == expect.token_ids
    assert unary.text == expect.text and "Paris" in unary.text
    assert [t for m in streamed for t in m.choice.token_ids] == expect.token_ids
    assert "".join(m.choice.text for m in streamed) == expect.text
    assert unary.finish_reason == streamed[-1].choice.finish_reason
    assert unary.finish_reason in (pb.FINISH_REASON_EOS, pb.FINISH_REASON_LENGTH)
    assert info.name.startswith("SmolLM2-135M-Instruct") and info.features.chat_template and info.vocab_size == 49152
