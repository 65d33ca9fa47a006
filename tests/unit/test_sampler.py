"""The all-greedy fast path of sampler.sample: the first maximum of each row, as torch.argmax picks it."""

from __future__ import annotations

import pytest
import torch

from trtllm_peft.executor.api import SamplingConfig
from trtllm_peft.executor.torch.sampler import new_state, sample

NAN, INF = float("nan"), float("inf")


def rows(*values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


@pytest.mark.parametrize(
    "logits",
    [
        rows([0.0, 2.0, 2.0, 1.0]),  # a tie: the first maximum
        rows([1.0, 1.0, 1.0, 1.0], [-INF, -INF, -INF, -INF]),  # all equal, all -inf
        rows([0.0, NAN, 5.0, 1.0]),  # NaN wins, as in torch.argmax
        rows([INF, 3.0, INF, 0.0]),
        torch.randint(0, 3, (32, 49152)).float(),  # many ties in a real-sized batch
    ],
)
def test_greedy_rows_take_the_first_maximum_like_argmax(logits):
    states = [new_state(SamplingConfig(), None, "cpu") for _ in range(logits.shape[0])]
    tokens, lps = sample(logits, states, [[1]] * logits.shape[0], [0] * logits.shape[0], False)
    assert tokens == torch.argmax(logits, dim=-1).tolist() and lps is None
