"""The host (CPU) PEFT cache: packed adapters by task id, least-recently-used first out, never while leased.

Budgeted in rank-units (Σ rank over an adapter's module-layer rows), sized for NIM_MAX_CPU_LORAS adapters
of max rank on every module, so smaller adapters fit in larger numbers (NIM's doc: a cache for 8 rank-64
adapters holds 32 of rank 16). A request leases its adapter for its whole life: a leased adapter is
never evicted. Room for an adapter being loaded can be reserved first (serving/lease_queue.py queues the
requests that find the budget leased, and refuses with 429, HostCacheFullError, past its bounds).

Pure data structure, no IO and no locking: the orchestrator calls it from the event loop only.
`on_free` (if set) is called whenever room or a lease is given back.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from trtllm_peft.errors import TrtllmPeftError
from trtllm_peft.lora import PackedLora


class HostCacheFullError(TrtllmPeftError):
    """Every adapter in the host cache is in use by active requests; retry later."""

    http_status = 429


class AdapterTooLargeError(TrtllmPeftError):
    """One adapter needs more than the whole host cache (raise NIM_MAX_CPU_LORAS)."""

    http_status = 422


@dataclass
class _Entry:
    packed: PackedLora
    units: int
    leases: int = 0


class HostCache:
    """task id → PackedLora within `capacity_units` rank-units."""

    def __init__(self, capacity_units: int):
        if capacity_units <= 0:
            raise ValueError("capacity_units must be > 0")
        self.capacity_units = capacity_units
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # least recently used first
        self.used_units = 0
        self.reserved_units = 0  # promised to adapters being loaded, not yet in `_entries`
        self.hits = self.misses = self.evictions = 0
        self.on_free: Callable[[], None] | None = None

    def __contains__(self, task_id: int) -> bool:
        return task_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def leased_units(self) -> int:
        return sum(e.units for e in self._entries.values() if e.leases)

    def can_admit(self, units: int) -> bool:
        """Whether `units` could be made room for now (free plus idle, evictable, units)."""
        return self.capacity_units - self.leased_units - self.reserved_units >= units

    def can_lease(self, task_id: int) -> bool:
        """Whether leasing a cached adapter keeps every reservation whole (leasing an idle adapter takes
        its units out of the evictable room that reservations may count on)."""
        entry = self._entries[task_id]
        return entry.leases > 0 or self.can_admit(entry.units)

    def drain_candidates(self, units: int) -> list[int]:
        """Cached task ids whose room (once idle) makes `units` fit: idle ones first, then leased ones,
        least recently used first. What a waiting request needs to stop being leased."""
        free = self.capacity_units - self.used_units - self.reserved_units
        chosen = []
        for leased in (False, True):
            for task_id, entry in self._entries.items():
                if free >= units:
                    return chosen
                if bool(entry.leases) == leased:
                    chosen.append(task_id)
                    free += entry.units
        return chosen

    def reserve(self, units: int) -> None:
        """Promise `units` to a load (`can_admit` must hold); `put(..., reserved=units)` redeems it."""
        self.reserved_units += units

    def unreserve(self, units: int) -> None:
        """Give back a reservation whose load failed or was abandoned."""
        self.reserved_units -= units
        self._freed()

    def full_error(self) -> HostCacheFullError:
        return HostCacheFullError(
            f"host LoRA cache is full of adapters in use ({self.leased_units}/{self.capacity_units} "
            "rank-units leased by active requests); retry later"
        )

    def acquire(self, task_id: int) -> PackedLora | None:
        """Lease a cached adapter (a hit) or return None (a miss: load it, then `put`)."""
        entry = self._entries.get(task_id)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        entry.leases += 1
        self._entries.move_to_end(task_id)
        return entry.packed

    def put(self, task_id: int, packed: PackedLora, *, reserved: int = 0, leases: int = 1) -> list[int]:
        """Insert a freshly loaded adapter with `leases` leases, redeeming a reservation of `reserved`
        units; returns the task ids evicted to make room.

        Raises AdapterTooLargeError when it could never fit, HostCacheFullError when the room is held by
        leased adapters right now; in both cases nothing changes but the reservation, which is given back.
        """
        self.reserved_units -= reserved
        try:
            return self._put(task_id, packed, leases)
        finally:
            if reserved:
                self._freed()  # what the adapter did not need of its reservation is free again

    def _put(self, task_id: int, packed: PackedLora, leases: int) -> list[int]:
        if task_id in self._entries:
            entry = self._entries[task_id]
            entry.leases += leases
            self._entries.move_to_end(task_id)
            return []
        units = packed.rank_units
        if units > self.capacity_units:
            raise AdapterTooLargeError(
                f"adapter needs {units} rank-units, more than the whole host cache ({self.capacity_units}); "
                "raise NIM_MAX_CPU_LORAS"
            )
        victims = self._victims(units)
        if victims is None:
            raise self.full_error()
        for victim in victims:
            self.used_units -= self._entries.pop(victim).units
            self.evictions += 1
        self._entries[task_id] = _Entry(packed=packed, units=units, leases=leases)
        self.used_units += units
        return victims

    def release(self, task_id: int) -> None:
        """End one lease; the adapter becomes the most recently used."""
        entry = self._entries.get(task_id)
        if entry is None or entry.leases == 0:
            raise KeyError(f"task {task_id} is not leased")
        entry.leases -= 1
        self._entries.move_to_end(task_id)
        if entry.leases == 0:
            self._freed()

    def discard(self, task_id: int) -> bool:
        """Drop an idle adapter (its files changed or vanished); a leased one stays until released."""
        entry = self._entries.get(task_id)
        if entry is None or entry.leases:
            return False
        self.used_units -= self._entries.pop(task_id).units
        self._freed()
        return True

    def _victims(self, units: int) -> list[int] | None:
        """Idle task ids to evict, oldest first, so that `units` fit; None if even all idle ones do not."""
        free = self.capacity_units - self.used_units - self.reserved_units
        victims = []
        for task_id, entry in self._entries.items():
            if free >= units:
                break
            if not entry.leases:
                victims.append(task_id)
                free += entry.units
        return victims if free >= units else None

    def _freed(self) -> None:
        if self.on_free is not None:
            self.on_free()
