"""Adapters leased from the host cache for requests: a hit, or one shared load of a cold adapter.

A cold adapter is loaded once off the event loop (a worker thread: read, validate, pack), however many
requests wait for it, and inserted with one lease per waiter; requests that find the host cache full of
adapters in use wait their turn in a bounded FIFO (serving/lease_queue.py). 429 only past the queue's
bounds, and before anything is read, so a retry after a 429 does not cost a load.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from trtllm_peft import formats
from trtllm_peft.errors import AdapterError, TrtllmPeftError
from trtllm_peft.lora import ModelSpec, PackedLora, pack
from trtllm_peft.serving.catalog import AdapterEntry, Catalog
from trtllm_peft.serving.host_cache import HostCache
from trtllm_peft.serving.lease_queue import Grant, LeaseQueue

log = logging.getLogger(__name__)

UNITS_REMEMBERED = 100_000  # a few MB at most: ints per task id


class AdapterUnavailableError(TrtllmPeftError):
    """The adapter exists on disk but cannot be served (it failed to load or to validate)."""

    http_status = 422


@dataclass
class _Load:
    """One adapter being loaded, and how many requests wait for it (each gets a lease when it lands)."""

    future: asyncio.Future[PackedLora]
    waiters: int = 0
    task: asyncio.Future | None = None


class AdapterLeases:
    """`lease(entry)`: the adapter's packed tensors, with one host-cache lease held for the caller."""

    def __init__(
        self,
        *,
        spec: ModelSpec,
        catalog: Catalog,
        host_cache: HostCache,
        on_load: Callable[[float], None] | None = None,
        loaders: int = 2,
        base_weights: Callable[[int, str], torch.Tensor] | None = None,
        queue_timeout: float = 0.0,
        queue_size: int = 0,
    ):
        self.spec, self.catalog, self.host_cache = spec, catalog, host_cache
        self.base_weights = base_weights  # W per (layer, module): DoRA's norms, once per adapter load
        self._pool = ThreadPoolExecutor(max_workers=loaders, thread_name_prefix="adapter-load")
        self._loading: dict[int, _Load] = {}
        self.queue = LeaseQueue(host_cache, max_waiters=queue_size, timeout=queue_timeout)
        self._max_units = spec.cache_units(1)  # an adapter not loaded yet may need up to this much
        self._units: dict[int, int] = {}  # task id -> rank-units, learnt at its first load
        self._on_load = on_load

    async def lease(self, entry: AdapterEntry) -> PackedLora:
        """The adapter's packed tensors, leased for this request: a host-cache hit or one shared load.

        Admission is first come, first served (LeaseQueue): 429 only past the queue's bounds, and before
        anything is read, so a retry after a 429 does not cost a load.
        """
        task_id = entry.task_id
        units = self._units.get(task_id) or self._max_units
        while True:
            admission = await self.queue.admit(task_id, units, self._loading.__contains__)
            if admission.grant is Grant.HIT:
                return admission.packed
            if admission.grant is Grant.LOAD:
                self._start_load(entry, admission.units)
            load = self._loading.get(task_id)
            if load is not None:
                return await self._await_load(entry, load)
            # the load this request was to join finished meanwhile: ask again (now a hit, most likely)

    def _start_load(self, entry: AdapterEntry, reserved: int) -> None:
        load = _Load(asyncio.get_running_loop().create_future())
        # mark a failure retrieved even when no waiter is left to see it (asyncio would log it as an error)
        load.future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._loading[entry.task_id] = load
        load.task = asyncio.ensure_future(self._load_and_put(entry, load, reserved))

    async def _load_and_put(self, entry: AdapterEntry, load: _Load, reserved: int) -> None:
        """Load in a worker thread, then insert with one lease per request still waiting for it."""
        try:
            try:
                packed = await asyncio.get_running_loop().run_in_executor(self._pool, self._load, entry)
            except BaseException:
                self.host_cache.unreserve(reserved)
                raise
            self._remember_units(entry.task_id, packed.rank_units)
            evicted = self.host_cache.put(entry.task_id, packed, reserved=reserved, leases=load.waiters)
            if evicted:
                log.debug("host cache evicted tasks %s for %r", evicted, entry.name)
            load.future.set_result(packed)
        except BaseException as e:  # every waiter gets the error (AdapterError, AdapterTooLargeError, ...)
            load.future.set_exception(e if isinstance(e, Exception) else asyncio.CancelledError())
        finally:
            self._loading.pop(entry.task_id, None)

    async def _await_load(self, entry: AdapterEntry, load: _Load) -> PackedLora:
        """Wait for the adapter's load; on success this request holds one lease (counted in `put`)."""
        load.waiters += 1
        try:
            return await asyncio.shield(load.future)
        except AdapterError as e:
            self.catalog.mark_invalid(entry, "; ".join(e.problems))
            raise AdapterUnavailableError(f"adapter '{entry.name}' cannot be served: {e}") from None
        except asyncio.CancelledError:
            f = load.future
            if f.done() and not f.cancelled() and f.exception() is None:
                self.host_cache.release(entry.task_id)  # inserted with our lease: give it back
            else:
                load.waiters -= 1
            raise

    def _remember_units(self, task_id: int, units: int) -> None:
        self._units[task_id] = units
        if len(self._units) > UNITS_REMEMBERED:
            del self._units[next(iter(self._units))]  # oldest first (dicts keep insertion order)

    def _load(self, entry: AdapterEntry) -> PackedLora:
        """Read, validate and pack one adapter (in a worker thread)."""
        start = time.perf_counter()
        adapter = formats.load_for_engine(entry.path, self.spec, self.base_weights)
        packed = pack(adapter, self.spec.dtype)
        elapsed = time.perf_counter() - start
        log.info(
            "adapter %r loaded (%s, %d rows, max rank %d) in %.3f s",
            entry.name,
            entry.format,
            packed.num_rows,
            adapter.max_rank,
            elapsed,
        )
        if self._on_load:
            self._on_load(elapsed)
        return packed

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
