"""OpenAI log-probs from the engine's raw logits (executor Result.context_logits / generation_logits).

Values are log-softmax of the model's logits over the model's vocabulary (padding columns a TensorRT-LLM
engine may add are cut off first), before logit_bias, bad words, penalties, temperature and top-k/top-p:
what the model says, whatever the request does with it — vLLM's default (`logprobs_mode=raw_logprobs`),
and the same on both executors because it is computed here, above them. The sampled token's entry is
always present; `top` holds the k most likely tokens (ties broken by torch.topk).
"""

from __future__ import annotations

from dataclasses import dataclass

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
    rows = logits[: len(token_ids), :vocab].float()
    if rows.shape[0] < len(token_ids):
        raise ValueError(f"{rows.shape[0]} logits rows for {len(token_ids)} tokens")
    lp = torch.log_softmax(rows, dim=-1)  # [T, V]
    ids = torch.tensor(token_ids, dtype=torch.long)
    chosen = lp.gather(1, ids[:, None])[:, 0].tolist()
    if k > 0:
        values, indices = torch.topk(lp, min(k, lp.shape[-1]), dim=-1)  # [T, k]
        tops = [list(zip(i, v, strict=True)) for i, v in zip(indices.tolist(), values.tolist(), strict=True)]
    else:
        tops = [[] for _ in token_ids]
    return [TokenLogprob(t, c, top) for t, c, top in zip(token_ids, chosen, tops, strict=True)]


def prompt_logprobs(
    context_logits: torch.Tensor, prompt_ids: list[int], k: int, vocab: int
) -> list[TokenLogprob | None]:
    """Log-probs of the prompt's tokens from context logits [P, V] (row i predicts token i + 1); the first
    token has none (None), as OpenAI's `echo` answers."""
    return [None, *token_logprobs(context_logits[: len(prompt_ids) - 1], prompt_ids[1:], k, vocab)]
