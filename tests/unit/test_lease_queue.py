"""Fair admission to the host cache (issue #16, finding 8): a bounded FIFO instead of an instant 429."""

from __future__ import annotations

import asyncio

import pytest

from tests.unit.test_host_cache import SPEC, packed
from trtllm_peft.serving.host_cache import HostCache, HostCacheFullError
from trtllm_peft.serving.lease_queue import Grant, LeaseQueue

ONE = SPEC.cache_units(1)  # units of one max-rank adapter


def _never_loading(_task_id: int) -> bool:
    return False


def _queue(adapters: int, *, size: int = 8, timeout: float = 5.0) -> tuple[HostCache, LeaseQueue]:
    cache = HostCache(SPEC.cache_units(adapters))
    return cache, LeaseQueue(cache, max_waiters=size, timeout=timeout)


def test_free_room_is_granted_at_once_as_a_reservation():
    async def run():
        cache, q = _queue(2)
        a = await q.admit(1, ONE, _never_loading)
        assert a.grant is Grant.LOAD and cache.reserved_units == ONE and not cache.can_admit(2 * ONE)
        cache.put(1, packed(64), reserved=ONE)
        assert cache.reserved_units == 0 and (await q.admit(1, ONE, _never_loading)).grant is Grant.HIT

    asyncio.run(run())


def test_a_cold_adapter_waits_for_a_lease_to_end_instead_of_429():
    async def run():
        cache, q = _queue(1)
        cache.put(1, packed(64))  # leased by a running request
        waiter = asyncio.create_task(q.admit(2, ONE, _never_loading))
        await asyncio.sleep(0.05)
        assert not waiter.done() and len(q) == 1
        cache.release(1)  # the running request ends: its adapter is idle, hence evictable
        admission = await waiter
        assert admission.grant is Grant.LOAD and cache.reserved_units == ONE

    asyncio.run(run())


def test_the_adapter_the_head_waits_for_gets_no_new_lease():
    """While a cold request waits for adapter 1's room, a new request for 1 queues behind it: otherwise
    1's leases never end and the cold one starves (the issue's finding 8)."""

    async def run():
        cache, q = _queue(1)
        cache.put(1, packed(64))
        cold = asyncio.create_task(q.admit(2, ONE, _never_loading))
        await asyncio.sleep(0.01)
        hot = asyncio.create_task(q.admit(1, ONE, _never_loading))
        await asyncio.sleep(0.01)
        assert not hot.done() and not cold.done()
        cache.release(1)
        assert (await cold).grant is Grant.LOAD
        await asyncio.sleep(0.01)
        assert not hot.done()  # adapter 1's room is promised to 2's load: hot waits its turn
        cache.put(2, packed(64), reserved=ONE)  # 2 lands (evicting idle 1), runs, and ends
        cache.release(2)
        assert (await hot).grant is Grant.LOAD  # now 1 is loaded again, in its turn

    asyncio.run(run())


ROWS = [
    # (id, queue size, timeout, phrase)
    ("timeout", 8, 0.1, "waited 0.1 s"),
    ("queue-full", 0, 5.0, "wait queue is full"),
    ("no-queue", 8, 0.0, "retry later"),
]


@pytest.mark.parametrize("size,timeout,phrase", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_429_only_past_the_bounds(size, timeout, phrase):
    async def run():
        cache, q = _queue(1, size=size, timeout=timeout)
        cache.put(1, packed(64))
        with pytest.raises(HostCacheFullError, match=phrase) as e:
            await q.admit(2, ONE, _never_loading)
        assert e.value.http_status == 429 and "retry later" in str(e.value)
        assert len(q) == 0 and cache.reserved_units == 0

    asyncio.run(run())


def test_a_cancelled_waiter_leaves_nothing_behind():
    async def run():
        cache, q = _queue(1)
        cache.put(1, packed(64))
        waiter = asyncio.create_task(q.admit(2, ONE, _never_loading))
        await asyncio.sleep(0.01)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert len(q) == 0
        cache.release(1)
        assert cache.reserved_units == 0 and cache.can_admit(ONE)

    asyncio.run(run())


def test_joining_a_running_load_needs_no_room():
    async def run():
        cache, q = _queue(1)
        cache.put(1, packed(64))
        a = await q.admit(2, ONE, lambda task: task == 2)
        return a.grant

    assert asyncio.run(run()) is Grant.JOIN


def test_failed_put_gives_the_reservation_back():
    cache = HostCache(SPEC.cache_units(1))
    freed = []
    cache.on_free = lambda: freed.append(cache.reserved_units)
    cache.reserve(ONE)
    cache.put(1, packed(32), reserved=ONE)
    assert cache.reserved_units == 0 and freed == [0] and cache.used_units == ONE // 2


def test_hot_adapters_the_head_does_not_need_keep_serving():
    async def run():
        cache, q = _queue(2)
        cache.put(1, packed(64))
        cache.put(3, packed(64))  # both leased; 1 is the least recently used
        cold = asyncio.create_task(q.admit(2, ONE, _never_loading))
        await asyncio.sleep(0.01)
        assert not cold.done()
        hot3 = await asyncio.wait_for(q.admit(3, ONE, _never_loading), 1)  # served at once
        assert hot3.grant is Grant.HIT
        hot1 = asyncio.create_task(q.admit(1, ONE, _never_loading))
        await asyncio.sleep(0.01)
        assert not hot1.done()  # 1's room is what the cold request waits for
        cache.release(1)
        assert (await cold).grant is Grant.LOAD and not hot1.done()
        cache.put(2, packed(64), reserved=ONE)
        cache.release(2)
        assert (await hot1).grant is Grant.LOAD  # 1 was evicted for 2: it loads again, in its turn

    asyncio.run(run())
