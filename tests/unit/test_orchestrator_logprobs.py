"""OpenAI log-probs from the engine's own log-probs where they equal the scored logits (orchestrator.py)."""

from __future__ import annotations

import pytest
import torch

from trtllm_peft.executor.api import GuidedDecodingParams
from trtllm_peft.serving.logprobs import TokenLogprob
from trtllm_peft.serving.orchestrator import GenerationParams, _engine_scored

GREEDY = dict(max_tokens=4, temperature=0.0, top_logprobs=1)


@pytest.mark.parametrize(
    "case, changes, scorable",
    [
        ("greedy, top 1", {}, True),
        ("greedy, the sampled token only", {"top_logprobs": 0}, True),
        ("no log-probs asked", {"top_logprobs": None}, False),
        ("two alternatives", {"top_logprobs": 2}, False),
        ("sampling", {"temperature": 0.7}, False),
        ("temperature unset (OpenAI's 1)", {"temperature": None}, False),
        ("repetition penalty", {"repetition_penalty": 1.2}, False),
        ("repetition penalty 1 changes nothing", {"repetition_penalty": 1.0}, True),
        ("presence penalty", {"presence_penalty": 0.5}, False),
        ("frequency penalty", {"frequency_penalty": 0.5}, False),
        ("min tokens", {"min_tokens": 2}, False),
        ("logit bias", {"embedding_bias": torch.zeros(8)}, False),
        ("bad words", {"bad_words": [[3]]}, False),
        ("guided", {"guided": GuidedDecodingParams(GuidedDecodingParams.GuideType.JSON)}, False),
    ],
)
def test_engine_scorable_only_where_the_logits_reach_the_argmax_unchanged(case, changes, scorable):
    params = GenerationParams(**{**GREEDY, **changes})
    assert params.engine_scorable() is scorable, case
    config = params.output_config(engine_scores=scorable)
    assert config.return_log_probs is scorable
    assert config.return_generation_logits is (params.top_logprobs is not None and not scorable)


@pytest.mark.parametrize(
    "k, want",
    [
        (1, [TokenLogprob(5, -0.5, [(5, -0.5)]), TokenLogprob(9, -0.25, [(9, -0.25)])]),
        (0, [TokenLogprob(5, -0.5, []), TokenLogprob(9, -0.25, [])]),
    ],
)
def test_engine_scored_entries_name_the_sampled_token_as_the_top_one(k, want):
    assert _engine_scored([5, 9], [[-0.5, -0.25]], k) == want


@pytest.mark.parametrize("log_probs", [None, [[-0.5]]])
def test_engine_scored_without_a_log_prob_per_token_is_an_error(log_probs):
    assert isinstance(_engine_scored([5, 9], log_probs, 1), ValueError)
