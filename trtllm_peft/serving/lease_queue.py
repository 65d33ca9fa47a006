"""Fair admission to the host LoRA cache: a bounded FIFO instead of an instant 429.

A request whose adapter is not cached needs room in the host cache, and the room is held by adapters
leased by running requests. Refusing it at once (429) starves cold adapters: while a few hot adapters
keep the cache leased, every retry of a cold one is refused again. Here it queues instead:

* first come, first served among loads: only the head of the queue may load; it picks the cached adapters
  whose room it needs (idle ones first, then the least recently used leased ones) and those get no new
  lease until it is served, so their running requests finish and their room comes free (without that,
  a few busy adapters keep the cache leased forever: the starvation of issue #16). Requests for every
  other cached adapter, or for one being loaded, are served at once, so hot adapters keep their
  throughput;
* bounded: at most TRTLLM_PEFT_LORA_QUEUE_SIZE waiters, each for at most TRTLLM_PEFT_LORA_QUEUE_TIMEOUT
  seconds; past either bound the request gets 429 with Retry-After (0 s restores the instant 429);
* what it grants is exact: a lease of a cached adapter (hit), a reservation of the units a load needs
  (so two loads admitted together cannot overcommit), or a place on a load already running (join).

Event loop only, like HostCache; the cache calls `wake()` whenever room or a lease is freed.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from trtllm_peft.lora import PackedLora
from trtllm_peft.serving.host_cache import HostCache, HostCacheFullError


class Grant(Enum):
    HIT = "hit"  # leased in the cache: `packed` is ready
    LOAD = "load"  # `units` reserved: load the adapter, then put it with the reservation
    JOIN = "join"  # the adapter is being loaded: wait for that load


@dataclass
class Admission:
    grant: Grant
    units: int = 0
    packed: PackedLora | None = None


@dataclass
class _Waiter:
    task_id: int
    units: int
    loading: Callable[[int], bool]
    future: asyncio.Future[Admission]


class LeaseQueue:
    """FIFO of requests waiting for host-cache room."""

    def __init__(self, cache: HostCache, *, max_waiters: int, timeout: float):
        self.cache, self.max_waiters, self.timeout = cache, max_waiters, timeout
        self._waiters: deque[_Waiter] = deque()
        self._victims: set[int] = set()  # cached task ids the head waits for: no new leases
        self._victims_for: _Waiter | None = None
        self.waited = 0  # requests that had to queue (for logs and tests)
        cache.on_free = self.wake

    def __len__(self) -> int:
        return len(self._waiters)

    async def admit(self, task_id: int, units: int, loading: Callable[[int], bool]) -> Admission:
        """An admission for `task_id` (needing `units` if it must be loaded); 429 past the bounds."""
        admission = self._try(task_id, units, loading, may_load=not self._waiters)
        if admission is not None:
            return admission
        if len(self._waiters) >= self.max_waiters or self.timeout <= 0:
            raise self._refusal("the wait queue is full" if self.timeout > 0 else None)
        waiter = _Waiter(task_id, units, loading, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        self.waited += 1
        self.wake()  # a new head picks the adapters it waits for
        try:
            async with asyncio.timeout(self.timeout):
                return await waiter.future
        except BaseException as e:
            if waiter.future.done() and not waiter.future.cancelled():
                self.undo(waiter.future.result(), task_id)  # granted as the timeout or a cancel struck
            if isinstance(e, TimeoutError):
                raise self._refusal(f"waited {self.timeout:g} s (TRTLLM_PEFT_LORA_QUEUE_TIMEOUT)") from None
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
                self.wake()  # the head left: the next one may fit

    def wake(self) -> None:
        """Serve the head if it fits (else name what it waits for), then every waiter that needs no room."""
        while self._waiters:
            head = self._waiters[0]
            if head.future.done():
                self._waiters.popleft()
                continue
            if self._victims_for is not head:
                self._victims_for = head
                self._victims = set()  # computed below, once the head is known not to fit
            admission = self._try(head.task_id, head.units, head.loading, may_load=True)
            if admission is None:
                if not self._victims:
                    self._victims = set(self.cache.drain_candidates(head.units)) - {head.task_id}
                break
            self._waiters.popleft()
            head.future.set_result(admission)
        for waiter in list(self._waiters)[1:]:
            admission = (
                None
                if waiter.future.done()
                else self._try(waiter.task_id, waiter.units, waiter.loading, may_load=False)
            )
            if waiter.future.done() or admission is not None:
                self._waiters.remove(waiter)
            if admission is not None:
                waiter.future.set_result(admission)
        if not self._waiters:
            self._victims, self._victims_for = set(), None

    def undo(self, admission: Admission, task_id: int) -> None:
        """Give back an admission that will not be used."""
        if admission.grant is Grant.HIT:
            self.cache.release(task_id)
        elif admission.grant is Grant.LOAD:
            self.cache.unreserve(admission.units)

    def _try(
        self, task_id: int, units: int, loading: Callable[[int], bool], *, may_load: bool
    ) -> Admission | None:
        if task_id in self.cache:
            if task_id in self._victims or not self.cache.can_lease(task_id):
                return None  # its room is promised to the head, or to a load: wait
            return Admission(Grant.HIT, packed=self.cache.acquire(task_id))
        if loading(task_id):
            return Admission(Grant.JOIN)
        if may_load and self.cache.can_admit(units):
            self.cache.reserve(units)
            return Admission(Grant.LOAD, units=units)
        return None

    def _refusal(self, why: str | None) -> HostCacheFullError:
        error = self.cache.full_error()
        if why:
            error = HostCacheFullError(f"{str(error).removesuffix('; retry later')}; {why}; retry later")
        return error
