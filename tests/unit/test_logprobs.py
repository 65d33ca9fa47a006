"""serving/logprobs.py against torch.log_softmax + topk (the definition), one row at a time and batched."""

from __future__ import annotations

import pytest
import torch

from trtllm_peft.serving.logprobs import BLOCK_ROWS, RowsToScore, score_batch, token_logprobs

VOCAB = 1000


def reference(logits: torch.Tensor, token_ids: list[int], k: int, vocab: int):
    """(chosen log-prob, [(id, log-prob)] top k by value desc then id asc) per row, in float64."""
    lp = torch.log_softmax(logits[: len(token_ids), :vocab].double(), dim=-1)
    out = []
    for t, row in zip(token_ids, lp, strict=True):
        order = sorted(range(vocab), key=lambda i: (-row[i].item(), i))[:k]
        out.append((row[t].item(), [(i, row[i].item()) for i in order]))
    return out


def logits_with_ties(rows: int, width: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=g) * 4
    x[:, 7] = x[:, 3] = x.max(dim=1).values + 1.0  # a tie for the maximum: the lower id comes first
    x[:, 11] = x[:, 12] = x[:, 13] = x[:, 7] - 0.5  # a three-way tie below it
    return x


@pytest.mark.parametrize(
    "k, width, dtype",
    [
        (0, VOCAB, torch.float32),
        (1, VOCAB, torch.float32),
        (2, VOCAB, torch.float32),  # k cuts through the three-way tie
        (4, VOCAB + 24, torch.float32),  # padding columns past the vocabulary are cut off
        (20, VOCAB, torch.bfloat16),  # a bf16 engine's logits
    ],
)
def test_token_logprobs_match_log_softmax(k, width, dtype):
    logits = logits_with_ties(5, width, seed=k).to(dtype)
    if width > VOCAB:
        logits[:, VOCAB:] = 100.0  # would dominate if they were not cut off
    ids = [3, 999, 12, 0, 500]
    got = token_logprobs(logits, ids, k, VOCAB)
    want = reference(logits.float(), ids, k, VOCAB)
    for entry, t, (chosen, top) in zip(got, ids, want, strict=True):
        assert entry.token_id == t
        assert entry.logprob == pytest.approx(chosen, abs=1e-5)
        assert [i for i, _ in entry.top] == [i for i, _ in top]
        assert [v for _, v in entry.top] == pytest.approx([v for _, v in top], abs=1e-5)


def test_too_few_rows_is_an_error():
    with pytest.raises(ValueError, match="2 logits rows for 3 tokens"):
        token_logprobs(torch.zeros(2, VOCAB), [1, 2, 3], 1, VOCAB)


def test_batch_equals_one_call_per_item():
    items = [
        RowsToScore(logits_with_ties(1, VOCAB, seed=1), [5], 1, VOCAB),
        RowsToScore(logits_with_ties(3, VOCAB + 8, seed=2), [1, 2, 3], 3, VOCAB),  # padded, more rows
        RowsToScore(logits_with_ties(2, VOCAB, seed=3), [], 2, VOCAB),  # a step without tokens
        RowsToScore(logits_with_ties(2, VOCAB, seed=4), [9], 0, VOCAB),  # more rows than tokens
        RowsToScore(logits_with_ties(1, 50, seed=5), [4], 2, 50),  # another vocabulary: its own pass
    ]
    got = score_batch(items)
    for item, entries in zip(items, got, strict=True):
        assert entries == token_logprobs(item.logits, item.token_ids, item.k, item.vocab)


def test_batch_across_blocks_equals_one_call_per_item():
    """More rows than one block (BLOCK_ROWS): an item's rows may straddle two blocks, a bf16 item is
    widened on the way, the last block is partial."""
    items = [
        RowsToScore(logits_with_ties(rows, VOCAB, seed=10 + i).to(dtype), list(range(i, i + rows)), k, VOCAB)
        for i, (rows, k, dtype) in enumerate(
            [(1, 1, torch.float32)] * 6
            + [(3, 2, torch.float32), (2, 1, torch.bfloat16), (1, 0, torch.float32)]
            + [(1, 5, torch.float32)] * (2 * BLOCK_ROWS - 5)
        )
    ]
    assert sum(len(i.token_ids) for i in items) > 2 * BLOCK_ROWS
    got = score_batch(items)
    for item, entries in zip(items, got, strict=True):
        assert entries == token_logprobs(item.logits, item.token_ids, item.k, item.vocab)
    assert items[0].logits.equal(logits_with_ties(1, VOCAB, seed=10))  # the engine's rows are not written


@pytest.mark.parametrize(
    "logits, ids",
    [
        (torch.zeros(1, VOCAB), [1, 2]),  # fewer rows than tokens
        (torch.zeros(1, 1, VOCAB), [1]),  # not [T, V]
    ],
)
def test_batch_fails_only_the_malformed_item(logits, ids):
    good = RowsToScore(logits_with_ties(1, VOCAB, seed=6), [8], 1, VOCAB)
    got = score_batch([good, RowsToScore(logits, ids, 1, VOCAB), good])
    assert isinstance(got[1], ValueError)
    assert got[0] == got[2] == token_logprobs(good.logits, [8], 1, VOCAB)
