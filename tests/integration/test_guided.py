"""The guided-decoding module alone (trtllm_peft/executor/guided.py): checks and bounds, the compile cache,
and masks equal to xgrammar's own matcher, on SmolLM2's real tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

from trtllm_peft.executor.api import GuidedDecodingConfig, GuidedDecodingParams, GuideType
from trtllm_peft.executor.guided import (
    MAX_GUIDE_CHARS,
    GuideCompiler,
    GuideError,
    GuideState,
    MaskBuffer,
    check_guide,
    guided_decoding_config,
)

xgr = pytest.importorskip("xgrammar")

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_engine):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_engine))


@pytest.fixture(scope="module")
def compiler(hf_tokenizer):
    c = GuideCompiler(guided_decoding_config(hf_tokenizer), len(hf_tokenizer), cache_size=3)
    yield c
    c.shutdown()


def P(kind: GuideType, guide: str | None = None) -> GuidedDecodingParams:
    return GuidedDecodingParams(kind, guide)


REFUSED = [
    (P(GuideType.JSON_SCHEMA), "needs a guide string"),
    (P(GuideType.JSON_SCHEMA, "{not json"), "not valid JSON"),
    (P(GuideType.JSON_SCHEMA, "[1, 2]"), "must be a JSON object"),
    (P(GuideType.JSON_SCHEMA, json.dumps({"type": "objekt"})), "invalid JSON_SCHEMA guide"),
    (
        P(GuideType.JSON_SCHEMA, json.dumps({"type": "string", "maxLength": 5000})),
        "repeats an item up to 5000",
    ),
    (P(GuideType.JSON_SCHEMA, '{"enum": ' + "[" * 40 + "]" * 40 + "}"), "nested deeper"),
    (P(GuideType.REGEX, "(unclosed"), "invalid REGEX guide"),
    (P(GuideType.REGEX, "[a-z]{1,100000}"), "repeats an item up to 100000"),
    (P(GuideType.REGEX, "(a{200}b{200}c{200})"), "summing to 600"),
    (P(GuideType.REGEX, "a" * (MAX_GUIDE_CHARS + 1)), "characters; at most"),
    (P(GuideType.EBNF_GRAMMAR, "root ::= undefined_rule"), "invalid EBNF_GRAMMAR guide"),
    (P(GuideType.STRUCTURAL_TAG, json.dumps({"type": "nonsense"})), "invalid STRUCTURAL_TAG guide"),
]


@pytest.mark.parametrize(("params", "says"), REFUSED, ids=[f"{p.guide_type.name}-{s}" for p, s in REFUSED])
def test_bad_guides_are_refused_before_compiling(params, says):
    with pytest.raises(GuideError, match=says.replace("(", r"\(").replace("{", r"\{")):
        check_guide(params)


@pytest.mark.parametrize(
    "params",
    [
        P(GuideType.JSON),
        P(GuideType.JSON_SCHEMA, json.dumps(SCHEMA)),
        P(GuideType.REGEX, r"\d{3}-\d{4}"),
        P(GuideType.REGEX, ".*"),  # unbounded repetition is cheap: allowed
        P(GuideType.EBNF_GRAMMAR, 'root ::= "yes" | "no"'),
    ],
    ids=lambda p: p.guide_type.name,
)
def test_good_guides_pass(params):
    check_guide(params)


def test_config_needs_the_encoded_vocab():
    # executorConfig.cpp GuidedDecodingConfig::validate()
    with pytest.raises(ValueError, match="EncodedVocab is not set"):
        GuideCompiler(GuidedDecodingConfig(), 100)


def test_compile_is_cached_per_guide_and_bounded(compiler):
    a = P(GuideType.REGEX, "(red|green|blue)")
    first, again = compiler.submit(a), compiler.submit(P(GuideType.REGEX, "(red|green|blue)"))
    assert first is again  # one compile, shared
    first.result()
    for pattern in ("x", "y", "z"):
        compiler.compile(P(GuideType.REGEX, pattern))
    assert compiler.cached() == 3  # LRU bound: the oldest went
    assert compiler.submit(a) is not first
    bad = compiler.submit(P(GuideType.REGEX, "(")).exception()
    assert isinstance(bad, GuideError)


def _walk(compiler, params, text, hf_tokenizer):
    """Our MaskBuffer vs xgrammar's matcher (filled and applied by xgrammar itself) at every step of `text`."""
    compiled = compiler.compile(params)
    ours, ref = GuideState(compiled), xgr.GrammarMatcher(compiled)
    vocab = compiler.vocab_size
    buffer = MaskBuffer(vocab, rows=4)
    ref_mask = xgr.allocate_token_bitmask(1, vocab)
    for token in hf_tokenizer(text, add_special_tokens=False)["input_ids"] + [hf_tokenizer.eos_token_id]:
        logits = torch.randn(3, vocab)  # [B, V]: row 1 is guided, rows 0 and 2 are free
        before = logits.clone()
        buffer.apply(logits, [1], [ours])
        ref.fill_next_token_bitmask(ref_mask)
        expected = before[1:2].clone()
        xgr.apply_token_bitmask_inplace(expected, ref_mask)
        assert torch.equal(logits[1], expected[0])
        assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
        assert torch.isfinite(logits[1, token])  # the text we walk is in the language
        assert ours.accept(token) and ref.accept_token(token)
    assert ours.terminated


