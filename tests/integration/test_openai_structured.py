"""Structured output and tool calling through the real server, with the official `openai` client, on both
executors (reference engine; TrtllmExecutor over the TensorRT-LLM stand-in): constrained and free requests for
different adapters in one concurrent batch, every constrained output parsed and validated (`jsonschema`); tool
calls for auto, required and named, streaming and not; refused values are 400s, table-driven."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

from tests.integration.conftest import openai_client, random_adapter, smollm2_server, write_adapter

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "colour": {"enum": ["red", "green", "blue"]},
    },
    "required": ["name", "age", "colour"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 16},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The time in a timezone",
        "parameters": {
            "type": "object",
            "properties": {"tz": {"enum": ["UTC", "CET", "PST"]}},
            "required": ["tz"],
        },
    },
}
ASK = [{"role": "user", "content": "Describe a person as JSON: name, age and favourite colour."}]
WEATHER_ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(request, backend, spec, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    for i in range(2):
        adapter = random_adapter(spec, rank=8, modules=("attn_q", "attn_v"), seed=20 + i, std=0.02)
        write_adapter(adapter, root / f"lora-{i}", "hf", spec)
    with smollm2_server(request, root, backend) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server, timeout=300)


def chat(client, model, messages=ASK, max_tokens=80, **kw):
    return client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0, **kw
    )


def _schema_chat(client, model):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    text = chat(client, model, response_format=fmt).choices[0].message.content
    jsonschema.validate(json.loads(text), PERSON)
    return text


def _object_chat(client, model):
    text = (
        chat(client, model, max_tokens=120, response_format={"type": "json_object"})
        .choices[0]
        .message.content
    )
    assert isinstance(json.loads(text), dict)
    return text


def _nvext_json_completion(client, model):
    out = client.completions.create(
        model=model,
        prompt="A person as JSON:",
        max_tokens=80,
        temperature=0,
        extra_body={"nvext": {"guided_json": PERSON}},
    )
    jsonschema.validate(json.loads(out.choices[0].text), PERSON)
    return out.choices[0].text


def _regex_completion(client, model):
    pattern = r"[A-Z][a-z]{1,10} is [1-9][0-9]? years old\."
    out = client.completions.create(
        model=model,
        prompt="Alice's age:",
        max_tokens=24,
        temperature=0,
        extra_body={"nvext": {"guided_regex": pattern}},
    )
    assert re.fullmatch(pattern, out.choices[0].text), out.choices[0].text
    return out.choices[0].text


def _choice_chat(client, model):
    choices = ["positive", "negative", "neutral"]
    text = (
        chat(
            client,
            model,
            [{"role": "user", "content": "Sentiment of: I love it!"}],
            extra_body={"nvext": {"guided_choice": choices}},
        )
        .choices[0]
        .message.content
    )
    assert text in choices
    return text


def _grammar_chat(client, model):  # vLLM's top-level guided_grammar
    grammar = 'root ::= "yes" | "no"'
    text = (
        chat(
            client,
            model,
            [{"role": "user", "content": "Is the sky blue?"}],
            extra_body={"guided_grammar": grammar},
        )
        .choices[0]
        .message.content
    )
    assert text in ("yes", "no")
    return text


def _free_chat(client, model):
    return chat(client, model, max_tokens=16).choices[0].message.content


def test_constrained_and_free_requests_for_different_adapters_in_one_batch(client):
    jobs = [
        (_schema_chat, "smollm2"),
        (_schema_chat, "lora-0"),
        (_object_chat, "lora-1"),
        (_nvext_json_completion, "lora-1"),
        (_regex_completion, "smollm2"),
        (_choice_chat, "lora-0"),
        (_grammar_chat, "lora-1"),
        (_free_chat, "lora-0"),
        (_free_chat, "smollm2"),
    ]
    with ThreadPoolExecutor(len(jobs)) as pool:  # concurrent: they share the engine's batches
        results = list(pool.map(lambda j: j[0](client, j[1]), jobs))
    assert all(isinstance(r, str) for r in results)


def test_streamed_json_schema_parses(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    stream = client.chat.completions.create(
        model="lora-0", messages=ASK, max_tokens=80, temperature=0, response_format=fmt, stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), PERSON)
    assert chunks[-1].choices[0].finish_reason == "stop"


# ---- tools ---------------------------------------------------------------------------------------------------


def _check_calls(calls, tools=(WEATHER, CLOCK)):
    params = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    assert calls
    for call in calls:
        assert call.type == "function" and call.id
        jsonschema.validate(json.loads(call.function.arguments), params[call.function.name])


@pytest.mark.parametrize("model", ["smollm2", "lora-1"])
def test_named_tool_choice_always_calls_it(client, model):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    out = chat(client, model, WEATHER_ASK, tools=[WEATHER, CLOCK], tool_choice=choice).choices[0]
    assert out.finish_reason == "tool_calls"
    assert [c.function.name for c in out.message.tool_calls] == ["get_weather"]
    _check_calls(out.message.tool_calls)


def test_required_tool_choice_calls_a_listed_tool(client):
    out = chat(
        client, "lora-0", WEATHER_ASK, max_tokens=120, tools=[WEATHER, CLOCK], tool_choice="required"
    ).choices[0]
    assert out.finish_reason == "tool_calls" and out.message.content is None
    _check_calls(out.message.tool_calls)


def test_streamed_tool_calls(client):
    choice = {"type": "function", "function": {"name": "get_time"}}
    stream = client.chat.completions.create(
        model="smollm2",
        messages=WEATHER_ASK,
        max_tokens=40,
        temperature=0,
        tools=[WEATHER, CLOCK],
        tool_choice=choice,
        stream=True,
    )
    chunks = [c for c in stream if c.choices]
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert len(deltas) == 1 and deltas[0].index == 0 and deltas[0].function.name == "get_time"
    _check_calls(deltas)


def test_auto_tool_choice_parses_or_answers(client):
    out = chat(
        client, "smollm2", WEATHER_ASK, max_tokens=60, tools=[WEATHER, CLOCK], tool_choice="auto"
    ).choices[0]
    if out.message.tool_calls:  # the model chose to call: it must parse
        assert out.finish_reason == "tool_calls"
        _check_calls(out.message.tool_calls)
    else:
        assert out.message.content and "<tool_call>" not in out.message.content
    none = chat(client, "smollm2", WEATHER_ASK, max_tokens=8, tools=[WEATHER], tool_choice="none").choices[0]
    assert none.message.tool_calls is None and none.finish_reason in ("stop", "length")


def test_tool_results_in_history_are_accepted(client):
    history = [
        *WEATHER_ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    ]
    for stream in (False, True):
        out = client.chat.completions.create(
            model="lora-0", messages=history, max_tokens=12, temperature=0, tools=[WEATHER], stream=stream
        )
        if stream:
            assert list(out)[-1].choices[0].finish_reason in ("stop", "length", "tool_calls")
        else:
            assert out.choices[0].finish_reason in ("stop", "length", "tool_calls")


# ---- refused -------------------------------------------------------------------------------------------------

BAD_SCHEMA_FMT = {"type": "json_schema", "json_schema": {"name": "x"}}
REFUSED = [
    (
        "named tool not in tools",
        dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "launch"}}),
        "not in tools",
    ),
    ("tool_choice without tools", dict(tool_choice="required"), "needs a non-empty `tools`"),
    ("unknown tool_choice", dict(tools=[WEATHER], tool_choice="sometimes"), "tool_choice must be"),
    ("tool without a name", dict(tools=[{"type": "function", "function": {}}]), "tools\\[0\\]"),
    ("duplicate tools", dict(tools=[WEATHER, WEATHER]), "given twice"),
    ("json_schema without schema", dict(response_format=BAD_SCHEMA_FMT), "needs json_schema.schema"),
    (
        "malformed schema",
        dict(
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "objekt"}},
            }
        ),
        "invalid JSON_SCHEMA",
    ),
    (
        "costly schema",
        dict(
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "string", "maxLength": 100000}},
            }
        ),
        "at most 256",
    ),
    ("bad regex", dict(extra_body={"nvext": {"guided_regex": "(unclosed"}}), "invalid REGEX"),
    ("costly regex", dict(extra_body={"guided_regex": "[a-z]{1,99999}"}), "at most 256"),
    (
        "bad grammar",
        dict(extra_body={"nvext": {"guided_grammar": "root ::= missing"}}),
        "invalid EBNF_GRAMMAR",
    ),
    ("empty choice", dict(extra_body={"nvext": {"guided_choice": []}}), "guided_choice must be"),
    (
        "two guides",
        dict(response_format={"type": "json_object"}, extra_body={"nvext": {"guided_regex": "a"}}),
        "only one of",
    ),
    (
        "forced tool and a format",
        dict(tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"}),
        "cannot be combined",
    ),
]


@pytest.mark.parametrize(("case", "kwargs", "says"), REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_values_are_400(client, case, kwargs, says):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, "smollm2", WEATHER_ASK, max_tokens=2000, **kwargs)
    assert re.search(says, str(e.value)), str(e.value)
