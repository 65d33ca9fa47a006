"""Hostile requests, one row each (issue #16, request side): each gets its precise 400/408/413, in the
shape of its API, before it can cost anything. Pure: the HTTP edge's pieces without a server
(tests/integration/test_hostile_server.py sends the same attacks to a live one)."""

from __future__ import annotations

import asyncio
import gzip
import json

import numpy as np
import pytest
from pydantic import ValidationError

from trtllm_peft.server.drain import Drain, DrainMiddleware
from trtllm_peft.server.generation import choice_seeds
from trtllm_peft.server.http_errors import BadRequestError
from trtllm_peft.server.json_body import MAX_DEPTH, parse_json
from trtllm_peft.server.limits import BodyLimitMiddleware, Limits
from trtllm_peft.server.schemas import ChatCompletionRequest, CompletionRequest
from trtllm_peft.server.triton.schemas import parse_request
from trtllm_peft.server.triton.tensors import HEADER_LENGTH, Tensor, TritonProtocolError, decode_request
from trtllm_peft.settings import Settings

# ---- request JSON: UTF-8, nesting, lone surrogates ---------------------------------------------------------

BAD_JSON = [
    ("invalid-utf8", b'{"model": "m", "prompt": "\xff\xfe"}', "not valid UTF-8"),
    ("truncated", b'{"model": "m", "prompt": ', "not valid JSON"),
    ("deep-100k", b"[" * 100_000 + b"]" * 100_000, "nests deeper than"),
    ("deep-33", b'{"a": ' + b"[" * MAX_DEPTH + b"]" * MAX_DEPTH + b"}", "nests deeper than"),
    ("surrogate-prompt", b'{"model": "m", "prompt": "hi \\ud800"}', "prompt: invalid Unicode"),
    ("surrogate-model", b'{"model": "\\udfff", "prompt": "hi"}', "model: invalid Unicode"),
    ("surrogate-key", b'{"\\ud83d": 1}', "invalid Unicode"),
    ("surrogate-nested", b'{"messages": [{"content": "\\udc00"}]}', "messages[0].content: invalid Unicode"),
]


@pytest.mark.parametrize("raw,phrase", [(r, p) for _, r, p in BAD_JSON], ids=[i for i, _, _ in BAD_JSON])
def test_bad_json_bodies_are_400(raw, phrase):
    with pytest.raises(BadRequestError, match=phrase.replace("[", r"\[").replace("]", r"\]")) as e:
        parse_json(raw)
    assert e.value.http_status == 400


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "m", "prompt": "caf\xc3\xa9 \\ud83d\\ude00"}',  # a surrogate *pair* is one emoji
        b'{"a": ' + b"[" * (MAX_DEPTH - 1) + b"]" * (MAX_DEPTH - 1) + b"}",
        b"[" + b"1," * 100_000 + b"1]",
    ],
    ids=["pair", "depth-32", "wide"],
)
def test_good_json_bodies_parse(raw):
    assert parse_json(raw) == json.loads(raw)


# ---- OpenAI request values: finite, in range, non-empty ----------------------------------------------------

