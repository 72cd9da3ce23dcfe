"""The frameworks users drive OpenAI- and Ollama-compatible servers with, unchanged but for the
base URL, calling tools on a real `weft serve` (SmolLM2): LangChain (`ChatOpenAI.bind_tools`,
`ChatOllama.bind_tools`), instructor (`Mode.TOOLS`), pydantic-ai (`Agent(output_type=Model)` over
`OpenAIChatModel`) and the OpenAI Agents SDK (`OpenAIChatCompletionsModel` with a
`function_tool`). Each framework's own retries are off, so its first answer must already parse
and validate."""
from __future__ import annotations

import json
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.test_tools_grpc import SCHEMAS, TOOLS
from tests.test_tools_http import CALLS_BY_ITSELF


class Flight(BaseModel):
    """Book a flight."""
    origin: str = Field(max_length=30)
    destination: str = Field(max_length=30)
    passengers: int = Field(ge=1, le=9)


class City(BaseModel):
    name: str = Field(max_length=40)
    country: str = Field(max_length=40)
    population_millions: float = Field(ge=0)
    climate: Literal["oceanic", "mediterranean", "continental", "tropical", "arid"]


@pytest.fixture(scope="module")
def model(smollm2_served: str) -> str:
    return openai.OpenAI(base_url=f"{smollm2_served}/v1", api_key="unused").models.list().data[0].id


def test_langchain_chat_openai_bind_tools(smollm2_served, model) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=model, base_url=f"{smollm2_served}/v1", api_key="unused", temperature=0,
                     max_tokens=128, max_retries=0)
    for choice in ("required", "get_weather", "book_flight"):
        msg = llm.bind_tools(TOOLS, tool_choice=choice).invoke("What is the weather like in Paris today?")
        assert msg.tool_calls and not msg.invalid_tool_calls
        for call in msg.tool_calls:
            assert call["id"].startswith("call_")
            jsonschema.validate(call["args"], SCHEMAS[call["name"]])
        if choice != "required":
            assert {c["name"] for c in msg.tool_calls} == {choice}
    # A pydantic class as the tool, the way LangChain users write them.
    msg = llm.bind_tools([Flight], tool_choice="Flight").invoke("Book a flight from Paris to Rome for 2 people.")
    assert [c["name"] for c in msg.tool_calls] == ["Flight"]
    Flight.model_validate(msg.tool_calls[0]["args"])


def test_langchain_chat_ollama_bind_tools(smollm2_served, model) -> None:
    from langchain_ollama import ChatOllama

    llm = ChatOllama(model=model, base_url=smollm2_served, temperature=0, num_predict=128)
    msg = llm.bind_tools(TOOLS).invoke([(m["role"], m["content"]) for m in CALLS_BY_ITSELF])
    assert msg.tool_calls and not msg.invalid_tool_calls
    for call in msg.tool_calls:
        # langchain-ollama sends the schemas whole (not through the ollama client's Tool model).
        jsonschema.validate(call["args"], SCHEMAS[call["name"]])


def test_instructor_mode_tools(smollm2_served, model) -> None:
    import instructor

    client = instructor.from_openai(openai.OpenAI(base_url=f"{smollm2_served}/v1", api_key="unused", max_retries=0),
                                    mode=instructor.Mode.TOOLS)
    city = client.chat.completions.create(
        model=model, response_model=City, max_retries=0, temperature=0, max_tokens=160,
        messages=[{"role": "user", "content": "Describe the city of Lyon."}])
    assert isinstance(city, City)
    jsonschema.validate(city.model_dump(), City.model_json_schema())


def test_pydantic_ai_agent_output_type(smollm2_served, model) -> None:
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider
    from pydantic_ai.settings import ModelSettings

    chat = OpenAIChatModel(model, provider=OpenAIProvider(base_url=f"{smollm2_served}/v1", api_key="unused"))
    agent = Agent(chat, output_type=City, retries=0,
                  model_settings=ModelSettings(temperature=0, max_tokens=160))
    result = agent.run_sync("Describe the city of Lyon.")
    assert isinstance(result.output, City)
    # pydantic-ai asked for its output through a tool call: the call is in the message history.
    calls = [p for m in result.all_messages() for p in getattr(m, "parts", []) if p.part_kind == "tool-call"]
    assert calls and json.loads(calls[0].args_as_json_str()) == result.output.model_dump()


def weather_agent(model_obj, seen: list[dict]):
    """An Agents SDK agent that must call a `get_weather` function tool (recording each call in
    `seen`) and stops on its first result, on the given SDK model object."""
    from agents import Agent, ModelSettings, function_tool, set_tracing_disabled

    set_tracing_disabled(True)   # no exporter: nothing leaves the machine

    @function_tool
    def get_weather(city: str, unit: Literal["celsius", "fahrenheit"] = "celsius") -> str:
        """Current weather in a city."""
        seen.append({"city": city, "unit": unit})
        return json.dumps({"city": city, "temperature": 18, "unit": unit})

    return Agent(name="weather", instructions="Answer questions about the weather.", tools=[get_weather],
                 model=model_obj, model_settings=ModelSettings(tool_choice="required", temperature=0, max_tokens=96),
                 tool_use_behavior="stop_on_first_tool")


def test_openai_agents_sdk_function_tool(smollm2_served, model) -> None:
    from agents import OpenAIChatCompletionsModel, Runner

    seen: list[dict] = []
    client = openai.AsyncOpenAI(base_url=f"{smollm2_served}/v1", api_key="unused", max_retries=0)
    agent = weather_agent(OpenAIChatCompletionsModel(model=model, openai_client=client), seen)
    result = Runner.run_sync(agent, "What is the weather like in Paris today?", max_turns=2)
    assert len(seen) >= 1 and all(isinstance(s["city"], str) for s in seen)
    assert json.loads(result.final_output)["temperature"] == 18
