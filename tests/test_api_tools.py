"""Tool calling (issue 14): tools rendered into the real SmolLM2 / Gemma 3 chat templates,
tool calls parsed back from crafted model text in the families' styles."""

from __future__ import annotations

import copy
import json

import pytest

from jaxinfer.checkpoints import gguf_vocab, sources
from jaxinfer.serving.tools import call_schema, messages_for_template, parse_tool_calls

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}
NAMES = {"get_weather", "get_time"}
CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function",
     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
]


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_path):
    return gguf_vocab.build(smollm2_path)


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def tokenizer(request, smollm2_tokenizer):
    if request.param == "smollm2":
        return smollm2_tokenizer
    gemma = copy.copy(smollm2_tokenizer)  # Gemma 3's template; the vocabulary does not matter
    gemma.chat_template = sources.GEMMA3_CHAT_TEMPLATE
    return gemma


def test_tools_and_earlier_calls_render_through_the_chat_template(tokenizer):
    messages = messages_for_template(CONVERSATION, [WEATHER, TIME], tokenizer.chat_template)
    prompt = tokenizer.apply_chat_template(messages, tools=[WEATHER, TIME])
    assert json.dumps(WEATHER) in prompt and json.dumps(TIME) in prompt
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt
    assert '<tool_response>\n{"temp": 21}\n</tool_response>' in prompt
    assert prompt.index("<tools>") < prompt.index("Weather in Paris?")


def test_a_template_that_renders_tools_gets_them_as_its_variable(smollm2_tokenizer):
    own = copy.copy(smollm2_tokenizer)
    own.chat_template = ("{% for t in tools %}[{{ t.function.name }}]{% endfor %}"
                         "{% for m in messages %}{{ m.content }}{% endfor %}")
    messages = messages_for_template(CONVERSATION[:1], [WEATHER], own.chat_template)
    assert messages == CONVERSATION[:1]
    assert own.apply_chat_template(messages, tools=[WEATHER]) == "[get_weather]Weather in Paris?"


@pytest.mark.parametrize(("text", "calls", "content"), [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>',
     [("get_weather", {"city": "Oslo"})], None),
    ('Let me check.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}'
     '</tool_call>\n<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}</tool_call>',
     [("get_weather", {"city": "Rome"}), ("get_time", {"zone": "CET"})], "Let me check."),
    ('{"name": "get_time", "parameters": {"zone": "UTC"}}', [("get_time", {"zone": "UTC"})],
     None),  # Llama 3 JSON
    ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Lima"}}',
     [("get_weather", {"city": "Lima"})], None),
    ('<tool_call>{"name": "get_weather", "arguments": {"city": "Kyiv"}}',
     [("get_weather", {"city": "Kyiv"})], None),  # cut at a stop before the closing tag
])
def test_tool_calls_parse_from_each_familys_style(text, calls, content):
    got_content, got = parse_tool_calls(text, NAMES)
    assert got_content == content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got] == calls
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in got)


@pytest.mark.parametrize("text", [
    "The weather is sunny.",
    '{"answer": 42}',  # JSON, but not a call
    '<tool_call>{"name": "launch_rocket", "arguments": {}}</tool_call>',  # not offered
    '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>',  # broken JSON
])
def test_text_that_is_not_a_valid_call_stays_content(text):
    assert parse_tool_calls(text, NAMES) == (text, [])


def test_call_schema_names_one_function_or_any():
    jsonschema = pytest.importorskip("jsonschema")
    one = call_schema([WEATHER, TIME], "get_time")
    jsonschema.validate({"name": "get_time", "arguments": {"zone": "X"}}, one)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "get_weather", "arguments": {"city": "X"}}, one)
    both = call_schema([WEATHER, TIME])
    jsonschema.validate({"name": "get_weather", "arguments": {"city": "X"}}, both)
