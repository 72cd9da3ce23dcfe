"""The Responses API (POST /v1/responses) with the official `openai` client against a real
`weft serve` on SmolLM2: greedy text equals what chat completions answer for the same turns,
streamed events come in OpenAI's order and add up to the unary answer, function calls validate
(unary and streamed), `text.format` json_schema validates, a two-turn exchange with
function_call_output, stored responses and previous_response_id (equal to sending the whole
conversation), max_output_tokens -> incomplete, bad fields 400 naming them; the OpenAI Agents SDK
on its default Responses model and pydantic-ai's OpenAIResponsesModel."""
from __future__ import annotations

import asyncio
import json
import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.test_tools_frameworks import weather_agent
from tests.test_tools_grpc import SCHEMAS, TOOLS

ASK = "What is the weather like in Paris today?"
# Responses' function tools are flat: {"type": "function", "name", "description", "parameters"}.
RTOOLS = [{"type": "function", **t["function"]} for t in TOOLS]
CITY = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                         "country": {"type": "string", "maxLength": 40},
                                         "population_millions": {"type": "number", "minimum": 0}},
        "required": ["name", "country", "population_millions"], "additionalProperties": False}


@pytest.fixture(scope="module")
def oa(smollm2_served: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{smollm2_served}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def model(oa) -> str:
    return oa.models.list().data[0].id


def _chat_text(oa, model, messages, max_tokens) -> str:
    r = oa.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
    return r.choices[0].message.content


def _events(oa, **kw) -> list:
    with oa.responses.create(stream=True, **kw) as stream:
        return list(stream)


def test_text_equals_chat_completions_unary_and_streamed(oa, model) -> None:
    kw = dict(model=model, instructions="Answer in one short sentence.", input="What is the capital of France?",
              max_output_tokens=24, temperature=0)
    resp = oa.responses.create(**kw)
    expect = _chat_text(oa, model, [{"role": "system", "content": "Answer in one short sentence."},
                                    {"role": "user", "content": "What is the capital of France?"}], 24)
    assert resp.output_text == expect and expect.strip()
    assert resp.object == "response" and resp.id.startswith("resp_") and resp.model == model
    assert resp.status in ("completed", "incomplete")
    assert resp.usage.input_tokens > 0 and 0 < resp.usage.output_tokens <= 24
    assert resp.usage.total_tokens == resp.usage.input_tokens + resp.usage.output_tokens

    events = _events(oa, **kw)
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed" if resp.status == "completed" else "response.incomplete"]
    assert set(types[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == expect == events[-4].text
    final = events[-1].response
    assert final.output_text == expect and final.usage.output_tokens == resp.usage.output_tokens


@pytest.mark.parametrize("choice", ["required", {"type": "function", "name": "book_flight"}])
def test_function_calls_validate_unary_and_streamed(oa, model, choice) -> None:
    kw = dict(model=model, input=ASK, tools=RTOOLS, tool_choice=choice, max_output_tokens=128, temperature=0)
    resp = oa.responses.create(**kw)
    calls = [o for o in resp.output if o.type == "function_call"]
    assert calls and resp.status == "completed"
    for c in calls:
        assert c.call_id.startswith("call_") and c.id.startswith("fc_")
        jsonschema.validate(json.loads(c.arguments), SCHEMAS[c.name])
    if isinstance(choice, dict):
        assert [c.name for c in calls] == ["book_flight"]

    events = _events(oa, **kw)
    added = [e.item for e in events if e.type == "response.output_item.added" and e.item.type == "function_call"]
    done = {e.item_id: e for e in events if e.type == "response.function_call_arguments.done"}
    assert [a.name for a in added] == [c.name for c in calls]
    for a, c in zip(added, calls):
        pieces = "".join(e.delta for e in events
                         if e.type == "response.function_call_arguments.delta" and e.item_id == a.id)
        assert pieces == done[a.id].arguments == c.arguments
    final = events[-1]
    assert final.type == "response.completed"
    assert [(o.name, o.arguments) for o in final.response.output if o.type == "function_call"] == \
        [(c.name, c.arguments) for c in calls]


def test_json_schema_format_validates_unary_and_streamed(oa, model) -> None:
    kw = dict(model=model, input="Describe the city of Lyon as JSON.", max_output_tokens=120, temperature=0,
              text={"format": {"type": "json_schema", "name": "city", "schema": CITY, "strict": True}})
    resp = oa.responses.create(**kw)
    jsonschema.validate(json.loads(resp.output_text), CITY)
    events = _events(oa, **kw)
    streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert streamed == resp.output_text
    sampled = oa.responses.create(**{**kw, "temperature": 1.0})
    jsonschema.validate(json.loads(sampled.output_text), CITY)


def test_function_call_output_turn(oa, model) -> None:
    first = oa.responses.create(model=model, input=ASK, tools=RTOOLS, tool_choice={"type": "function",
                                                                                   "name": "get_weather"},
                                max_output_tokens=64, temperature=0)
    [call] = [o for o in first.output if o.type == "function_call"]
    items = [{"role": "user", "content": ASK},
             {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
             {"type": "function_call_output", "call_id": call.call_id,
              "output": json.dumps({"temperature": 18, "unit": "celsius"})}]
    second = oa.responses.create(model=model, input=items, tools=RTOOLS, tool_choice="none", max_output_tokens=32,
                                 temperature=0)
    assert [o.type for o in second.output] == ["message"] and second.output_text.strip()
    # The same turns through chat completions give the same answer.
    chat = oa.chat.completions.create(
        model=model, max_tokens=32, temperature=0, tools=TOOLS, tool_choice="none",
        messages=[{"role": "user", "content": ASK},
                  {"role": "assistant", "content": None, "tool_calls": [
                      {"id": call.call_id, "type": "function",
                       "function": {"name": call.name, "arguments": call.arguments}}]},
                  {"role": "tool", "tool_call_id": call.call_id, "content": items[2]["output"]}])
    assert second.output_text == chat.choices[0].message.content


def test_previous_response_id_equals_sending_the_conversation(oa, model, smollm2_served) -> None:
    first = oa.responses.create(model=model, input="Name a colour.", max_output_tokens=12, temperature=0)
    assert oa.responses.retrieve(first.id).output_text == first.output_text
    follow = oa.responses.create(model=model, previous_response_id=first.id, input="And another one?",
                                 max_output_tokens=12, temperature=0)
    whole = oa.responses.create(model=model, max_output_tokens=12, temperature=0, store=False,
                                input=[{"role": "user", "content": "Name a colour."},
                                       {"role": "assistant", "content": first.output_text},
                                       {"role": "user", "content": "And another one?"}])
    assert follow.output_text == whole.output_text
    assert follow.usage.input_tokens == whole.usage.input_tokens > first.usage.input_tokens
    assert follow.previous_response_id == first.id
    # Not stored: nothing to retrieve or continue.
    assert httpx.get(f"{smollm2_served}/v1/responses/{whole.id}").status_code == 404
    oa.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        oa.responses.retrieve(first.id)
    with pytest.raises(openai.BadRequestError) as err:
        oa.responses.create(model=model, previous_response_id=first.id, input="Again?", max_output_tokens=4)
    assert err.value.body["param"] == "previous_response_id"


def test_max_output_tokens_is_incomplete(oa, model) -> None:
    resp = oa.responses.create(model=model, input="Write a long story about a loom.", max_output_tokens=5,
                               temperature=0)
    assert resp.status == "incomplete" and resp.incomplete_details.reason == "max_output_tokens"
    assert resp.usage.output_tokens == 5
    events = _events(oa, model=model, input="Write a long story about a loom.", max_output_tokens=5, temperature=0)
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.output_text == resp.output_text


@pytest.mark.parametrize("extra,param", [
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "name": "f", "parameters": {"type": "string"}}]}, "tools[0].parameters"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0].type"),
    ({"input": [{"type": "function_call_output", "call_id": "call_nope", "output": "1"}]}, "input[0].call_id"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
    ({"input": []}, "input"),
    ({"text": {"format": {"type": "xml"}}}, "text.format.type"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
    ({"previous_response_id": "resp_nope"}, "previous_response_id"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"background": True}, "background"),
    ({"temperature": -1}, "temperature"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"tool_choice": "sometimes", "tools": RTOOLS}, "tool_choice"),
])
def test_bad_fields_are_400_naming_them(oa, model, extra, param) -> None:
    kw = {"model": model, "input": "hi", "max_output_tokens": 4, **extra}
    with pytest.raises(openai.BadRequestError) as err:
        oa.responses.create(**kw)
    assert err.value.body["param"] == param, err.value.body
    assert oa.responses.create(model=model, input="hi", max_output_tokens=2).status == "incomplete"


