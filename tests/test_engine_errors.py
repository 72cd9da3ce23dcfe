"""Bad input raises a clear error naming the field, and the engine keeps serving."""
from __future__ import annotations

import asyncio

import pytest

from decoding.sampling import SamplingParams
from service.config import EngineConfig
from service.engine.async_engine import AsyncEngine
from service.engine.core import EngineCore
from common.errors import InvalidArgumentError, ModelLoadError
from service.llm import LLM


@pytest.fixture(scope="module")
def llm(tiny_llama) -> LLM:
    return LLM(str(tiny_llama), dtype="float32", progress=False, num_blocks=64, max_model_len=256)


@pytest.mark.parametrize(
    ("prompt", "params", "field"),
    [
        ("", SamplingParams(), "prompt"),
        ([], SamplingParams(), "prompt"),
        ([5] * 300, SamplingParams(), "prompt"),
        ([10**7], SamplingParams(), "prompt_token_ids"),
        ("hi", SamplingParams(max_tokens=0), "max_tokens"),
        ("hi", SamplingParams(max_tokens=-3), "max_tokens"),
        ("hi", SamplingParams(temperature=-1), "temperature"),
        ("hi", SamplingParams(top_p=0.0), "top_p"),
        ("hi", SamplingParams(top_p=1.5), "top_p"),
        ("hi", SamplingParams(n=0), "n"),
    ],
)
def test_bad_input_names_field(llm: LLM, prompt, params, field) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        llm.generate(prompt if prompt != [] else [[]], params)
    assert err.value.field == field
    assert field in str(err.value)
    # The engine is untouched and keeps serving.
    out = llm.generate("still here", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4
    assert llm.engine.pool_is_whole()


def test_output_capped_at_context(llm: LLM) -> None:
    out = llm.generate([[7] * 250], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 256 - 250
    assert out.outputs[0].finish_reason == "length"


def test_unknown_model_path(tmp_path) -> None:
    with pytest.raises(ModelLoadError) as err:
        EngineCore(EngineConfig(model=str(tmp_path / "nope"), progress=False))
    assert "nope" in str(err.value)


async def test_async_stream_and_abort_frees_blocks(tiny_llama) -> None:
    engine = AsyncEngine(EngineCore(EngineConfig(model=str(tiny_llama), dtype="float32", progress=False, num_blocks=64)))
    try:
        params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
        deltas = [o async for o in engine.generate("a streamed request", params)]
        assert sum(len(d.token_ids) for d in deltas) == 10
        assert deltas[-1].finished and deltas[-1].finish_reason == "length"
        offline = LLM(str(tiny_llama), dtype="float32", progress=False, num_blocks=64)
        expect = offline.generate("a streamed request", params)[0].outputs[0]
        assert [t for d in deltas for t in d.token_ids] == expect.token_ids
        assert "".join(d.text for d in deltas) == expect.text

        # Leave a long stream after two deltas: the request is aborted and its blocks return.
        long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
        stream = engine.generate("x " * 50, long)
        got = 0
        async for _ in stream:
            got += 1
            if got == 2:
                break
        await stream.aclose()
        await asyncio.wait_for(engine.wait_idle(), timeout=30)
        assert engine.core.pool_is_whole()
        assert engine.steps < 200  # it was stopped early, not run to its 200 tokens

        with pytest.raises(InvalidArgumentError):
            async for _ in engine.generate("x", SamplingParams(temperature=-2)):
                pass
    finally:
        await engine.shutdown()
