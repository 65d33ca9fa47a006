"""Which tokens one iteration runs: the decodes of every running sequence and prompt chunks in a token budget.

TensorRT-LLM's micro-batch scheduler (cpp/tensorrt_llm/batch_manager/microBatchScheduler.cpp, 1.2): an
iteration holds at most `max_num_tokens` tokens; each generating request costs one, and context (prompt)
tokens fill the rest in arrival order. Without chunked context a prompt is prefilled whole (the first one of
an iteration even past the budget, so that it cannot starve); with `enable_chunked_context` a prompt is cut
into chunks that fit, in multiples of `tokens_per_block` except its last (the FIRST_COME_FIRST_SERVED
context-chunking policy's unit), and its decodes start once its last chunk has run.
"""

from __future__ import annotations

from trtllm_peft.executor.torch.sequence import Sequence


def plan_iteration(
    running: list[Sequence], max_num_tokens: int, *, chunked: bool, tokens_per_block: int
) -> tuple[list[tuple[Sequence, int]], list[Sequence]]:
    """(prompt chunks as (sequence, tokens), decoding sequences) for this iteration."""
    decoding = [s for s in running if s.cached >= s.prompt_len]
    budget = max_num_tokens - len(decoding)
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