def test_masks_equal_xgrammar_for_a_schema(compiler, hf_tokenizer):
    params = P(GuideType.JSON_SCHEMA, json.dumps(SCHEMA))
    _walk(compiler, params, '{"name": "Ada", "age": 36}', hf_tokenizer)


def test_masks_equal_xgrammar_for_a_choice_regex(compiler, hf_tokenizer):
    _walk(compiler, P(GuideType.REGEX, "(yes|no|maybe)"), "maybe", hf_tokenizer)


def test_mask_of_a_whole_batch_and_of_several_rows(compiler):
    compiled = compiler.compile(P(GuideType.EBNF_GRAMMAR, 'root ::= "yes" | "no"'))
    states = [GuideState(compiled) for _ in range(2)]
    buffer = MaskBuffer(compiler.vocab_size, rows=1)  # grows when more rows are guided
    logits = torch.zeros(2, compiler.vocab_size)
    buffer.apply(logits, [0, 1], states)
    allowed = [set(torch.isfinite(row).nonzero()[:, 0].tolist()) for row in logits]
    assert allowed[0] == allowed[1] and 0 < len(allowed[0]) < 10


def test_mask_of_scattered_rows_in_different_states_equals_xgrammar(compiler, hf_tokenizer):
    """Rows 0, 2, 3 of 5 guided, each at another point of its grammar, logits wider than the vocab (padded
    vocab): our vectorised unpacking gives xgrammar's own `apply_token_bitmask_inplace(..., indices=)`."""
    guides = [P(GuideType.REGEX, "[a-z]+ is [0-9]+"), P(GuideType.JSON), P(GuideType.REGEX, "(yes|no)")]
    prefixes = ["ada is", '{"a": [1, ', ""]
    states, ref = [], []
    for params, prefix in zip(guides, prefixes, strict=True):
        compiled = compiler.compile(params)
        ours, theirs = GuideState(compiled), xgr.GrammarMatcher(compiled)
        for token in hf_tokenizer(prefix, add_special_tokens=False)["input_ids"]:
            assert ours.accept(token) and theirs.accept_token(token)
        states.append(ours), ref.append(theirs)
    vocab, rows = compiler.vocab_size, [0, 2, 3]
    logits = torch.randn(5, vocab + 64)  # [B, V + pad]
    expected = logits.clone()
    MaskBuffer(vocab, rows=2).apply(logits, rows, states)  # grows to 3 rows
    ref_mask = xgr.allocate_token_bitmask(5, vocab)
    for row, matcher in zip(rows, ref, strict=True):
        matcher.fill_next_token_bitmask(ref_mask, row)
    xgr.apply_token_bitmask_inplace(expected, ref_mask, vocab_size=vocab, indices=rows)
    assert torch.equal(logits, expected)
    assert all(0 < torch.isfinite(logits[r, :vocab]).sum() < vocab for r in rows)
