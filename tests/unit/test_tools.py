"""Tool calling alone (trtllm_peft/server/tools.py): tools/tool_choice checks, parsers in vLLM's formats,
the forcing schemas, the Hermes fallback rendering and the streaming gate."""

from __future__ import annotations

import json

import jsonschema
import pytest

from trtllm_peft.server.tools import (
    StreamGate,
    ToolRequestError,
    default_parser,
    parse,
    plan,
    render_messages,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}


REFUSED = [
    ([], "required", "needs a non-empty `tools`"),
    (None, {"type": "function", "function": {"name": "get_weather"}}, "needs a non-empty `tools`"),
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "not in tools"),
    ([WEATHER], "sometimes", "tool_choice must be"),
    ([WEATHER], {"type": "function"}, "tool_choice must be"),
    ([{"type": "retrieval"}], "auto", r"tools\[0\] must be"),
    ([{"type": "function", "function": {"name": "bad name!"}}], "auto", r"tools\[0\] must be"),
    ([WEATHER, WEATHER], "auto", "given twice"),
    ([{"type": "function", "function": {"name": "f", "parameters": "x"}}], "auto", "JSON schema object"),
]


@pytest.mark.parametrize(("tools", "choice", "says"), REFUSED)
def test_inconsistent_tools_and_choice_are_refused(tools, choice, says):
    with pytest.raises(ToolRequestError, match=says):
        plan(tools, choice, "hermes")


def test_no_tools_no_plan():
    assert plan(None, None, "hermes") is None and plan([], "none", "hermes") is None


def test_forcing_schemas_accept_only_calls():
    named = plan([WEATHER, TIME], {"type": "function", "function": {"name": "get_weather"}}, "hermes")
    schema = json.loads(named.guide().guide)
    jsonschema.validate({"city": "Paris"}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"unit": "celsius"}, schema)
    required = json.loads(plan([WEATHER, TIME], "required", "hermes").guide().guide)
    jsonschema.validate([{"name": "get_time", "parameters": {}}], required)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([], required)
    assert plan([WEATHER], "auto", "hermes").guide() is None


@pytest.mark.parametrize(
    ("parser", "text", "content", "names"),
    [
        (
            "hermes",
            'Sure.<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
            "Sure.",
            ["get_time"],
        ),
        (
            "hermes",
            '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>\n<tool_call>{"name": "get_weather", '
            '"arguments": {"city": "Oslo"}}</tool_call>',
            None,
            ["get_time", "get_weather"],
        ),
        ("hermes", "<tool_call>{not json</tool_call>", "<tool_call>{not json</tool_call>", []),
        (
            "llama3_json",
            '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}',
            None,
            ["get_weather"],
        ),
        ("llama3_json", "It is sunny.", "It is sunny.", []),
        ("mistral", '[TOOL_CALLS][{"name": "get_time", "arguments": {}}]', None, ["get_time"]),
    ],
)
def test_parsers(parser, text, content, names):
    got_content, calls = parse(plan([WEATHER, TIME], "auto", parser), text)
    assert got_content == content
    assert [c["function"]["name"] for c in calls] == names
    for c in calls:
        assert c["type"] == "function" and c["id"].startswith("call_")
        assert isinstance(json.loads(c["function"]["arguments"]), dict)


def test_forced_outputs_parse_into_calls():
    named = plan([WEATHER], {"type": "function", "function": {"name": "get_weather"}}, "hermes")
    _, calls = parse(named, '{"city": "Oslo"}')
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    _, calls = parse(plan([WEATHER, TIME], "required", "hermes"), '[{"name": "get_time", "parameters": {}}]')
    assert calls[0]["function"] == {"name": "get_time", "arguments": "{}"}


def test_default_parser_follows_the_template():
    assert default_parser("{{ '[TOOL_CALLS]' }}") == "mistral"
    assert default_parser("<|python_tag|>") == "llama3_json"
    assert default_parser("<tool_call>") == "hermes" and default_parser(None) == "hermes"


def test_hermes_fallback_rendering_keeps_history():
    p = plan([WEATHER], "auto", "hermes")
    history = [
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "12 C"},
    ]
    out = render_messages(history, p, native=False)
    assert (
        out[0]["role"] == "system" and '"get_weather"' in out[0]["content"] and "<tools>" in out[0]["content"]
    )
    assert "<tool_call>" in out[2]["content"] and "Oslo" in out[2]["content"]
    assert out[3] == {"role": "tool", "content": "<tool_response>\n12 C\n</tool_response>"}
    native = render_messages(history, p, native=True)  # HF templates get the arguments as an object
    assert native[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"} and native[2] == history[2]


def test_stream_gate_holds_back_the_call():
    gate = StreamGate(plan([TIME], "auto", "hermes"))
    sent = "".join(
        gate.feed(p)
        for p in [
            "Let me ",
            "check.<tool",
            '_call>\n{"name": ',
            '"get_time", "arguments": {}}',
            "</tool_call>",
        ]
    )
    assert sent == "Let me check."
    rest, calls = gate.finish()
    assert rest == "" and [c["function"]["name"] for c in calls] == ["get_time"]
    plain = StreamGate(plan([TIME], "auto", "hermes"))
    sent = "".join(plain.feed(p) for p in ["No <to", "ols needed."])
    rest, calls = plain.finish()
    assert sent + rest == "No <tools needed." and calls == []
