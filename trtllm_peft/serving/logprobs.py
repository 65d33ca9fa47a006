"""OpenAI log-probs from the engine's raw logits (executor Result.context_logits / generation_logits).

Values are log-softmax of the model's logits over the model's vocabulary (padding columns a TensorRT-LLM
engine may add are cut off first), before logit_bias, bad words, penalties, temperature and top-k/top-p:
what the model says, whatever the request does with it — vLLM's default (`logprobs_mode=raw_logprobs`),
and the same on both executors because it is computed here, above them. The sampled token's entry is
always present; `top` holds the k most likely tokens, most likely first, ties to the lower token id.

The arithmetic is numpy on float32 rows, as torch.log_softmax computes it (x - max - log Σ exp(x - max)):
single-threaded and without torch's per-op dispatch, because it runs next to the engine for every streamed
token (on two cores torch's intra-op threads here would fight the engine's). `score_batch` scores the rows
of many sequences together, a few rows at a time in buffers that stay in cache: the engine client calls it
once per engine step for every stream that asked.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class TokenLogprob:
    """One position: the token there, its log-prob, and the k most likely (token id, log-prob) pairs."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


def generation_rows(logits: torch.Tensor, streaming: bool) -> torch.Tensor:
    """[T, V] rows of Result.generation_logits ([T, 1, V] streaming, [1, T, V] final: executor.h)."""
    return logits[:, 0, :] if streaming else logits[0]


def token_logprobs(logits: torch.Tensor, token_ids: list[int], k: int, vocab: int) -> list[TokenLogprob]:
    """For logits [T', V'] (T' >= len(token_ids)): row t scores token_ids[t]."""
    if logits.shape[0] < len(token_ids):
        raise ValueError(f"{logits.shape[0]} logits rows for {len(token_ids)} tokens")
    rows = logits[: len(token_ids), :vocab]
    return score_rows(_as_numpy(rows), token_ids, k)


def prompt_logprobs(
    context_logits: torch.Tensor, prompt_ids: list[int], k: int, vocab: int
) -> list[TokenLogprob | None]:
    """Log-probs of the prompt's tokens from context logits [P, V] (row i predicts token i + 1); the first
    token has none (None), as OpenAI's `echo` answers."""
    return [None, *token_logprobs(context_logits[: len(prompt_ids) - 1], prompt_ids[1:], k, vocab)]


@dataclass(frozen=True)
class RowsToScore:
    """One stream's share of a step: its logits rows [T', V'] (row t scores token_ids[t]), k, vocabulary."""

    logits: torch.Tensor
    token_ids: list[int]
    k: int
    vocab: int


def score_batch(items: list[RowsToScore]) -> list[list[TokenLogprob] | ValueError]:
    """token_logprobs of every item, the rows of all items with one vocabulary scored together (the same
    values as one call per item); an item whose logits do not fit its tokens gets its ValueError."""
    out: list[list[TokenLogprob] | ValueError] = [[] for _ in items]
    groups: dict[int, list[int]] = {}
    for i, item in enumerate(items):
        if item.logits.dim() != 2 or item.logits.shape[0] < len(item.token_ids):
            out[i] = ValueError(f"logits {tuple(item.logits.shape)} for {len(item.token_ids)} tokens")
        elif item.token_ids:
            groups.setdefault(min(item.vocab, item.logits.shape[1]), []).append(i)  # row width
    for vocab, members in groups.items():
        rows = [items[i].logits[t, :vocab] for i in members for t in range(len(items[i].token_ids))]
        ids = [t for i in members for t in items[i].token_ids]
        scored = iter(_score_blocks(rows, ids, max(items[i].k for i in members), vocab))
        for i in members:
            k = items[i].k
            out[i] = [TokenLogprob(e.token_id, e.logprob, e.top[:k]) for e in _take(scored, items[i])]
    return out


def _take(scored, item: RowsToScore) -> list[TokenLogprob]:
    return [next(scored) for _ in item.token_ids]


