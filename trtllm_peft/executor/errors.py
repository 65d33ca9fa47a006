"""What an executor's error text means for the caller: resend with weights, retry later, or fail.

Both executors report failures as `Response.error_msg` strings (TensorRT-LLM has no error codes for
these); the texts are TensorRT-LLM's (api.py holds them), so one classifier serves both.
"""

from __future__ import annotations

import enum


class ErrorKind(enum.Enum):
    NOT_CACHED = "not_cached"  # the engine lacks the task: resend once with weights
    CACHE_FULL = "cache_full"  # every page is held by active requests: retry later (429)
    INVALID = "invalid"  # the request itself is wrong (bad LoRA tensors, bad parameters): 400
    FAILED = "failed"  # anything else: 500


_PATTERNS: list[tuple[ErrorKind, tuple[str, ...]]] = [
    (ErrorKind.NOT_CACHED, ("not found in cache",)),
    # "Error storing task=<id> in PEFT cache -- …": 1.2's LoraCache::claimPagesWithEvict evicts every idle
    # task and still lacks pages (its TLLM_CHECK(pageIds.has_value()) fails): the cache is full of active ones.
    (
        ErrorKind.CACHE_FULL,
        ("Cache is full", "Could not store taskId", "no done tasks to evict", "Error storing task="),
    ),
    (
        ErrorKind.INVALID,
        (
            "lora_weights has to few values",
            "Invalid low_rank",
            "not enabled for this model",
            "Expected lora weights to be the same data type",
            "Expected batch dimension to be 1",
            "Expected dim1 lora_weights and lora_keys",
            "Expected dim2 of lora_keys",
            "Expected layerId to be in the range",
            "Expected adapterSize to be > 0",
            "must have both lora_weights and lora_keys",
            "Invalid shape for lora_",
            "lora keys to have TYPE_INT32",
            "need to build engine with gather_context_logits",  # executorImpl.cpp fetchNewRequests
            "gather_generation_logits must be enabled",
            "embedding bias shape",
            "embedding_bias must",
            "bad_words token ids must be",
            "input token ids must be in",
            "Guided decoding: ",
        ),
    ),
]


def classify(error_msg: str) -> ErrorKind:
    """Kind of an executor error message."""
    for kind, needles in _PATTERNS:
        if any(n in error_msg for n in needles):
            return kind
    return ErrorKind.FAILED
