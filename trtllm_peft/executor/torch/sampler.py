"""Token selection for one step of a batch: greedy, temperature, top-k, top-p, seed, penalties, log-probs.

An all-greedy batch without penalties (the common case) is one argmax over [B, V]. Rows that sample or
penalise are handled per row, each with its own seeded generator (TensorRT-LLM seeds 0 by default, so
sampling is reproducible unless a seed is given). Log-probs are log-softmax of the processed logits
(after penalties and temperature) at the chosen token, before top-k/top-p truncation.
Penalties follow TensorRT-LLM's batchApplyPenalty: repetition (divide positive / multiply negative logits)
and presence/frequency (subtract) over every token of the sequence so far, prompt included.
Before all of that, a request's embedding_bias [V] is added and its bad words are banned (-inf), as
TensorRT-LLM's embedding-bias and banBadWords steps do (over the whole sequence, prompt included).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from trtllm_peft.executor.api import SamplingConfig


@dataclass
class SamplingState:
    """Per-request sampling settings and RNG."""

    config: SamplingConfig
    end_id: int | None = None
    min_tokens: int = 0
    bias: torch.Tensor | None = field(default=None, repr=False)  # [V] float32, on the engine's device
    bad_words: list[list[int]] = field(default_factory=list)
    generator: torch.Generator | None = field(default=None, repr=False)

    @property
    def penalised(self) -> bool:
        c = self.config
        return (
            c.repetition_penalty not in (None, 1.0) or bool(c.presence_penalty) or bool(c.frequency_penalty)
        )

    @property
    def plain_greedy(self) -> bool:
        return self.config.is_greedy and not self.penalised and self.min_tokens == 0


def new_state(
    config: SamplingConfig,
    end_id: int | None,
    device,
    bias: torch.Tensor | None = None,
    bad_words: list[list[int]] | None = None,
) -> SamplingState:
    state = SamplingState(
        config=config,
        end_id=end_id,
        min_tokens=config.min_tokens or 0,
        bias=None if bias is None else bias.to(device=device, dtype=torch.float32),
        bad_words=[list(w) for w in bad_words or [] if w],
    )
    if not config.is_greedy:
        state.generator = torch.Generator(device=device).manual_seed(int(config.seed or 0))
    return state


def _penalise(logits: torch.Tensor, tokens: torch.Tensor, c: SamplingConfig) -> torch.Tensor:
    """logits [V] (a copy) with the penalties of `c` for the sequence `tokens` [n]."""
    if c.repetition_penalty not in (None, 1.0):
        seen = logits[tokens]
        logits[tokens] = torch.where(seen > 0, seen / c.repetition_penalty, seen * c.repetition_penalty)
    if c.presence_penalty or c.frequency_penalty:
        counts = torch.bincount(tokens, minlength=logits.shape[0]).to(logits.dtype)
        logits -= (counts > 0).to(logits.dtype) * (c.presence_penalty or 0.0) + counts * (
            c.frequency_penalty or 0.0
        )
    return logits


def _banned(history: list[int], bad_words: list[list[int]]) -> list[int]:
    """Tokens a bad word forbids next: its last token, where the sequence ends with the rest of it."""
    return [w[-1] for w in bad_words if len(w) == 1 or history[-(len(w) - 1) :] == w[:-1]]


def _constrain(logits: torch.Tensor, states: list[SamplingState], histories: list[list[int]]) -> torch.Tensor:
    """logits [B, V] with each row's embedding bias added and its bad words banned (a copy when changed)."""
    if not any(s.bias is not None or s.bad_words for s in states):
        return logits
    logits = logits.clone()
    for i, s in enumerate(states):
        if s.bias is not None:
            logits[i] += s.bias
        banned = _banned(histories[i], s.bad_words) if s.bad_words else []
        if banned:
            logits[i, banned] = float("-inf")
    return logits


def _truncate(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask logits [V] outside the top-k and the top-p nucleus with -inf."""
    if top_k and top_k < logits.shape[0]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def _one(
    logits: torch.Tensor, state: SamplingState, history: torch.Tensor, n_generated: int
) -> tuple[int, float]:
    c = state.config
    logits = logits.clone()
    if state.penalised:
        logits = _penalise(logits, history, c)
    if state.end_id is not None and n_generated < state.min_tokens:
        logits[state.end_id] = float("-inf")
    if c.is_greedy:
        token = int(torch.argmax(logits))
        return token, float(torch.log_softmax(logits, -1)[token])
    logits = logits / (c.temperature or 1.0)
    logprobs = torch.log_softmax(logits, -1)
    kept = _truncate(logits, c.top_k or 0, c.top_p or 0.0)
    token = int(torch.multinomial(kept.softmax(-1), 1, generator=state.generator))
    return token, float(logprobs[token])


def greedy_argmax(logits: torch.Tensor) -> torch.Tensor:
    """torch.argmax(logits, -1) (the first maximum, NaN included) as max().indices: ~4x faster on [32, 49152]."""
    return logits.max(dim=-1).indices


def sample(
    logits: torch.Tensor,
    states: list[SamplingState],
    histories: list[list[int]],
    n_generated: list[int],
    want_logprobs: bool,
    argmax=None,
) -> tuple[list[int], list[float] | None]:
    """Next token per row of logits [B, V] (float32); log-probs when `want_logprobs`. `argmax`: the
    all-greedy batch's row-wise argmax (ops.argmax: the CPU kernels' where they run), default torch's."""
    logits = _constrain(logits, states, histories)
    if all(s.plain_greedy for s in states):
        tokens = (argmax or greedy_argmax)(logits)
        lps = None
        if want_logprobs:
            lps = torch.log_softmax(logits, -1).gather(1, tokens[:, None])[:, 0].tolist()
        return tokens.tolist(), lps
    out, lps = [], []
    for i, s in enumerate(states):
        hist = torch.tensor(histories[i], dtype=torch.long, device=logits.device)
        tok, lp = _one(logits[i], s, hist, n_generated[i])
        out.append(tok)
        lps.append(lp)
    return out, (lps if want_logprobs else None)
