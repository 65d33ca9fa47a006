"""The host (CPU) PEFT cache: packed adapters by task id, least-recently-used first out, never while leased.

Budgeted in rank-units (Σ rank over an adapter's module-layer rows), sized for NIM_MAX_CPU_LORAS adapters
of max rank on every module, so smaller adapters fit in larger numbers (NIM's doc: a cache for 8 rank-64
adapters holds 32 of rank 16). A request leases its adapter for its whole life: a leased adapter is
never evicted. When the budget is entirely leased the request is refused with 429 (HostCacheFullError).

Pure data structure, no IO and no locking: the orchestrator calls it from the event loop only.
"""

from __future__ import annotations

from collections import OrderedDict
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
        self.hits = self.misses = self.evictions = 0

    def __contains__(self, task_id: int) -> bool:
        return task_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def leased_units(self) -> int:
        return sum(e.units for e in self._entries.values() if e.leases)

    def can_admit(self, units: int) -> bool:
        """Whether `units` could be made room for now (free plus idle, evictable, units)."""
        return self.capacity_units - self.leased_units >= units

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

    def put(self, task_id: int, packed: PackedLora) -> list[int]:
        """Insert a freshly loaded adapter, leased once; returns the task ids evicted to make room.

        Raises AdapterTooLargeError when it could never fit, HostCacheFullError when the room is held by
        leased adapters right now; in both cases nothing changes.
        """
        if task_id in self._entries:
            entry = self._entries[task_id]
            entry.leases += 1
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
        self._entries[task_id] = _Entry(packed=packed, units=units, leases=1)
        self.used_units += units
        return victims

    def release(self, task_id: int) -> None:
        """End one lease; the adapter becomes the most recently used."""
        entry = self._entries.get(task_id)
        if entry is None or entry.leases == 0:
            raise KeyError(f"task {task_id} is not leased")
        entry.leases -= 1
        self._entries.move_to_end(task_id)

    def discard(self, task_id: int) -> bool:
        """Drop an idle adapter (its files changed or vanished); a leased one stays until released."""
        entry = self._entries.get(task_id)
        if entry is None or entry.leases:
            return False
        self.used_units -= self._entries.pop(task_id).units
        return True

    def _victims(self, units: int) -> list[int] | None:
        """Idle task ids to evict, oldest first, so that `units` fit; None if even all idle ones do not."""
        free = self.capacity_units - self.used_units
        victims = []
        for task_id, entry in self._entries.items():
            if free >= units:
                break
            if not entry.leases:
                victims.append(task_id)
                free += entry.units
        return victims if free >= units else None
