"""executor/errors.classify on the exact texts TensorRT-LLM 1.2 (and the reference engine) put in error_msg."""

from __future__ import annotations

import pytest

from trtllm_peft.executor.api import (
    DEVICE_CACHE_FULL_MESSAGE,
    FETCH_ERROR_PREFIX,
    HOST_CACHE_FULL_MESSAGE,
    NOT_CACHED_MESSAGE,
)
from trtllm_peft.executor.errors import ErrorKind, classify

ASSERT = "[TensorRT-LLM][ERROR] Assertion failed: "


@pytest.mark.parametrize(
    "message, kind",
    [
        # PeftTaskNotCachedException, as is (peftCacheManager.cpp addRequestPeft)
        (NOT_CACHED_MESSAGE.format(task_id=17), ErrorKind.NOT_CACHED),
        # LoraCacheFullException re-thrown by addRequestPeft
        (HOST_CACHE_FULL_MESSAGE.format(task_id=17), ErrorKind.CACHE_FULL),
        # device copy failing in ensureBatch (loraCache.cpp claimPagesWithEvict, wrapped twice)
        (DEVICE_CACHE_FULL_MESSAGE, ErrorKind.CACHE_FULL),
        # 1.2's claimPagesWithEvict evicted every idle task and still lacked pages
        (
            FETCH_ERROR_PREFIX
            + f"Error storing task=17 in PEFT cache -- {ASSERT}pageIds.has_value() (loraCache.cpp:210)",
            ErrorKind.CACHE_FULL,
        ),
        # loraValidateRequestTensors (loraUtils.cpp), wrapped by fetchNewRequests
        (
            FETCH_ERROR_PREFIX + ASSERT + "lora_weights has to few values for attn_q (loraUtils.cpp:110)",
            ErrorKind.INVALID,
        ),
        (
            FETCH_ERROR_PREFIX
            + ASSERT
            + "Invalid low_rank (128). low_rank must be smaller than mMaxLowRank (64)",
            ErrorKind.INVALID,
        ),
        (FETCH_ERROR_PREFIX + ASSERT + "lora module attn_qkv not enabled for this model", ErrorKind.INVALID),
        (
            FETCH_ERROR_PREFIX + ASSERT + "Expected lora weights to be the same data type as base model",
            ErrorKind.INVALID,
        ),
        (
            FETCH_ERROR_PREFIX + ASSERT + "Expected layerId to be in the range [0, numModelLayers)",
            ErrorKind.INVALID,
        ),
        (
            FETCH_ERROR_PREFIX
            + ASSERT
            + "Request for LoRA inference must have both lora_weights and lora_keys",
            ErrorKind.INVALID,
        ),
        # anything else
        ("Encountered an error in forwardAsync function: CUDA out of memory", ErrorKind.FAILED),
        ("", ErrorKind.FAILED),
    ],
)
def test_classify(message, kind):
    assert classify(message) is kind