BLOCK_ROWS = 8  # rows scored at once: two [8, 49152] float32 buffers (3 MiB) stay in L2 between the passes


def _score_blocks(rows: list[torch.Tensor], token_ids: list[int], k: int, vocab: int) -> list[TokenLogprob]:
    """score_rows of `rows` ([vocab] each) BLOCK_ROWS at a time, through two reused buffers: each pass
    (copy, max, shift, exp, sum) reads what the last one wrote while it is still in cache, where scoring
    all of a step's rows at once ([64, V]: 12 MiB per temporary) streamed every pass through memory."""
    block = torch.empty((min(BLOCK_ROWS, len(rows)), vocab), dtype=torch.float32)  # [n, vocab]
    scratch = np.empty(tuple(block.shape), dtype=np.float32)
    out: list[TokenLogprob] = []
    for start in range(0, len(rows), BLOCK_ROWS):
        part = rows[start : start + BLOCK_ROWS]
        n = len(part)
        for j, row in enumerate(part):
            block[j].copy_(row.detach())  # widens bf16/fp16 logits to float32
        out += score_rows(
            block[:n].numpy(), token_ids[start : start + n], k, scratch[:n], shift_in_place=True
        )
    return out


def score_rows(
    rows: np.ndarray, token_ids: list[int], k: int, scratch: np.ndarray | None = None, shift_in_place=False
) -> list[TokenLogprob]:
    """rows [T, V] float32 (row t scores token_ids[t]) → one TokenLogprob per row, top k alternatives.
    `scratch` [T, V] float32: a buffer for exp (else one is allocated); `shift_in_place`: rows may be
    overwritten (with rows - max)."""
    n = len(token_ids)
    if n == 0:
        return []
    row_max = rows.max(axis=1, keepdims=True)  # [T, 1]
    shifted = np.subtract(rows, row_max, out=rows if shift_in_place else None)  # [T, V]
    log_norm = np.log(np.exp(shifted, out=scratch).sum(axis=1))  # [T]
    ids = np.asarray(token_ids, dtype=np.int64)
    chosen = (shifted[np.arange(n), ids] - log_norm).tolist()
    if k <= 0:
        return [TokenLogprob(t, c, []) for t, c in zip(token_ids, chosen, strict=True)]
    top_ids = _top_ids(shifted, min(k, shifted.shape[1]))  # [T, k]
    top_lps = (np.take_along_axis(shifted, top_ids, axis=1) - log_norm[:, None]).tolist()
    return [
        TokenLogprob(t, c, list(zip(i, v, strict=True)))
        for t, c, i, v in zip(token_ids, chosen, top_ids.tolist(), top_lps, strict=True)
    ]


def _top_ids(rows: np.ndarray, k: int) -> np.ndarray:
    """[T, k] ids of each row's k largest values, largest first, ties to the lower id."""
    if k == 1:
        return rows.argmax(axis=1)[:, None]  # the first maximum
    part = np.argpartition(rows, -k, axis=1)[:, -k:]  # [T, k] in no order (ties at the k-th value: any)
    kth = np.take_along_axis(rows, part, axis=1).min(axis=1, keepdims=True)  # [T, 1] the k-th value
    out = np.empty((rows.shape[0], k), dtype=np.int64)
    for t in range(rows.shape[0]):
        above = np.flatnonzero(rows[t] > kth[t])  # all of these are in the top k
        tied = np.flatnonzero(rows[t] == kth[t])[: k - above.size]  # the lowest ids among the ties
        ids = np.concatenate([above, tied])
        out[t] = ids[np.lexsort((ids, -rows[t, ids]))]  # by value descending, then id ascending
    return out


def _as_numpy(rows: torch.Tensor) -> np.ndarray:
    """float32 numpy view of logits rows (bf16/fp16 engines' logits widened first)."""
    rows = rows.detach()
    if rows.dtype != torch.float32:
        rows = rows.float()
    return rows.cpu().numpy()