BASE = {"model": "m", "prompt": "hi"}
BAD_VALUES = [
    ("empty-prompt", {"prompt": ""}, "prompt"),
    ("empty-prompt-list", {"prompt": []}, "prompt"),
    ("empty-inner-ids", {"prompt": [[]]}, "prompt"),
    ("empty-inner-str", {"prompt": [""]}, "prompt"),
    ("rep-penalty-inf", {"repetition_penalty": float("inf")}, "repetition_penalty"),
    ("rep-penalty-0", {"repetition_penalty": 0}, "repetition_penalty"),
    ("nvext-rep-nan", {"nvext": {"repetition_penalty": float("nan")}}, "nvext.repetition_penalty"),
    ("top-k-2^64", {"top_k": 2**64}, "top_k"),
    ("nvext-top-k-2^31", {"nvext": {"top_k": 2**31}}, "nvext.top_k"),
    ("top-k-negative", {"top_k": -1}, "top_k"),
    ("temperature-nan", {"temperature": float("nan")}, "temperature"),
    ("temperature-inf", {"temperature": float("inf")}, "temperature"),
    ("top-p-5", {"top_p": 5}, "top_p"),
    ("top-p-0", {"top_p": 0}, "top_p"),
    ("presence-inf", {"presence_penalty": float("-inf")}, "presence_penalty"),
    ("max-tokens-2^40", {"max_tokens": 2**40}, "max_tokens"),
    ("seed-2^64", {"seed": 2**64}, "seed"),
    ("n-0", {"n": 0}, "n"),
    ("n-1000", {"n": 1000}, "n"),
    ("five-stops", {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
]


@pytest.mark.parametrize(
    "changes,field", [(c, f) for _, c, f in BAD_VALUES], ids=[i for i, _, _ in BAD_VALUES]
)
def test_out_of_range_values_are_refused_by_name(changes, field):
    with pytest.raises(ValidationError) as e:
        CompletionRequest.model_validate({**BASE, **changes})
    assert ".".join(str(p) for p in e.value.errors()[0]["loc"]).startswith(field)


def test_json_infinity_literals_are_refused():
    """Python's json accepts Infinity / NaN / 1e999: the schema must still refuse them."""
    for literal in (b"Infinity", b"NaN", b"1e999"):
        body = parse_json(b'{"model": "m", "prompt": "x", "repetition_penalty": ' + literal + b"}")
        with pytest.raises(ValidationError):
            CompletionRequest.model_validate(body)


def test_chat_values_are_checked_too():
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate(
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 2**33}
        )


# ---- n > 1: independent samples, reproducible with a seed ------------------------------------------------


def test_choices_get_distinct_seeds_and_requests_differ():
    a, b = choice_seeds(None, 4), choice_seeds(None, 4)
    assert len(set(a)) == 4 and a != b  # random per request (2^-63 to collide)
    assert a == [a[0] + i for i in range(4)]


def test_a_seed_makes_choices_reproducible():
    assert choice_seeds(7, 3) == choice_seeds(7, 3) == [7, 8, 9]
    assert choice_seeds(2**64 - 1, 2) == [2**64 - 1, 0]  # wraps within the engine's uint64


# ---- Triton: header, values, prompt, compressed bodies -------------------------------------------------


def _infer_body(text="hi", **params) -> bytes:
    inputs = [
        {"name": "text_input", "datatype": "BYTES", "shape": [1, 1], "data": [text]},
        {"name": "max_tokens", "datatype": "INT32", "shape": [1, 1], "data": [4]},
    ]
    for name, value in params.items():
        dtype = "INT32" if name == "top_k" else "FP32"
        inputs.append({"name": name, "datatype": dtype, "shape": [1, 1], "data": [value]})
    return json.dumps({"inputs": inputs}).encode()


TRITON_BAD = [
    ("temperature-nan", {"temperature": float("nan")}, "temperature must be a finite number"),
    ("temperature-negative", {"temperature": -1.0}, "temperature must be"),
    ("top-p-5", {"top_p": 5.0}, "top_p must be a finite number >= 0 and <= 1"),
    ("rep-penalty-inf", {"repetition_penalty": float("inf")}, "repetition_penalty"),
    ("rep-penalty-0", {"repetition_penalty": 0.0}, "repetition_penalty must be a finite number > 0"),
    ("top-k-negative", {"top_k": -3}, "top_k must be"),
    ("frequency-nan", {"frequency_penalty": float("nan")}, "frequency_penalty"),
]


@pytest.mark.parametrize(
    "params,phrase", [(p, m) for _, p, m in TRITON_BAD], ids=[i for i, _, _ in TRITON_BAD]
)
def test_triton_values_are_checked(params, phrase):
    _, inputs = decode_request(_infer_body(**params), {})
    with pytest.raises(TritonProtocolError, match=phrase):
        parse_request(inputs)


def test_triton_empty_prompt_is_400():
    _, inputs = decode_request(_infer_body(text=""), {})
    with pytest.raises(TritonProtocolError, match="text_input must not be empty"):
        parse_request(inputs)


TRITON_WIRE = [
    ("header-length-abc", _infer_body(), {HEADER_LENGTH.lower(): "abc"}, "must be a number of bytes"),
    ("header-length-negative", _infer_body(), {HEADER_LENGTH.lower(): "-5"}, "must be a number of bytes"),
    ("header-length-past-body", _infer_body(), {HEADER_LENGTH.lower(): "99999"}, "exceeds the body"),
    ("gzip-bomb", gzip.compress(b" " * (2 << 20)), {"content-encoding": "gzip"}, "inflates to more than"),
    ("gzip-corrupt", b"\x1f\x8bnot gzip", {"content-encoding": "gzip"}, "corrupt"),
    ("deep-header", b"[" * 5000 + b"]" * 5000, {}, "nests deeper than"),
    ("shape-not-ints", b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": ["a"]}]}', {}, "shape"),
]


@pytest.mark.parametrize("body,headers,phrase", [r[1:] for r in TRITON_WIRE], ids=[r[0] for r in TRITON_WIRE])
def test_triton_wire_errors_are_400(body, headers, phrase):
    with pytest.raises((TritonProtocolError, BadRequestError), match=phrase) as e:
        decode_request(body, headers, max_bytes=1 << 20)
    assert e.value.http_status == 400


def test_triton_binary_text_must_be_utf8():
    t = Tensor("text_input", "BYTES", np.array([[b"\xff\xfe"]], dtype=object))
    with pytest.raises(TritonProtocolError, match="not valid UTF-8"):
        t.scalar()


# ---- body cap and read timeout (ASGI middleware, driven directly) -----------------------------------------


class _Recorder:
    """An ASGI app that reads the whole body (as routes do), and the messages sent back."""

    def __init__(self):
        self.read, self.sent = 0, []

    async def app(self, scope, receive, send):
        while True:
            m = await receive()
            self.read += len(m.get("body", b""))
            if not m.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def send(self, message):
        self.sent.append(message)

    def status(self) -> int:
        return self.sent[0]["status"]

    def body(self) -> dict:
        return json.loads(b"".join(m.get("body", b"") for m in self.sent[1:]))


def _scope(path="/v1/completions", length: int | None = None):
    headers = [(b"content-type", b"application/json")]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    return {"type": "http", "method": "POST", "path": path, "headers": headers}


def _chunks(n: int, size: int, stall_after: int | None = None):
    sent = 0

    async def receive():
        nonlocal sent
        if stall_after is not None and sent >= stall_after:
            await asyncio.sleep(3600)
        sent += 1
        return {"type": "http.request", "body": b"x" * size, "more_body": sent < n}

    return receive


LIMITS = Limits(max_bytes=10_000, max_triton_bytes=100_000, read_timeout=0.2)
CAP_ROWS = [
    # (id, path, declared length, chunks, chunk size, stall after, status, bytes the app may read at most)
    ("declared-over-cap", "/v1/completions", 50_000_000, 1, 10, None, 413, 0),
    ("chunked-over-cap", "/v1/completions", None, 1000, 4096, None, 413, 10_000 + 4096),
    ("triton-declared-over", "/v2/models/ensemble/infer", 200_000, 1, 10, None, 413, 0),
    ("triton-under-its-cap", "/v2/models/ensemble/infer", None, 10, 5000, None, 200, 50_000),
    ("under-cap", "/v1/completions", 5000, 5, 1000, None, 200, 5000),
    ("stalled-body", "/v1/completions", None, 10, 100, 2, 408, 200),
]


@pytest.mark.parametrize("row", CAP_ROWS, ids=[r[0] for r in CAP_ROWS])
def test_body_cap_and_read_timeout(row):
    _, path, length, n, size, stall, status, most = row
    rec = _Recorder()
    mw = BodyLimitMiddleware(rec.app, LIMITS)
    asyncio.run(mw(_scope(path, length), _chunks(n, size, stall), rec.send))
    assert rec.status() == status and rec.read <= most
    if status != 200:
        error = rec.body()["error"]
        message = error if path.startswith("/v2") else error["message"]  # Triton's shape vs OpenAI's
        assert ("body" in message) and (str(status) == "408" or "accepts" in message)
        assert (b"connection", b"close") in rec.sent[0]["headers"] or length is not None


# ---- draining: 503 for new work, health still answered --------------------------------------------------


def test_draining_refuses_work_but_answers_probes():
    drain, rec = Drain(), _Recorder()
    mw = DrainMiddleware(rec.app, drain)
    drain.start()
    asyncio.run(mw(_scope(), _chunks(1, 10), rec.send))
    assert rec.status() == 503 and rec.body()["error"]["type"] == "ServiceUnavailableError"
    probe = _Recorder()
    asyncio.run(
        DrainMiddleware(probe.app, drain)(
            {**_scope("/v1/health/live"), "method": "GET"}, _chunks(1, 0), probe.send
        )
    )
    assert probe.status() == 200


def test_drain_waits_for_running_requests():
    async def scenario():
        drain, rec = Drain(), _Recorder()
        release = asyncio.Event()

        async def slow(scope, receive, send):
            await release.wait()
            await rec.app(scope, receive, send)

        task = asyncio.create_task(DrainMiddleware(slow, drain)(_scope(), _chunks(1, 1), rec.send))
        await asyncio.sleep(0.05)
        drain.start()
        assert drain.active == 1 and not await drain.wait_idle(0.1)  # still running: not idle yet
        asyncio.get_running_loop().call_later(0.1, release.set)
        assert await drain.wait_idle(5)
        await task
        return rec.status()

    assert asyncio.run(scenario()) == 200


# ---- settings ----------------------------------------------------------------------------------------------


def test_limit_settings_parse_and_refuse_nonsense():
    s = Settings.from_env(
        {
            "TRTLLM_PEFT_MAX_REQUEST_BYTES": "65536",
            "TRTLLM_PEFT_READ_TIMEOUT": "2.5",
            "TRTLLM_PEFT_DRAIN_TIMEOUT": "0",
            "TRTLLM_PEFT_LORA_QUEUE_TIMEOUT": "12",
        }
    )
    assert (s.max_request_bytes, s.read_timeout, s.drain_timeout, s.lora_queue_timeout) == (65536, 2.5, 0, 12)
    assert Settings.from_env({}).max_request_bytes == 4 << 20
    for env in (
        {"TRTLLM_PEFT_READ_TIMEOUT": "inf"},
        {"TRTLLM_PEFT_DRAIN_TIMEOUT": "-1"},
        {"TRTLLM_PEFT_MAX_REQUEST_BYTES": "10"},
    ):
        with pytest.raises(Exception, match=next(iter(env))):
            Settings.from_env(env)
