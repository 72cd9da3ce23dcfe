"""decoding/tools: the tool grammar accepts exactly the valid calls (real llguidance, the real
SmolLM2 tokenizer), the parser gives the calls back streamed or whole, bad tools name their field."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from common.errors import InvalidArgumentError
from decoding.guided import GuideCompiler
from decoding.sampling import SamplingParams
from decoding.tools import (
    FORMATS,
    ToolCallParser,
    ToolChoice,
    ToolRequest,
    ToolSpec,
    detect_format,
    parse_output,
    render_tool_history,
    tool_guided_spec,
)
from service.tokenizer import Tokenizer

WEATHER = ToolSpec("get_weather", "Weather in a city", {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
    "required": ["city"], "additionalProperties": False})
TIME = ToolSpec("get_time", "Time in a zone", {"type": "object", "properties": {"tz": {"type": "string"}},
                                               "required": ["tz"]})


@pytest.fixture(scope="module")
def compiler(smollm2_dir) -> GuideCompiler:
    tok = Tokenizer.from_dir(smollm2_dir)
    return GuideCompiler(tok, 49152)


def _accepts(compiler: GuideCompiler, req: ToolRequest, fmt: str, text: str) -> bool:
    spec = tool_guided_spec(req, FORMATS[fmt])
    guide = compiler.compile_sync(spec).new_guide()
    ids = compiler.tokenizer.encode(text, add_special_tokens=False)
    return all(guide.advance(t) for t in ids) and guide.is_complete()


def _calls(fmt: str, *calls: tuple[str, dict]) -> str:
    return FORMATS[fmt].render([(n, json.dumps(a)) for n, a in calls])


@pytest.mark.parametrize("fmt", ["hermes", "mistral", "llama3_json"])
def test_required_accepts_only_valid_calls(compiler, fmt) -> None:
    req = ToolRequest((WEATHER, TIME), ToolChoice("required"), parallel=True)
    assert _accepts(compiler, req, fmt, _calls(fmt, ("get_weather", {"city": "Paris"})))
    assert _accepts(compiler, req, fmt, _calls(fmt, ("get_weather", {"city": "Rome"}), ("get_time", {"tz": "UTC"})))
    assert not _accepts(compiler, req, fmt, _calls(fmt, ("get_weather", {"town": "Paris"})))      # extra property
    assert not _accepts(compiler, req, fmt, _calls(fmt, ("get_weather", {"city": 3})))            # wrong type
    assert not _accepts(compiler, req, fmt, _calls(fmt, ("get_weather", {"city": "P", "unit": "k"})))   # enum
    assert not _accepts(compiler, req, fmt, _calls(fmt, ("get_news", {})))                        # unknown tool
    assert not _accepts(compiler, req, fmt, "I would rather not call anything.")


def test_single_call_without_parallel_and_named(compiler) -> None:
    two = _calls("hermes", ("get_weather", {"city": "Rome"}), ("get_time", {"tz": "UTC"}))
    assert not _accepts(compiler, ToolRequest((WEATHER, TIME), ToolChoice("required"), parallel=False), "hermes", two)
    named = ToolRequest((WEATHER, TIME), ToolChoice("named", "get_time"))
    assert _accepts(compiler, named, "hermes", _calls("hermes", ("get_time", {"tz": "CET"})))
    assert not _accepts(compiler, named, "hermes", _calls("hermes", ("get_weather", {"city": "Rome"})))


@pytest.mark.parametrize("fmt", ["hermes", "mistral"])
def test_auto_is_text_or_valid_calls_once_opened(compiler, fmt) -> None:
    req = ToolRequest((WEATHER,), ToolChoice("auto"))
    call = _calls(fmt, ("get_weather", {"city": "Paris"}))
    assert _accepts(compiler, req, fmt, "Just an answer in words.")
    assert _accepts(compiler, req, fmt, call)
    assert _accepts(compiler, req, fmt, "Let me look that up. " + call)
    # Once the opening text is written, only a valid call may follow: no escape into text.
    assert not _accepts(compiler, req, fmt, "Sure " + _calls(fmt, ("get_weather", {"town": "Paris"})))
    assert not _accepts(compiler, req, fmt, "Sure " + FORMATS[fmt].open + "never mind")


def test_parser_streamed_pieces_equal_the_whole(compiler) -> None:
    fmt = FORMATS["hermes"]
    text = "Checking. " + _calls("hermes", ("get_weather", {"city": "Paris \"x\" {}"}), ("get_time", {"tz": "UTC"}))
    whole = parse_output(text, fmt)
    assert whole.content == "Checking. "
    assert [(c.name, json.loads(c.arguments)) for c in whole.tool_calls] == [
        ("get_weather", {"city": 'Paris "x" {}'}), ("get_time", {"tz": "UTC"})]
    for size in (1, 2, 5, 17):
        parser = ToolCallParser(fmt)
        content, pieces = "", []
        for i in range(0, len(text), size):
            c, d = parser.feed(text[i:i + size])
            content, pieces = content + c, pieces + d
        c, d = parser.finish()
        content, pieces = content + c, pieces + d
        assert content == whole.content
        firsts = [p for p in pieces if p.id]
        assert [p.name for p in firsts] == ["get_weather", "get_time"] and [p.index for p in firsts] == [0, 1]
        for call in parser.calls:
            assert "".join(p.arguments for p in pieces if p.index == call.index) == whole.tool_calls[call.index].arguments
    assert parse_output("No calls here <tool_", fmt).content == "No calls here <tool_"


def test_validation_names_the_field() -> None:
    def field(req: ToolRequest) -> str:
        with pytest.raises(InvalidArgumentError) as err:
            req.validate()
        return err.value.field

    assert field(ToolRequest((WEATHER, WEATHER))) == "tools[1].function.name"
    assert field(ToolRequest((ToolSpec("bad name!"),))) == "tools[0].function.name"
    assert field(ToolRequest((ToolSpec("f", parameters={"type": "string"}),))) == "tools[0].function.parameters"
    assert field(ToolRequest((WEATHER,), ToolChoice("named", "nope"))) == "tool_choice"
    assert field(ToolRequest((), ToolChoice("required"))) == "tool_choice"


def test_an_unenforceable_keyword_is_refused(compiler) -> None:
    # (An unknown format is an annotation now: the normaliser drops it; uniqueItems no grammar holds.)
    bad = ToolSpec("f", parameters={"type": "object", "properties": {"x": {"type": "array", "uniqueItems": True}},
                                    "required": ["x"]})
    with pytest.raises(InvalidArgumentError):
        compiler.compile_sync(tool_guided_spec(ToolRequest((bad,), ToolChoice("required")), FORMATS["hermes"]))


def test_local_refs_resolve_inside_the_call_object(compiler) -> None:
    """pydantic's $defs and a recursive "#": the arguments schema sits under the call object's
    "arguments", so its refs must point there, not at the call object."""
    person = ToolSpec("add_person", parameters={
        "type": "object", "properties": {"person": {"$ref": "#/$defs/Person"}}, "required": ["person"],
        "additionalProperties": False,
        "$defs": {"Person": {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0}},
                             "required": ["age"], "additionalProperties": False}}})
    req = ToolRequest((person,), ToolChoice("required"))
    assert _accepts(compiler, req, "hermes", _calls("hermes", ("add_person", {"person": {"age": 3}})))
    assert not _accepts(compiler, req, "hermes", _calls("hermes", ("add_person", {"person": {"age": -3}})))
    tree = ToolSpec("tree", parameters={
        "type": "object", "properties": {"label": {"type": "string", "maxLength": 8},
                                         "children": {"type": "array", "items": {"$ref": "#"}}},
        "required": ["label"], "additionalProperties": False})
    req = ToolRequest((tree,), ToolChoice("required"))
    nested = {"label": "a", "children": [{"label": "b", "children": [{"label": "c"}]}]}
    assert _accepts(compiler, req, "hermes", _calls("hermes", ("tree", nested)))
    # "#" is the arguments, not the call object: a child shaped like a call is refused.
    assert not _accepts(compiler, req, "hermes", _calls("hermes", ("tree", {"label": "a", "children": [
        {"name": "tree", "arguments": {"label": "b"}}]})))


def test_history_without_template_support_uses_weft_prompt() -> None:
    req = ToolRequest((WEATHER,), ToolChoice("auto"))
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'}]},
                {"role": "tool", "content": "18 C", "tool_call_id": "call_1"}]
    out, tools = render_tool_history(messages, req, FORMATS["hermes"], template_tools=False)
    assert tools is None
    assert out[0]["role"] == "system" and "get_weather" in out[0]["content"] and "<tool_call>" in out[0]["content"]
    assert out[2]["content"] == FORMATS["hermes"].render([("get_weather", '{"city": "Paris"}')])
    assert out[3] == {"role": "user", "content": '<tool_response>\n{"name": "get_weather", "content": "18 C"}\n'
                                                  "</tool_response>"}
    hf, tools = render_tool_history(messages, req, FORMATS["hermes"], template_tools=True)
    assert tools[0]["function"]["name"] == "get_weather"
    assert hf[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"} and hf[2]["name"] == "get_weather"


def test_format_detection() -> None:
    assert detect_format(None) == "hermes"
    assert detect_format("{% for m in messages %}<|im_start|>...<tool_call>{% endfor %}") == "qwen"
    assert detect_format("[TOOL_CALLS] {{ tools }}") == "mistral"
    assert detect_format("<|python_tag|>{{ tools }}") == "llama3_json"


def test_budget_closes_calls_before_max_tokens(compiler) -> None:
    """At a choice between another call and the end, a call that cannot finish in time is not started."""
    req = ToolRequest((WEATHER,), ToolChoice("required"))
    spec = tool_guided_spec(req, FORMATS["hermes"])
    one = _calls("hermes", ("get_weather", {"city": "Paris"}))
    ids = compiler.tokenizer.encode(one, add_special_tokens=False)
    guide = compiler.compile_sync(spec).new_guide(SamplingParams(max_tokens=len(ids) + 8, guided=spec))
    import torch

    row = torch.zeros(compiler.bitmask_words, dtype=torch.int32)
    for t in ids:
        assert guide.advance(t)
    guide.fill_bitmask(row)
    eos = compiler.tokenizer.eos_token_ids[0]
    newline = compiler.tokenizer.encode("\n", add_special_tokens=False)[0]
    bit = lambda t: (int(row[t // 32]) >> (t % 32)) & 1  # noqa: E731
    assert bit(eos) and not bit(newline)


def _mask_ids(guide, words: int) -> set[int]:
    row = torch.zeros(words, dtype=torch.int32)
    guide.fill_bitmask(row)
    w = row.numpy().view("uint32")
    return {32 * i + j for i in np.flatnonzero(w).tolist() for j in range(32) if (int(w[i]) >> j) & 1}


PROSE = 'To call a function, you write [this], {that} or "so", then: '


@pytest.mark.parametrize("fmt", ["hermes", "mistral", "llama3_json"])
def test_auto_text_before_a_call_is_the_models_own_under_a_budget(compiler, fmt) -> None:
    """The closing planner reads a tool grammar as JSON (the calls are), but the text before an
    auto-mode call is prose: its commas, brackets and quotes open nothing. With room to spare
    the mask there is the grammar's own (the planner once refused prose commas, and SmolLM2
    never reached its call), and the call's first token is still allowed after it."""
    req = ToolRequest((WEATHER,), ToolChoice("auto"))
    spec = tool_guided_spec(req, FORMATS[fmt])
    g = compiler.compile_sync(spec)
    words = compiler.bitmask_words
    enc = compiler.tokenizer.encode
    text = enc(PROSE, add_special_tokens=False)
    call = enc(_calls(fmt, ("get_weather", {"city": "Paris"})), add_special_tokens=False)
    guide, plain = g.new_guide(SamplingParams(max_tokens=256, guided=spec)), g.new_guide()
    assert guide._json      # planned as JSON, as the engine does for tool calls
    for i, t in enumerate(text):
        got = _mask_ids(guide, words)
        assert got == _mask_ids(plain, words), (fmt, i)
        assert guide.advance(t) and plain.advance(t)
    if fmt != "llama3_json":        # llama3_json: a call only at the very start
        assert call[0] in _mask_ids(guide, words)


def test_auto_text_near_the_end_may_only_end(compiler) -> None:
    """Near max_tokens in auto-mode text nothing is open, so the narrowed mask offers the end
    and text, never a `]` or `}` as if it closed something (it once ended an answer `a]]`)."""
    req = ToolRequest((WEATHER,), ToolChoice("auto"))
    spec = tool_guided_spec(req, FORMATS["hermes"])
    g = compiler.compile_sync(spec)
    words = compiler.bitmask_words
    tb = g.budget_tables.token_bytes
    text = compiler.tokenizer.encode(PROSE, add_special_tokens=False)
    guide, plain = g.new_guide(SamplingParams(max_tokens=len(text) + 2, guided=spec)), g.new_guide()
    narrowed = 0
    for t in text:
        got, want = _mask_ids(guide, words), _mask_ids(plain, words)
        if got != want:
            narrowed += 1
            assert got < want and not any(b"]" in (tb[i] or b"") or b"}" in (tb[i] or b"") for i in got), \
                [tb[i] for i in got]
        if t not in got:
            break
        assert guide.advance(t) and plain.advance(t)
    assert narrowed and guide.is_complete()