# ---- frameworks on their default Responses models ---------------------------------------------


def test_openai_agents_sdk_default_responses_model(smollm2_served, model) -> None:
    from agents import OpenAIResponsesModel, Runner

    seen: list[dict] = []

    def agent():
        # A client per event loop: httpx's connections belong to the loop that opened them.
        client = openai.AsyncOpenAI(base_url=f"{smollm2_served}/v1", api_key="unused", max_retries=0)
        return weather_agent(OpenAIResponsesModel(model=model, openai_client=client), seen)

    result = Runner.run_sync(agent(), ASK, max_turns=2)
    assert len(seen) >= 1 and all(isinstance(s["city"], str) for s in seen)
    assert json.loads(result.final_output)["temperature"] == 18

    async def streamed() -> str:
        run = Runner.run_streamed(agent(), ASK, max_turns=2)
        async for _ in run.stream_events():
            pass
        return run.final_output

    before = len(seen)
    assert json.loads(asyncio.run(streamed()))["temperature"] == 18 and len(seen) > before


class City(BaseModel):
    name: str = Field(max_length=40)
    country: str = Field(max_length=40)
    population_millions: float = Field(ge=0)


def test_pydantic_ai_openai_responses_model(smollm2_served, model) -> None:
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIResponsesModel
    from pydantic_ai.providers.openai import OpenAIProvider
    from pydantic_ai.settings import ModelSettings

    rm = OpenAIResponsesModel(model, provider=OpenAIProvider(base_url=f"{smollm2_served}/v1", api_key="unused"))
    agent = Agent(rm, output_type=City, retries=0, model_settings=ModelSettings(temperature=0, max_tokens=160))
    result = agent.run_sync("Describe the city of Lyon.")
    assert isinstance(result.output, City)
    jsonschema.validate(result.output.model_dump(), City.model_json_schema())
