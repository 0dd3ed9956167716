"""Tool calling without a model: tool_choice plans, the hermes / llama3_json / mistral parsers, and the
streamed deltas (name and id first, then arguments; content never leaks part of a call)."""

import json

import jsonschema
import pytest

from server import tools
from server.errors import APIError

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"]}}}


def test_plans_and_their_errors():
    assert tools.plan(None, None, None, auto_enabled=False, parser=None).mode == "none"
    assert tools.plan([WEATHER], "none", None, auto_enabled=False, parser=None).mode == "none"
    with pytest.raises(APIError) as e:
        tools.plan([WEATHER], None, None, auto_enabled=False, parser=None)  # auto is the default with tools
    assert e.value.param == "tool_choice" and "--enable-auto-tool-choice" in str(e.value)
    assert tools.plan([WEATHER], "auto", None, auto_enabled=True, parser="hermes").mode == "auto"
    named = tools.plan([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}}, None,
                       auto_enabled=False, parser=None)
    assert named.mode == "named" and named.schema == TIME["function"]["parameters"]
    req = tools.plan([WEATHER, TIME], "required", False, auto_enabled=False, parser=None)
    jsonschema.validate([{"name": "get_time", "parameters": {"tz": "UTC"}}], req.schema)
    with pytest.raises(jsonschema.ValidationError):  # the name picks the matching parameters schema
        jsonschema.validate([{"name": "get_time", "parameters": {"city": "Oslo"}}], req.schema)
    with pytest.raises(jsonschema.ValidationError):  # parallel_tool_calls=False: one call
        jsonschema.validate([{"name": "get_time", "parameters": {"tz": "UTC"}}] * 2, req.schema)
    for bad, param in [({"type": "function", "function": {"name": "nope"}}, "tool_choice"), ("sometimes", "tool_choice")]:
        with pytest.raises(APIError) as e:
            tools.plan([WEATHER], bad, None, auto_enabled=True, parser="hermes")
        assert e.value.param == param
    with pytest.raises(APIError) as e:
        tools.plan([{"type": "function"}], "required", None, auto_enabled=False, parser=None)
    assert e.value.param == "tools"


@pytest.mark.parametrize("parser,text,content", [
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
               '<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>', "Let me check."),
    ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}; '
                    '{"name": "get_time", "parameters": {"tz": "CET"}}', None),
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo"}}, '
                '{"name": "get_time", "arguments": {"tz": "CET"}}]', None),
])
def test_parsers_find_every_call(parser, text, content):
    got_content, calls = tools.parse_auto(parser, text)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Oslo"}),
                                                                  ("get_time", {"tz": "CET"})]
    assert len({c.id for c in calls}) == 2
    assert tools.parse_auto(parser, "Just words, no call.") == ("Just words, no call.", [])


def test_streamed_auto_holds_back_calls_and_emits_name_then_arguments():
    text = 'Sure.<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    stream = tools.ToolStream(tools.ToolPlan("auto"), "hermes")
    deltas = [d for i in range(0, len(text), 3) for d in stream.feed(text[i:i + 3])]
    more, finish = stream.finish("stop")
    deltas += more
    content = "".join(d.get("content", "") for d in deltas)
    assert content == "Sure." and finish == "tool_calls"
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert calls[0]["function"] == {"name": "get_weather", "arguments": ""} and calls[0]["id"]
    assert json.loads("".join(c["function"]["arguments"] for c in calls)) == {"city": "Oslo"}
    # Text that only looked like the start of a marker is released at the end.
    plain = tools.ToolStream(tools.ToolPlan("auto"), "hermes")
    out = plain.feed("a < b and <tool")
    rest, finish = plain.finish("stop")
    assert "".join(d["content"] for d in out + rest) == "a < b and <tool" and finish == "stop"


def test_streamed_named_call_streams_its_arguments():
    stream = tools.ToolStream(tools.ToolPlan("named", schema={}, name="get_time"), None)
    deltas = stream.feed('{"tz": ') + stream.feed('"UTC"}')
    assert deltas[0]["tool_calls"][0]["function"]["name"] == "get_time"
    assert json.loads("".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas)) == {"tz": "UTC"}
    assert stream.finish("stop") == ([], "stop")
