"""The reference engine's PEFT cache: a host tier and a device tier with TensorRT-LLM's semantics.

Pure data structure (no torch, no threads: the executor's loop is its only user). Capacities are budgets
of rank-units — one module-layer row of rank 1, TensorRT-LLM's `num_*_module_layer` — so a budget for
8 rank-64 adapters holds 32 rank-16 ones (NIM's example). Rules (cpp/tensorrt_llm/runtime/loraCache.cpp,
batch_manager/peftCacheManager.cpp; trtllm_lora.md §4.3–4.5):
* a task used by an active request (refcount > 0) is never evicted;
* idle tasks are evicted least-recently-finished first (the order in which their last request finished);
* putting a task id that is already held keeps the held value (same id = same content);
* no room even after evicting every idle task → LoraCacheFullError; a task larger than the whole tier can
  never fit (`fits_ever` tells the caller, who answers with an error instead of waiting forever).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from trtllm_peft.errors import TrtllmPeftError
from trtllm_peft.executor.api import HOST_CACHE_FULL_MESSAGE, NOT_CACHED_MESSAGE


class PeftTaskNotCachedError(TrtllmPeftError):
    """TensorRT-LLM's PeftTaskNotCachedException: a task id without weights that the cache lacks."""

    def __init__(self, task_id: int):
        super().__init__(NOT_CACHED_MESSAGE.format(task_id=task_id))
        self.task_id = task_id


class LoraCacheFullError(TrtllmPeftError):
    """TensorRT-LLM's LoraCacheFullException: no room, and every held task is in use."""

    def __init__(self, task_id: int, message: str | None = None):
        super().__init__(message or HOST_CACHE_FULL_MESSAGE.format(task_id=task_id))
        self.task_id = task_id


@dataclass
class _Entry:
    units: int
    value: Any
    refs: int = 0


class CacheTier:
    """One tier: task id → value, budgeted in rank-units, refcounted, LRF eviction of idle tasks."""

    def __init__(self, name: str, capacity_units: int) -> None:
        self.name, self.capacity = name, capacity_units
        self._entries: dict[int, _Entry] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()  # first = least recently finished
        self.used = 0
        self.evictions: list[int] = []  # every evicted task id, in order (for stats and tests)

    def __contains__(self, task_id: int) -> bool:
        return task_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def task_ids(self) -> list[int]:
        return list(self._entries)

    def get(self, task_id: int) -> Any:
        return self._entries[task_id].value

    def refs(self, task_id: int) -> int:
        return self._entries[task_id].refs if task_id in self._entries else 0

    def fits_ever(self, units: int) -> bool:
        return units <= self.capacity

    def can_fit(self, units: int) -> bool:
        """Room for `units` now, counting what evicting every idle task would free."""
        idle = sum(self._entries[t].units for t in self._idle)
        return self.capacity - self.used + idle >= units

    def put(self, task_id: int, units: int, value: Any) -> list[int]:
        """Hold `value` for `task_id` (kept as is when already held); returns the task ids evicted for it."""
        if task_id in self._entries:
            return []
        if not self.can_fit(units):
            raise LoraCacheFullError(task_id)
        evicted = []
        while self.capacity - self.used < units:
            victim, _ = self._idle.popitem(last=False)
            self.used -= self._entries.pop(victim).units
            evicted.append(victim)
        self.evictions.extend(evicted)
        self._entries[task_id] = _Entry(units=units, value=value)
        self._idle[task_id] = None  # held but not in use until acquired
        self.used += units
        return evicted

    def acquire(self, task_id: int) -> None:
        """A request starts using the task: it cannot be evicted until every user released it."""
        entry = self._entries[task_id]
        entry.refs += 1
        self._idle.pop(task_id, None)

    def release(self, task_id: int) -> None:
        """A request stopped using the task; at zero users it becomes the most recently finished idle task."""
        entry = self._entries[task_id]
        entry.refs -= 1
        if entry.refs == 0:
            self._idle[task_id] = None
            self._idle.move_to_end(task_id)

    @property
    def idle_order(self) -> list[int]:
        """Idle task ids, next to be evicted first."""
        return list(self._idle)


class PeftCache:
    """Host tier (all tasks of queued and running requests) and device tier (tasks of the running batch)."""

    def __init__(self, host_units: int, device_units: int) -> None:
        self.host = CacheTier("host", host_units)
        self.device = CacheTier("device", device_units)

    def admit(self, task_id: int, units: int | None = None, value: Any = None) -> None:
        """A request for `task_id` arrives: store its weights (if new) and hold it until `finish`.

        `units`/`value` are None when the request carried no weights: then the task must be held already
        (PeftTaskNotCachedError). Weights for a held task are ignored.
        """
        if task_id not in self.host:
            if value is None:
                raise PeftTaskNotCachedError(task_id)
            self.host.put(task_id, units, value)
        self.host.acquire(task_id)

    def finish(self, task_id: int) -> None:
        """The request no longer needs the task in host memory."""
        self.host.release(task_id)

    def device_fits_ever(self, task_id: int) -> bool:
        return self.device.fits_ever(self._units(task_id))

    def try_load_device(self, task_id: int, make_value) -> bool:
        """Bring the task to the device tier for a request joining the batch, evicting idle device tasks.

        Returns False (the request waits) when the running batch's tasks leave no room. `make_value(host_value)`
        builds the device form only when the task is not there yet.
        """
        if task_id not in self.device:
            units = self._units(task_id)
            if not self.device.can_fit(units):
                return False
            self.device.put(task_id, units, make_value(self.host.get(task_id)))
        self.device.acquire(task_id)
        return True

    def leave_device(self, task_id: int) -> None:
        self.device.release(task_id)

    def _units(self, task_id: int) -> int:
        return self.host._entries[task_id].units
