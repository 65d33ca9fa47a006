"""Host PEFT cache: rank-unit budget (NIM's rank example), LRU order, leases never evicted, 429 when full."""

from __future__ import annotations

import pytest
import torch

from trtllm_peft.lora import ModelSpec, PackedLora
from trtllm_peft.serving.host_cache import AdapterTooLargeError, HostCache, HostCacheFullError

SPEC = ModelSpec(
    num_layers=32,
    hidden_size=4096,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    intermediate_size=14336,
    max_lora_rank=64,
)


def packed(rank: int, modules: int = 7, layers: int = 32) -> PackedLora:
    n = modules * layers
    config = torch.zeros((n, 4), dtype=torch.int32)
    config[:, 2] = rank
    return PackedLora(weights=torch.zeros((n, 1)), config=config)


def test_nim_rank_example_8_rank64_budget_holds_32_rank16():
    cache = HostCache(SPEC.cache_units(8))
    for task in range(32):
        assert cache.put(task, packed(16)) == []
    assert len(cache) == 32 and cache.used_units == cache.capacity_units
    with pytest.raises(HostCacheFullError, match="retry later"):
        cache.put(99, packed(16))  # all 32 leased
    assert 99 not in cache and len(cache) == 32  # a refused put changes nothing


def test_least_recently_released_is_evicted_first_and_leased_never():
    cache = HostCache(SPEC.cache_units(3))
    for task in (1, 2, 3):
        cache.put(task, packed(64))
    cache.release(2)
    cache.release(1)  # 2 finished first, then 1; 3 still active
    assert cache.put(4, packed(64)) == [2]
    cache.release(4)
    assert cache.acquire(1) is not None  # 1 used again: now 4 is the oldest idle one
    assert cache.put(5, packed(64)) == [4]
    assert 3 in cache and 1 in cache and 5 in cache


def test_several_small_ones_make_room_for_a_big_one():
    cache = HostCache(SPEC.cache_units(1))
    for task in range(4):
        cache.put(task, packed(16))
        cache.release(task)
    assert cache.put(10, packed(64)) == [0, 1, 2, 3] and cache.used_units == cache.capacity_units


def test_too_large_is_its_own_error():
    with pytest.raises(AdapterTooLargeError, match="NIM_MAX_CPU_LORAS"):
        HostCache(SPEC.cache_units(1)).put(1, packed(128))


def test_hits_misses_leases_and_discard():
    cache = HostCache(SPEC.cache_units(2))
    assert cache.acquire(7) is None and cache.misses == 1
    p = packed(8)
    cache.put(7, p)
    assert cache.acquire(7) is p and cache.hits == 1
    assert not cache.discard(7)  # leased twice
    cache.release(7)
    cache.release(7)
    with pytest.raises(KeyError):
        cache.release(7)
    assert cache.discard(7) and 7 not in cache and cache.used_units == 0


def test_can_admit_counts_free_and_idle_units_but_not_leased():
    cache = HostCache(SPEC.cache_units(2))
    cache.put(1, packed(64))
    assert cache.can_admit(packed(64).rank_units) and not cache.can_admit(packed(64).rank_units + 1)
    cache.put(2, packed(64))
    assert not cache.can_admit(1)  # both leased: nothing can be made room for
    cache.release(1)
    assert cache.can_admit(packed(64).rank_units)  # 1 is idle, evictable
    assert "retry later" in str(cache.full_error())
