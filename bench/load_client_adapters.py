"""The raw executor's client-side adapters when they come from disk, as the server's do (bench/load.py).

The plain raw phase hands the executor adapters packed before its window (all of them, in memory, for as long
as it runs): the server, with a host cache of NIM_MAX_CPU_LORAS, cannot do that; it reads, validates and packs
an adapter from disk whenever its host cache lacks it. This client does the same with the same code and budget,
so that "raw (from disk)" measures the executor plus only what any client of it must do with a bounded cache:
`formats.load_for_engine` + `pack` in one of two worker threads (the server's loaders=2), one load shared by
concurrent misses, least recently used out past the server's host-cache rank-unit budget.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from trtllm_peft import formats
from trtllm_peft.lora import ModelSpec, PackedLora, pack


class ClientAdapters:
    """adapter index -> PackedLora, loaded from `paths[i]` on a miss, LRU within `capacity_units`."""

    def __init__(self, paths: list[Path], spec: ModelSpec, capacity_units: int):
        self.paths, self.spec, self.capacity = paths, spec, capacity_units
        self._held: OrderedDict[int, PackedLora] = OrderedDict()  # least recently used first
        self._loading: dict[int, asyncio.Future[PackedLora]] = {}
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="client-load")
        self.loads: list[tuple[int, float]] = []  # (adapter, time the load ended)

    async def get(self, i: int) -> PackedLora:
        if i in self._held:
            self._held.move_to_end(i)
            return self._held[i]
        if i not in self._loading:
            loop = asyncio.get_running_loop()
            self._loading[i] = loop.run_in_executor(self._pool, self._load, i)
        try:
            packed = await asyncio.shield(self._loading[i])
        finally:
            if self._loading.get(i) is not None and self._loading[i].done():
                del self._loading[i]
        self._hold(i, packed)
        return packed

    def _load(self, i: int) -> PackedLora:
        packed = pack(formats.load_for_engine(self.paths[i], self.spec), self.spec.dtype)
        self.loads.append((i, time.perf_counter()))
        return packed

    def _hold(self, i: int, packed: PackedLora) -> None:
        if i in self._held:
            return
        self._held[i] = packed
        used = sum(p.rank_units for p in self._held.values())
        while used > self.capacity and len(self._held) > 1:
            used -= self._held.popitem(last=False)[1].rank_units

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
