"""Packed adapters kept on local disk, so that a host-cache miss of an adapter this process has loaded before
maps its packed bytes back instead of reading, validating and packing its files again.

A rank-16 adapter of the 135M reference model is 28 MB of float32 rows: read + validate + pack take 15–60 ms
of CPU per miss (more for NeMo's pickles), on cores the engine needs; mapping the packed file back takes
well under a millisecond and copies nothing (the pages are the page cache's, and faulted in by whoever
reads them).

Trust: the files have no name (O_TMPFILE, or unlinked at once where the filesystem lacks it): only this
process holds them, through its descriptors, so every byte mapped back is one this process validated and
packed itself, and the files vanish with the process however it ends. The key is the task id, which the
catalog never reuses for other content (serving/catalog.py). Mapped copy-on-write: nothing written through
a tensor reaches the file. Bounded in rank-units and in files (descriptors), least recently used files
dropped first (a mapping outlives its file's descriptor). Thread-safe: the adapter loaders call it from their worker threads.
"""

from __future__ import annotations

import logging
import mmap
import os
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from trtllm_peft.lora import PackedLora

log = logging.getLogger(__name__)

# Each kept file holds a descriptor: a budget of rank-units alone would let thousands of tiny adapters take
# every descriptor the process may open (and its sockets with them).
MAX_FILES = 256


@dataclass(frozen=True)
class _File:
    fd: int  # an unnamed file holding the weights' bytes
    shape: tuple[int, int]  # of the weights [N, W]
    dtype: torch.dtype
    config: torch.Tensor  # [N, 4] int32, kept in memory (a few KB)
    units: int


class PackedStore:
    """task id -> PackedLora, in unnamed files under `parent` (None: the temp dir), within `capacity_units`."""

    def __init__(self, capacity_units: int, parent: Path | None = None, max_files: int = MAX_FILES):
        if capacity_units <= 0 or max_files <= 0:
            raise ValueError("capacity_units and max_files must be > 0")
        self.capacity_units, self.max_files = capacity_units, max_files
        self.parent = Path(parent or tempfile.gettempdir())
        try:
            self.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # then every put hands its adapter back (logged): served, just not kept
            log.warning("packed adapters cannot be kept under %s: %s", self.parent, e)
        self._files: OrderedDict[int, _File] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self.used_units = 0
        self.hits = self.writes = 0

    def get(self, task_id: int) -> PackedLora | None:
        """The adapter's packed tensors mapped from its file, or None when none is kept."""
        with self._lock:
            entry = self._files.get(task_id)
            if entry is None:
                return None
            self._files.move_to_end(task_id)
            weights = _map(entry)  # under the lock: an eviction must not close the descriptor meanwhile
            self.hits += weights is not None
        if weights is None:  # not its size any more (not expected): load from the adapter's files
            self.discard(task_id)
            return None
        return PackedLora(weights=weights, config=entry.config)

    def put(self, task_id: int, packed: PackedLora) -> PackedLora:
        """Keep `packed` on disk; returns the kept copy mapped back (so that memory holds one copy: the page
        cache's), or `packed` itself when it cannot be kept (too large, disk full: logged)."""
        units = packed.rank_units
        if units > self.capacity_units or packed.weights.numel() == 0:
            return packed
        weights = packed.weights.contiguous()
        try:
            fd = _write(self.parent, memoryview(weights.view(torch.uint8).numpy()))  # no copy
        except OSError as e:
            log.warning("could not keep packed adapter (task %d) under %s: %s", task_id, self.parent, e)
            return packed
        entry = _File(fd, tuple(weights.shape), weights.dtype, packed.config.clone(), units)
        with self._lock:
            old = self._files.pop(task_id, None)
            victims = [old] if old is not None else []
            self.used_units += units - (old.units if old else 0)
            self._files[task_id] = entry
            self.writes += 1
            victims += self._evict()
            mapped = _map(entry)
        for victim in victims:
            os.close(victim.fd)
        return packed if mapped is None else PackedLora(weights=mapped, config=entry.config)

    def discard(self, task_id: int) -> None:
        """Drop the adapter's file (its content is stale)."""
        with self._lock:
            entry = self._files.pop(task_id, None)
            if entry is not None:
                self.used_units -= entry.units
        if entry is not None:
            os.close(entry.fd)

    def __contains__(self, task_id: int) -> bool:
        with self._lock:
            return task_id in self._files

    def __len__(self) -> int:
        with self._lock:
            return len(self._files)

    def close(self) -> None:
        """Drop every file (mappings held elsewhere stay valid)."""
        with self._lock:
            entries = list(self._files.values())
            self._files.clear()
            self.used_units = 0
        for entry in entries:
            os.close(entry.fd)

    def _evict(self) -> list[_File]:
        """Entries to drop, least recently used first, until the budgets hold (under the lock)."""
        victims = []
        while len(self._files) > 1 and (
            self.used_units > self.capacity_units or len(self._files) > self.max_files
        ):
            _, victim = self._files.popitem(last=False)
            self.used_units -= victim.units
            victims.append(victim)
        return victims


def _write(parent: Path, data: memoryview) -> int:
    """A descriptor of a new unnamed file in `parent` holding `data`."""
    try:
        fd = os.open(parent, os.O_TMPFILE | os.O_RDWR, 0o600)
    except (AttributeError, OSError):  # no O_TMPFILE here: a named file, unlinked at once
        fd, name = tempfile.mkstemp(prefix="trtllm-peft-packed-", dir=parent)
        os.unlink(name)
    try:
        with open(fd, "wb", closefd=False) as f:
            f.write(data)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _map(entry: _File) -> torch.Tensor | None:
    """The file's weights [N, W], mapped copy-on-write; None when the file is not their size."""
    n, w = entry.shape
    size = n * w * torch.empty((), dtype=entry.dtype).element_size()
    try:
        if os.fstat(entry.fd).st_size != size:
            return None
        view = mmap.mmap(entry.fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except (OSError, ValueError):
        return None
    return torch.frombuffer(view, dtype=entry.dtype).view(n, w)  # keeps `view` alive
