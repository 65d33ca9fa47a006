"""Adapters by name for the Triton `peft` model: name → task id → weights only when the engine lacks them.

NIM's behaviour (seed/nim-peft.txt) on top of tensorrtllm_backend, with the package's own pieces: the catalog
(serving/catalog.py) finds adapters under NIM_PEFT_SOURCE and gives a new task id to every new content of a
name; formats.load_for_engine + lora.pack convert an adapter to TensorRT-LLM's tensors in the engine dtype;
the engine's cache is a belief, as in serving/orchestrator.py: weights go with a request only when the engine
is believed not to hold the task, and its "not found in cache" (executor/errors.classify) is answered by one
resend with weights.

Task ids: an adapter that `trtllm-peft triton-repo` numbered in lora_tasks.json keeps that id while its files
are unchanged (same fingerprint), so prefetched adapters are used by id from the first request; other adapters
get catalog ids from ROUTER_TASK_BASE up, far above the ids prefetching and clients use.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from trtllm_peft import formats
from trtllm_peft.errors import AdapterError, TrtllmPeftError
from trtllm_peft.executor.errors import ErrorKind, classify
from trtllm_peft.lora import ModelSpec, PackedLora, pack
from trtllm_peft.serving.catalog import AdapterEntry, Catalog

log = logging.getLogger(__name__)

ROUTER_TASK_BASE = 1 << 40
BELIEF_LIMIT = 4096  # task ids remembered as held by the engine (a few ints each)


class UnknownAdapterError(TrtllmPeftError):
    """No adapter of that name (Triton: NOT_FOUND)."""


class AdapterUnavailableError(TrtllmPeftError):
    """The adapter exists but cannot be served on this engine (Triton: INVALID_ARG)."""


@dataclass(frozen=True)
class PrefetchedIds:
    """What `triton-repo` recorded in lora_tasks.json: ids, the files they were made from, and whether the
    engine loads them at start (lora_prefetch_dir)."""

    tasks: dict[str, int]
    fingerprints: dict[str, tuple]
    prefetched: bool

    @classmethod
    def read(cls, path: Path | None) -> PrefetchedIds:
        try:
            doc = json.loads(path.read_text()) if path else {}
        except (OSError, ValueError):
            doc = {}
        fps = {n: tuple(tuple(f) for f in fp) for n, fp in (doc.get("fingerprints") or {}).items()}
        return cls(dict(doc.get("tasks") or {}), fps, bool(doc.get("prefetched", False)))


@dataclass(frozen=True)
class LoraTask:
    name: str
    task_id: int
    entry: AdapterEntry


class AdapterRouter:
    """Thread-safe: Triton may run several instances' execute() on threads of one process."""

    def __init__(
        self,
        spec: ModelSpec,
        catalog: Catalog,
        prefetched: PrefetchedIds,
        *,
        refresh_interval: float | None,
        max_cached: int,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.spec, self.catalog, self.prefetched = spec, catalog, prefetched
        self.refresh_interval, self.max_cached, self.clock = refresh_interval, max_cached, clock
        self._lock = threading.Lock()
        self._packed: OrderedDict[int, PackedLora] = OrderedDict()  # task id → tensors, LRU
        self._held: OrderedDict[int, None] = OrderedDict()  # belief: task ids the engine holds
        if prefetched.prefetched:
            for task_id in prefetched.tasks.values():
                self._held[task_id] = None
        self.catalog.scan()
        self._scanned = clock()

    def refresh_if_due(self) -> None:
        """Rescan NIM_PEFT_SOURCE when NIM_PEFT_REFRESH_INTERVAL has passed since the last scan."""
        if self.refresh_interval is None or self.clock() - self._scanned < self.refresh_interval:
            return
        with self._lock:
            if self.clock() - self._scanned < self.refresh_interval:
                return
            self._scanned = self.clock()
        self.catalog.scan()

    def resolve(self, name: str) -> LoraTask:
        entry = self.catalog.get(name)
        if entry is None:
            reason = self.catalog.invalid().get(name)
            if reason:
                raise AdapterUnavailableError(f"adapter '{name}' cannot be served: {reason}")
            names = ", ".join(e.name for e in self.catalog) or "none"
            raise UnknownAdapterError(f"The adapter '{name}' does not exist. Available adapters: {names}")
        kept = self.prefetched.tasks.get(name)
        same = kept is not None and self.prefetched.fingerprints.get(name) == entry.fingerprint
        return LoraTask(name, kept if same else entry.task_id, entry)

    def needs_weights(self, task: LoraTask) -> bool:
        with self._lock:
            return task.task_id not in self._held

    def packed(self, task: LoraTask) -> PackedLora:
        """The adapter as TensorRT-LLM tensors in the engine dtype (loaded once, kept LRU)."""
        with self._lock:
            hit = self._packed.get(task.task_id)
            if hit is not None:
                self._packed.move_to_end(task.task_id)
                return hit
        try:
            packed = pack(formats.load_for_engine(task.entry.path, self.spec), self.spec.dtype)
        except AdapterError as e:
            self.catalog.mark_invalid(task.entry, "; ".join(e.problems))
            raise AdapterUnavailableError(f"adapter '{task.name}' cannot be served: {e}") from None
        with self._lock:
            self._packed[task.task_id] = packed
            while len(self._packed) > self.max_cached:
                self._packed.popitem(last=False)
        log.info("adapter %r packed for task %d (%d rows)", task.name, task.task_id, packed.num_rows)
        return packed

    def engine_has(self, task_id: int) -> None:
        with self._lock:
            self._held[task_id] = None
            self._held.move_to_end(task_id)
            while len(self._held) > BELIEF_LIMIT:
                self._held.popitem(last=False)

    def engine_lacks(self, task_id: int) -> None:
        with self._lock:
            self._held.pop(task_id, None)

    @staticmethod
    def not_cached(error_message: str) -> bool:
        """TensorRT-LLM's "LoRA task <id> not found in cache. Please send LoRA weights with request"."""
        return classify(error_message) is ErrorKind.NOT_CACHED
