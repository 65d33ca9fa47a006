"""The stand-in's PEFT cache (tests/trtllm_standin/peft.py) keeps TensorRT-LLM 1.2's rules: the validation
texts of loraUtils.cpp, the page geometry of loraCache.cpp, and peftCacheManager.cpp's not-cached / cache-full
/ eviction behaviour that TrtllmExecutor's callers depend on."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import random_lora
from tests.trtllm_standin import configs as tc
from tests.trtllm_standin import types as tt
from tests.trtllm_standin.peft import (
    LoraCacheFullError,
    PeftCacheManager,
    PeftTaskNotCachedError,
    cache_pages,
    validate_request_tensors,
)
from trtllm_peft.executor.errors import ErrorKind, classify
from trtllm_peft.lora import pack


@pytest.fixture
def spec8(tiny_spec):
    return tiny_spec.with_limits(max_lora_rank=8)


def rows(spec, rank, **kw):
    p = pack(random_lora(spec, rank, **kw), spec.torch_dtype)
    return p.weights, p.config


def _edit(config, row, col, value):
    c = config.clone()
    c[row, col] = value
    return c


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda w, c: (w, _edit(c, 0, 1, 3)), r"Expected layerId to be in the range \[0, numModelLayers\)"),
        (lambda w, c: (w, _edit(c, 0, 2, 0)), "Expected adapterSize to be > 0"),
        (lambda w, c: (w, _edit(c, 0, 0, 0)), "lora module attn_qkv not enabled for this model"),
        (lambda w, c: (w, _edit(c, 0, 0, 42)), "lora module INVALID not enabled for this model"),
        (lambda w, c: (w[:, :10].contiguous(), c), "lora_weights has to few values for attn_q"),
        (lambda w, c: (torch.zeros(w.shape[0], 16 * 200), _edit(c, 0, 2, 16)), r"Invalid low_rank \(16\)"),
        (lambda w, c: (w.half(), c), "Expected lora weights to be the same data type as base model"),
        (
            lambda w, c: (w, torch.zeros(c.shape[0], 5, dtype=torch.int32)),
            r"dim2 of lora_keys to have a size in \[3, 4\]",
        ),
        (lambda w, c: (None, c), "must have both lora_weights and lora_keys"),
    ],
)
def test_validation_texts_of_loraUtils_cpp(spec8, change, message):
    w, c = change(*rows(spec8, 4))
    with pytest.raises(tt.TllmError, match=message):
        validate_request_tensors(spec8, 1, None if w is None else w[None], c[None])


def test_three_column_config_is_accepted(spec8):
    w, c = rows(spec8, 4)
    validate_request_tensors(spec8, 1, w[None], c[:, :3].contiguous()[None])


def small_cache(spec8, host_units=216, device_units=216):
    """optimal 4, max 8 on the tiny model: a page is 144 slots; rank 4 takes 1 page, rank 8 takes 2; 216 units
    = 432 slots = 3 pages (hand-computed in the test below)."""
    cfg = tc.PeftCacheConfig(
        num_host_module_layer=host_units,
        num_device_module_layer=device_units,
        optimal_adapter_size=4,
        max_adapter_size=8,
    )
    return PeftCacheManager(spec8, cfg)


def test_small_cache_geometry(spec8):
    m = small_cache(spec8)
    assert (m.host.geometry.slots_per_page, m.host.num_pages, m.device.num_pages) == (144, 3, 3)
    assert m.host.pages_for(rows(spec8, 4)[1]) == 1 and m.host.pages_for(rows(spec8, 8)[1]) == 2
    with pytest.raises(
        tt.TllmError, match="Not enough space allocated to host LoRA cache to hold 1 max sized LoRA 230 < 232"
    ):
        cache_pages(
            spec8,
            tc.PeftCacheConfig(
                num_host_module_layer=115,
                num_device_module_layer=216,
                optimal_adapter_size=4,
                max_adapter_size=8,
            ),
        )


def test_not_cached_then_cached_then_weights_ignored(spec8):
    m = small_cache(spec8)
    with pytest.raises(
        PeftTaskNotCachedError,
        match="^LoRA task 5 not found in cache. Please send LoRA weights with request$",
    ):
        m.add_request(1, 5, None, None)
    first = rows(spec8, 4, seed=1)
    m.add_request(2, 5, *first)
    m.add_request(3, 5, None, None)  # held: a task id alone is enough
    m.add_request(4, 5, *rows(spec8, 4, seed=2))  # same id, other weights: ignored (same id = same content)
    assert m.host.values[5][0] is first[0]


def test_cache_full_only_when_nothing_is_done(spec8):
    m = small_cache(spec8)
    m.add_request(1, 10, *rows(spec8, 8))  # 2 pages, in progress
    m.add_request(2, 11, *rows(spec8, 4))  # 1 page, in progress: full
    with pytest.raises(LoraCacheFullError, match="^PEFT Cache is full. Could not store taskId=12$"):
        m.add_request(3, 12, *rows(spec8, 4))
    m.mark_request_done(2, 11)  # least recently done goes first
    m.add_request(4, 12, *rows(spec8, 4))
    assert m.host.evicted == [11] and not m.is_task_cached(11) and m.is_task_cached(10)


def test_partial_eviction_quirk_of_claim_pages_with_evict(spec8):
    """Done tasks exist but free too little: 1.2 evicts them, then fails TLLM_CHECK(pageIds.has_value())."""
    m = small_cache(spec8)
    m.add_request(1, 20, *rows(spec8, 4))
    m.add_request(2, 21, *rows(spec8, 8))
    m.mark_request_done(1, 20)
    with pytest.raises(
        tt.TllmError, match=r"^Error storing task=22 in PEFT cache -- .*pageIds.has_value\(\)"
    ) as e:
        m.add_request(3, 22, *rows(spec8, 8))
    assert m.host.evicted == [20] and classify(
        "Encountered an error when fetching new request: " + str(e.value)
    ) in (ErrorKind.CACHE_FULL, ErrorKind.FAILED)


def test_device_pages_gate_scheduling(spec8):
    m = small_cache(spec8, host_units=1000, device_units=216)
    m.add_request(1, 30, *rows(spec8, 8))
    m.add_request(2, 31, *rows(spec8, 8))
    assert m.device_can_hold(30)
    m.ensure_on_device(30)
    assert not m.device_can_hold(31)  # 2 + 2 pages > 3: the request waits
    m.mark_request_done(1, 30)
    assert m.device_can_hold(31)  # the done task is evictable
    m.ensure_on_device(31)
    assert m.device.evicted == [30]
