"""Adapters leased from the host cache for requests: a hit, or one shared load of a cold adapter.

A cold adapter is loaded once off the event loop (a worker thread: read, validate, pack; or, when this
process has packed it before, or packed ahead at start, mapped back from its packed file:
serving/packed_store.py), however many requests wait for it, and inserted with one lease per waiter; requests that find the host cache full of
adapters in use wait their turn in a bounded FIFO (serving/lease_queue.py). 429 only past the queue's
bounds, and before anything is read, so a retry after a 429 does not cost a load.
"""

from __future__ import annotations

import asyncio
import logging
import threading
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
from trtllm_peft.serving.packed_store import PackedStore

log = logging.getLogger(__name__)

UNITS_REMEMBERED = 100_000  # a few MB at most: ints per task id
PREPACK_S = 30.0  # packing ahead delays readiness by at most about this much; the rest loads on first use


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
        store: PackedStore | None = None,
    ):
        self.spec, self.catalog, self.host_cache = spec, catalog, host_cache
        self.store = store  # packed adapters on disk: a miss of an adapter packed before maps it back
        self.base_weights = base_weights  # W per (layer, module): DoRA's norms, once per adapter load
        self._pool = ThreadPoolExecutor(max_workers=loaders, thread_name_prefix="adapter-load")
        self._loaders = loaders
        self._loading: dict[int, _Load] = {}
        self.queue = LeaseQueue(host_cache, max_waiters=queue_size, timeout=queue_timeout)
        self._max_units = spec.cache_units(1)  # an adapter not loaded yet may need up to this much
        self._units: dict[int, int] = {}  # task id -> rank-units, learnt at its first load
        self._prepack_lock = threading.Lock()  # packing ahead: "does it fit" and its put as one step
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
        """Read, validate and pack one adapter, or map back its packed file (in a worker thread)."""
        start = time.perf_counter()
        packed = self.store.get(entry.task_id) if self.store else None
        source = "packed file" if packed is not None else entry.format
        if packed is None:
            packed = pack(formats.load_for_engine(entry.path, self.spec, self.base_weights), self.spec.dtype)
            if self.store:
                packed = self.store.put(entry.task_id, packed)
        elapsed = time.perf_counter() - start
        log.info(
            "adapter %r loaded (%s, %d rows, max rank %d) in %.3f s",
            entry.name,
            source,
            packed.num_rows,
            int(packed.config[:, 2].max()) if packed.num_rows else 0,
            elapsed,
        )
        if self._on_load:
            self._on_load(elapsed)
        return packed

    async def prepack(self, entries: list[AdapterEntry]) -> int:
        """Read, validate and pack adapters into the store before any request asks for them (at start), each
        that fits beside those packed before it (none evicted for another), in catalog order, on the loader threads: a first request then maps its adapter
        back instead of paying the load on the engine's cores. One that fails is marked invalid, as on a
        first use. Returns how many were packed."""
        if self.store is None:
            return 0
        # a catalog of many broken adapters must not hold the start up: tries are bounded too
        tries = 4 * (self.store.capacity_units // self._max_units + 1)
        todo, packed = iter(entries[:tries]), 0
        loop, started = asyncio.get_running_loop(), time.perf_counter()

        async def lane() -> None:
            nonlocal packed
            for entry in todo:
                if self.store.used_units >= self.store.capacity_units:
                    return  # full: what is left loads on first use
                if time.perf_counter() - started > PREPACK_S:
                    return
                units = await loop.run_in_executor(self._pool, self._prepack_one, entry)
                if isinstance(units, AdapterError):
                    self.catalog.mark_invalid(entry, "; ".join(units.problems))
                elif units is not None:
                    self._remember_units(entry.task_id, units)
                    packed += 1

        await asyncio.gather(*(lane() for _ in range(self._loaders)))
        if packed:
            log.info(
                "%d adapters packed ahead of their first use in %.1f s", packed, time.perf_counter() - started
            )
        return packed

    def forget(self, task_id: int) -> None:
        """The task's content is stale (its adapter changed or vanished): drop its packed file."""
        if self.store:
            self.store.discard(task_id)

    def _prepack_one(self, entry: AdapterEntry) -> int | AdapterError | None:
        """Rank-units of the adapter packed into the store, or why it cannot be served (a worker thread);
        None for anything else (left to its first use, which reports it)."""
        try:
            packed = pack(formats.load_for_engine(entry.path, self.spec, self.base_weights), self.spec.dtype)
        except AdapterError as e:
            return e
        except Exception:
            log.warning("packing adapter %r ahead failed; it loads on first use", entry.name, exc_info=True)
            return None
        with self._prepack_lock:  # another lane's put in between would evict one packed ahead
            if self.store.used_units + packed.rank_units > self.store.capacity_units:
                return None  # does not fit: it loads on first use (no earlier one evicted for it)
            self.store.put(entry.task_id, packed)
        return packed.rank_units

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.store:
            self.store.close()
