"""Which tokens one iteration runs: the decodes of every running sequence and prompt chunks in a token budget.

TensorRT-LLM's micro-batch scheduler (cpp/tensorrt_llm/batch_manager/microBatchScheduler.cpp, 1.2): an
iteration holds at most `max_num_tokens` tokens; each generating request costs one, and context (prompt)
tokens fill the rest in arrival order. Without chunked context a prompt is prefilled whole (the first one of
an iteration even past the budget, so that it cannot starve); with `enable_chunked_context` a prompt is cut
into chunks that fit, in multiples of `tokens_per_block` except its last (the FIRST_COME_FIRST_SERVED
context-chunking policy's unit), and its decodes start once its last chunk has run.

One addition for CPUs (`chunk_tokens_while_decoding`): while sequences decode, the prompt chunks of an
iteration cost at most that many tokens. On a GPU a few hundred extra tokens in a decode step are nearly free
(the step is bound by reading the weights); on a CPU every token costs its share of the matmuls plus its
attention over the cached context, so a `max_num_tokens`-sized chunk makes the running streams wait several
decode steps. A chunk token at context c costs 1 + c / `attention_tokens` (`attention_tokens`: the context
length at which a token's attention costs as much as its matmuls, `attention_tokens()`), so chunks deep into
a long prompt are smaller and every mixed iteration costs about the same. With no decode running a prompt
still gets the whole `max_num_tokens`.
"""

from __future__ import annotations

import math

from trtllm_peft.executor.torch.sequence import Sequence


def plan_iteration(
    running: list[Sequence],
    max_num_tokens: int,
    *,
    chunked: bool,
    tokens_per_block: int,
    chunk_tokens_while_decoding: int | None = None,
    attention_tokens: float = math.inf,
) -> tuple[list[tuple[Sequence, int]], list[Sequence]]:
    """(prompt chunks as (sequence, tokens), decoding sequences) for this iteration."""
    decoding = [s for s in running if s.cached >= s.prompt_len]
    budget = max_num_tokens - len(decoding)
    if chunked and decoding and chunk_tokens_while_decoding is not None:
        return _while_decoding(running, decoding, min(budget, chunk_tokens_while_decoding), attention_tokens)
    chunks: list[tuple[Sequence, int]] = []
    for seq in running:
        left = seq.prompt_len - seq.cached
        if left <= 0:
            continue
        if not chunked:
            if chunks and left > budget:
                break
            n = left
        else:
            n = min(left, budget)
            if n < left and n >= tokens_per_block:
                n -= n % tokens_per_block
            if n <= 0:
                break
        chunks.append((seq, n))
        budget -= n
    return chunks, decoding


def _while_decoding(
    running: list[Sequence], decoding: list[Sequence], budget: float, attention_tokens: float
) -> tuple[list[tuple[Sequence, int]], list[Sequence]]:
    """Chunks whose cost (tokens weighted by their context) fits `budget`; at least one token per iteration
    so that a prompt always progresses."""
    chunks: list[tuple[Sequence, int]] = []
    for seq in running:
        left = seq.prompt_len - seq.cached
        if left <= 0:
            continue
        n = min(left, affordable(budget, seq.cached, attention_tokens))
        if n <= 0 and not chunks:
            n = 1
        if n <= 0:
            break
        chunks.append((seq, n))
        budget -= chunk_cost(n, seq.cached, attention_tokens)
    return chunks, decoding


def chunk_cost(n: int, start: int, attention_tokens: float) -> float:
    """n prompt tokens at positions start..start+n-1, in tokens of matmul work: each also attends over its
    context (start + i + 1 positions), a token of context costing 1/attention_tokens."""
    return n * (1 + (start + (n + 1) / 2) / attention_tokens)


def affordable(budget: float, start: int, attention_tokens: float) -> int:
    """The most tokens from `start` whose chunk_cost fits `budget` (the positive root of the quadratic)."""
    if budget <= 0:
        return 0
    if math.isinf(attention_tokens):
        return int(budget)
    lin = 1 + (start + 0.5) / attention_tokens  # cost = n·lin + n²/(2E)
    n = int(attention_tokens * (math.sqrt(lin * lin + 2 * budget / attention_tokens) - lin) + 1e-9)
    while n > 0 and chunk_cost(n, start, attention_tokens) > budget + 1e-9:
        n -= 1
    return n


def attention_tokens(params_per_layer: int, q_dim: int) -> float:
    """The context length at which one token's attention costs its matmuls, on the CPU kernels: the matmuls
    are 2·P flops per token and layer, attention 4·q_dim per context position (scores and values), and the
    chunk-attention kernel reaches about half the matmuls' flop rate (bench/README.md: ~1,500 for SmolLM2)."""
    return params_per_layer / (4 * q_dim)
