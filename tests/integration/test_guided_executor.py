"""GuidedDecodingParams through both executors, on SmolLM2: the reference engine enforces them with xgrammar
inside a batch that mixes guided and free requests; TrtllmExecutor passes them to TensorRT-LLM (the stand-in),
which answers as 1.2 does without a GuidedDecodingConfig."""

from __future__ import annotations

import json
import re
import time

import jsonschema
import pytest

from tests import trtllm_standin
from trtllm_peft.executor.api import (
    FETCH_ERROR_PREFIX,
    GUIDED_NOT_SETUP_MESSAGE,
    GuidedDecodingParams,
    GuideType,
    Request,
)
from trtllm_peft.executor.errors import ErrorKind, classify
from trtllm_peft.executor.guided import guided_decoding_config

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0},
        "colour": {"enum": ["red", "green", "blue"]},
    },
    "required": ["name", "age", "colour"],
    "additionalProperties": False,
}
BUDGET = dict(memory_budget_bytes=2 << 30, max_seq_len=512)


@pytest.fixture(scope="module")
def tok(smollm2_engine):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_engine))


def chat(tok, text: str) -> list[int]:
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    return tok(prompt, add_special_tokens=False)["input_ids"]


def finals(ex, ids, timeout=600.0):
    got, deadline = {}, time.monotonic() + timeout
    while len(got) < len(ids) and time.monotonic() < deadline:
        for r in ex.await_responses(timeout=1.0):
            if r.has_error() or r.result.is_final:
                got[r.request_id] = r
    assert len(got) == len(ids), "requests did not finish"
    return got


def mixed_batch(tok):
    """(request, check of its text) × 5: schema, regex, choice-as-regex, EBNF, and one free request."""
    ask = chat(tok, "Describe a person as JSON with name, age and favourite colour.")
    end = tok.eos_token_id

    def guided(kind, guide, n=64):
        return Request(ask, n, end_id=end, guided_decoding_params=GuidedDecodingParams(kind, guide))

    return [
        (
            guided(GuideType.JSON_SCHEMA, json.dumps(SCHEMA)),
            lambda t: jsonschema.validate(json.loads(t), SCHEMA),
        ),
        (
            guided(GuideType.REGEX, r"[A-Z][a-z]{1,10} is [1-9][0-9]? years old"),
            _full(r"[A-Z][a-z]{1,10} is [1-9][0-9]? years old"),
        ),
        (guided(GuideType.REGEX, "(red|green|blue)"), lambda t: _assert(t in ("red", "green", "blue"), t)),
        (guided(GuideType.EBNF_GRAMMAR, 'root ::= "yes" | "no"'), lambda t: _assert(t in ("yes", "no"), t)),
        (Request(ask, 12, end_id=end), lambda t: _assert(isinstance(t, str), t)),
    ]


def _full(pattern):
    return lambda t: _assert(re.fullmatch(pattern, t) is not None, t)


def _assert(ok, text):
    assert ok, f"unexpected output {text!r}"


def test_reference_engine_enforces_guides_in_a_mixed_batch(smollm2_engine, tok):
    from trtllm_peft.executor.torch import TorchExecutor

    batch = mixed_batch(tok)
    with TorchExecutor(smollm2_engine, guided_decoding_config=guided_decoding_config(tok), **BUDGET) as ex:
        ids = ex.enqueue_requests([r for r, _ in batch])
        got = finals(ex, ids)
        bad = ex.enqueue_request(
            Request([1, 2, 3], 4, guided_decoding_params=GuidedDecodingParams(GuideType.REGEX, "(x"))
        )
        refused = finals(ex, [bad])[bad]
        assert ex.guides.cached() == 5  # 4 guides + the refused one, each compiled once
    for rid, (req, check) in zip(ids, batch, strict=True):
        r = got[rid]
        assert not r.has_error(), r.error_msg
        check(tok.decode(r.result.output_token_ids[0][len(req.input_token_ids) :], skip_special_tokens=True))
    assert refused.has_error() and "invalid REGEX guide" in refused.error_msg
    assert classify(refused.error_msg) is ErrorKind.INVALID


def test_reference_engine_without_config_answers_as_tensorrt_llm(smollm2_engine):
    from trtllm_peft.executor.torch import TorchExecutor

    with TorchExecutor(smollm2_engine, **BUDGET) as ex:
        rid = ex.enqueue_request(
            Request([1, 2, 3], 4, guided_decoding_params=GuidedDecodingParams(GuideType.JSON))
        )
        r = finals(ex, [rid])[rid]
    assert r.error_msg == FETCH_ERROR_PREFIX + GUIDED_NOT_SETUP_MESSAGE


def test_trtllm_executor_passes_guides_to_tensorrt_llm(smollm2_standin_engine, tok, monkeypatch):
    tle = trtllm_standin.install(monkeypatch)
    from trtllm_peft.executor.trtllm import TrtllmExecutor

    cfg = guided_decoding_config(tok)
    with TrtllmExecutor(
        smollm2_standin_engine, max_gpu_loras=2, max_cpu_loras=2, guided_decoding_config=cfg
    ) as ex:
        assert ex._exec.delegate.guides is not None  # ExecutorConfig(guided_decoding_config=…) arrived
        batch = mixed_batch(tok)[:3]
        ids = ex.enqueue_requests([r for r, _ in batch])
        got = finals(ex, ids)
        sent = ex._exec.requests_seen[-3:]
    assert [s.guided_decoding_params.guide_type for s in sent] == [
        tle.GuidedDecodingParams.GuideType.JSON_SCHEMA,
        tle.GuidedDecodingParams.GuideType.REGEX,
        tle.GuidedDecodingParams.GuideType.REGEX,
    ]
    for rid, (req, check) in zip(ids, batch, strict=True):
        assert not got[rid].has_error(), got[rid].error_msg
        check(
            tok.decode(
                got[rid].result.output_token_ids[0][len(req.input_token_ids) :], skip_special_tokens=True
            )
        )


def test_trtllm_executor_without_config_gets_tensorrt_llms_error(smollm2_standin_engine, monkeypatch):
    tle = trtllm_standin.install(monkeypatch)
    from trtllm_peft.executor.trtllm import TrtllmExecutor

    with TrtllmExecutor(smollm2_standin_engine, max_gpu_loras=2, max_cpu_loras=2) as ex:
        rid = ex.enqueue_request(
            Request([1, 2, 3], 4, guided_decoding_params=GuidedDecodingParams(GuideType.JSON))
        )
        r = finals(ex, [rid])[rid]
    assert r.error_msg == FETCH_ERROR_PREFIX + GUIDED_NOT_SETUP_MESSAGE
    # guidedDecodingParams.cpp: every type but JSON needs its guide string
    with pytest.raises(RuntimeError, match="guide string must be provided"):
        tle.GuidedDecodingParams(tle.GuidedDecodingParams.GuideType.REGEX)
    # executorConfig.cpp GuidedDecodingConfig::validate(): xgrammar needs the vocabulary
    bare = tle.GuidedDecodingConfig(tle.GuidedDecodingConfig.GuidedDecodingBackend.XGRAMMAR)
    with pytest.raises(RuntimeError, match="EncodedVocab is not set"):
        tle.Executor(
            smollm2_standin_engine,
            tle.ModelType.DECODER_ONLY,
            tle.ExecutorConfig(guided_decoding_config=bare),
        )
