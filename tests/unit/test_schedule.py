"""plan_iteration: TensorRT-LLM's token budget per iteration, chunking, and the CPU budget while decoding."""

from __future__ import annotations

import pytest

from trtllm_peft.executor.api import Request
from trtllm_peft.executor.torch.schedule import affordable, attention_tokens, chunk_cost, plan_iteration
from trtllm_peft.executor.torch.sequence import Sequence


def seq(i: int, prompt_len: int, cached: int) -> Sequence:
    s = Sequence(id=i, request=Request([1] * prompt_len, 8), sampling=None, max_new=8)
    s.prompt_len, s.cached = prompt_len, cached
    return s


def sizes(plan):
    chunks, decoding = plan
    return [(s.id, n) for s, n in chunks], [s.id for s in decoding]


@pytest.mark.parametrize(
    ("running", "kw", "want"),
    [
        # whole prefill: the first prompt even past the budget, the next only if it fits
        ([(0, 3000, 0), (1, 10, 0)], dict(chunked=False), ([(0, 3000)], [])),
        ([(0, 100, 0), (1, 10, 0)], dict(chunked=False), ([(0, 100), (1, 10)], [])),
        # chunked, nothing decoding: the whole max_num_tokens, in multiples of tokens_per_block
        ([(0, 3000, 0)], dict(chunked=True), ([(0, 2048)], [])),
        ([(0, 3000, 0)], dict(chunked=True, chunk_tokens_while_decoding=16), ([(0, 2048)], [])),
        # decodes take one token each; the rest goes to chunks, cut to the block size
        ([(0, 16, 16), (1, 3000, 0)], dict(chunked=True), ([(1, 2016)], [0])),
        # while decoding: at most chunk_tokens_while_decoding prompt tokens (below a block: not rounded)
        ([(0, 16, 16), (1, 3000, 64)], dict(chunked=True, chunk_tokens_while_decoding=16), ([(1, 16)], [0])),
        # (not cut to the block size: the budget is for the streams' sake, smaller than a block by default)
        ([(0, 16, 16), (1, 3000, 0)], dict(chunked=True, chunk_tokens_while_decoding=80), ([(1, 80)], [0])),
        # tokens deep into a long prompt cost their attention too: smaller chunks there
        (
            [(0, 16, 16), (1, 3000, 1968)],
            dict(chunked=True, chunk_tokens_while_decoding=16, attention_tokens=1536),
            ([(1, 7)], [0]),
        ),
        (
            [(0, 16, 16), (1, 3000, 0)],
            dict(chunked=True, chunk_tokens_while_decoding=16, attention_tokens=1536),
            ([(1, 15)], [0]),
        ),
        # a prompt always progresses, even when one token costs more than the budget
        (
            [(0, 16, 16), (1, 9000, 8000)],
            dict(chunked=True, chunk_tokens_while_decoding=4, attention_tokens=1000),
            ([(1, 1)], [0]),
        ),
        # a prompt's last chunk is whatever is left; a second prompt shares what remains of the budget
        (
            [(0, 16, 16), (1, 40, 30), (2, 90, 0)],
            dict(chunked=True, chunk_tokens_while_decoding=32),
            ([(1, 10), (2, 22)], [0]),
        ),
        # the budget only limits chunked context: whole prefill stays whole
        (
            [(0, 16, 16), (1, 3000, 0)],
            dict(chunked=False, chunk_tokens_while_decoding=16),
            ([(1, 3000)], [0]),
        ),
    ],
)
def test_plan_iteration(running, kw, want):
    seqs = [seq(*r) for r in running]
    assert sizes(plan_iteration(seqs, 2048, tokens_per_block=32, **kw)) == want


@pytest.mark.parametrize("start", [0, 1, 31, 500, 1968, 4000])
@pytest.mark.parametrize("budget", [1, 4, 16, 64, 300])
def test_affordable_is_the_largest_chunk_within_budget(start, budget):
    n = affordable(budget, start, 1536.0)
    assert chunk_cost(n, start, 1536.0) <= budget + 1e-9
    assert chunk_cost(n + 1, start, 1536.0) > budget


def test_attention_tokens_of_smollm2():
    """SmolLM2-135M: 3.54 M matmul weights per layer, q_dim 576."""
    p = 576 * (576 + 192 + 192 + 576) + 3 * 576 * 1536
    assert attention_tokens(p, 576) == pytest.approx(1536.0)
