"""The PEFT cache alone: rank-unit budgets, least-recently-finished eviction, active tasks pinned, errors."""

from __future__ import annotations

import pytest

from trtllm_peft.executor.torch.peft_cache import (
    CacheTier,
    LoraCacheFullError,
    PeftCache,
    PeftTaskNotCachedError,
)

LAYERS, MODULES = 30, 7


def units(rank: int) -> int:
    """Rank-units of an adapter of `rank` on every module of every layer."""
    return rank * LAYERS * MODULES


def test_budget_of_8_rank64_adapters_runs_32_rank16_in_one_batch():
    """NIM's example: 'if the GPU cache was configured for 8 rank 64 LoRAs, we could run a batch of 32 rank 16'."""
    cache = PeftCache(host_units=16 * units(64), device_units=8 * units(64))
    for task in range(32):
        cache.admit(task, units(16), f"w{task}")
        assert cache.try_load_device(task, lambda v: v)  # all 32 active on the device at once
    assert len(cache.device) == 32 and cache.device.used == cache.device.capacity
    cache.admit(32, units(16), "w32")
    assert not cache.try_load_device(32, lambda v: v)  # a 33rd waits until one of the 32 finishes
    cache.leave_device(5)
    assert cache.try_load_device(32, lambda v: v) and 5 not in cache.device


def test_host_full_of_active_tasks_raises_tensorrt_llms_text():
    cache = PeftCache(host_units=units(64), device_units=units(64))
    cache.admit(1, units(64), "a")
    with pytest.raises(LoraCacheFullError, match=r"^PEFT Cache is full. Could not store taskId=2$"):
        cache.admit(2, units(8), "b")


def test_unknown_task_without_weights_raises_tensorrt_llms_text():
    cache = PeftCache(host_units=units(64), device_units=units(64))
    with pytest.raises(PeftTaskNotCachedError) as e:
        cache.admit(12345)
    assert str(e.value) == "LoRA task 12345 not found in cache. Please send LoRA weights with request"


def test_eviction_is_least_recently_finished_first():
    tier = CacheTier("host", capacity_units=3)
    for t in (1, 2, 3):
        tier.put(t, 1, t)
        tier.acquire(t)
    for t in (2, 3, 1):  # finishing order: 2 first, then 3, then 1
        tier.release(t)
    assert tier.idle_order == [2, 3, 1]
    assert tier.put(4, 2, 4) == [2, 3]
    assert sorted(tier.task_ids) == [1, 4]


@pytest.mark.parametrize("busy", [[1], [1, 2], [1, 2, 3]])
def test_an_active_task_is_never_evicted(busy):
    tier = CacheTier("device", capacity_units=3)
    for t in (1, 2, 3):
        tier.put(t, 1, t)
    for t in busy:
        tier.acquire(t)
    free = 3 - len(busy)
    if free:
        evicted = tier.put(9, free, 9)
        tier.acquire(9)
        assert not set(evicted) & set(busy)
    with pytest.raises(LoraCacheFullError):
        tier.put(10, 1, 10)
    assert all(t in tier for t in busy)


def test_weights_for_a_held_task_are_ignored():
    cache = PeftCache(host_units=100, device_units=100)
    cache.admit(7, 10, "first")
    cache.admit(7, 50, "second")
    assert cache.host.get(7) == "first" and cache.host.used == 10 and cache.host.refs(7) == 2


def test_device_tier_makes_requests_wait_and_reports_impossible_tasks():
    cache = PeftCache(host_units=100, device_units=10)
    cache.admit(1, 8, "a")
    cache.admit(2, 8, "b")
    cache.admit(3, 11, "c")
    assert cache.try_load_device(1, str.upper)
    assert not cache.try_load_device(2, str.upper)  # task 1 is running: task 2 waits
    cache.leave_device(1)
    assert cache.try_load_device(2, str.upper) and cache.device.get(2) == "B" and 1 not in cache.device
    assert not cache.device_fits_ever(3)


def test_churn_of_many_tasks_through_a_small_budget_keeps_values_right():
    cache = PeftCache(host_units=20, device_units=10)
    for task in range(200):
        size = 1 + task % 7
        cache.admit(task, size, f"v{task}")
        assert cache.try_load_device(task, lambda v: v)
        assert cache.device.get(task) == f"v{task}" and cache.host.get(task) == f"v{task}"
        cache.leave_device(task)
        cache.finish(task)
        assert cache.host.used <= 20 and cache.device.used <= 10
    assert len(cache.host.evictions) > 150
