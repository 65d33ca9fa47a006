"""The adapter catalog: which adapters exist under NIM_PEFT_SOURCE, by name, and their task ids.

The catalog owns two of the three identifiers of DESIGN §2: the adapter **name** (the sub-directory's
name, what users put in `model`) and the **task id** (the uint64 the engine caches weights under). A name
whose files change gets a new task id, because TensorRT-LLM silently keeps serving the old weights of a
reused id; ids are never reused.

A scan only lists directories and stats files (no weights are read), so it is cheap for thousands of
adapters. Detection here is by file names; whether the weights really load is learnt when an adapter is
first used, and an adapter that failed is remembered as invalid until its files change.

Symbolic links (TRTLLM_PEFT_FOLLOW_SYMLINKS): `inside` (default) follows a link only when it resolves under
NIM_PEFT_SOURCE (Kubernetes volumes and `..data` links stay usable; a link to /etc/shadow does not), `all`
follows every link, `none` follows none. An adapter directory with a link the policy refuses is skipped
with the link's name (never its target's content). Checked at every scan; a file swapped for a link
changes the adapter's fingerprint, so the next scan sees it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

Fingerprint = tuple[tuple[str, int, int], ...]  # (file name, size, mtime_ns) of each file, sorted

_HF = ({"adapter_config.json"}, {"adapter_model.safetensors", "adapter_model.bin"})
_TRT_CONFIG = {"model.lora_config.npy", "model.lora_config.bin", "model.lora_keys.npy"}
_TRT_WEIGHTS = {"model.lora_weights.npy", "model.lora_weights.bin"}


@dataclass(frozen=True)
class AdapterEntry:
    """One adapter directory as last seen by a scan."""

    name: str
    path: Path
    format: str  # "hf" | "nemo" | "trtllm", from the file names
    fingerprint: Fingerprint
    task_id: int
    created: float = field(default_factory=time.time)  # when this content was first seen


@dataclass(frozen=True)
class ScanResult:
    added: list[str]
    removed: list[str]
    changed: list[str]  # same name, new content, new task id
    skipped: dict[str, str]  # name -> why it is not an adapter (yet)

    @property
    def any(self) -> bool:
        return bool(self.added or self.removed or self.changed)


def detect_by_names(files: set[str]) -> str | None:
    """Format of a directory from its file names alone (no reads); None when it is no adapter."""
    if _HF[0] <= files and files & _HF[1]:
        return "hf"
    if files & _TRT_CONFIG and files & _TRT_WEIGHTS:
        return "trtllm"
    if sum(f.endswith(".nemo") for f in files) == 1:
        return "nemo"
    return None


def _printable(name: str) -> str:
    return name.encode("utf-8", "backslashreplace").decode("utf-8")


def _name_problem(name: str) -> str | None:
    """Adapter names go into JSON and the `model` field: a directory name that is not UTF-8 cannot."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "the directory's name is not valid UTF-8 (rename it: adapter names are UTF-8 text)"
    return None


def link_problem(path: Path, root: Path, policy: str) -> str | None:
    """Why the policy refuses a symbolic link at `path` (the adapter directory) or directly inside it."""
    if policy == "all":
        return None
    entries = [path]
    try:
        with os.scandir(path) as it:
            entries += [Path(e.path) for e in it if e.is_symlink()]
    except OSError:
        return None  # the fingerprint already failed or will: nothing is read from here
    real_root = os.path.realpath(root)
    for link in entries:
        if not link.is_symlink():
            continue
        if policy == "none":
            return (
                f"{_printable(link.name)} is a symbolic link (TRTLLM_PEFT_FOLLOW_SYMLINKS=none follows none)"
            )
        target = os.path.realpath(link)
        if os.path.commonpath([real_root, target]) != real_root:
            return (
                f"{_printable(link.name)} is a symbolic link leading outside NIM_PEFT_SOURCE "
                "(TRTLLM_PEFT_FOLLOW_SYMLINKS=inside; set it to all to follow such links)"
            )
    return None


def _fingerprint(path: Path) -> Fingerprint | None:
    try:
        with os.scandir(path) as it:
            stats = [(e.name, e.stat()) for e in it if e.is_file()]
    except OSError:
        return None
    return tuple(sorted((name, st.st_size, st.st_mtime_ns) for name, st in stats))


class Catalog:
    """name → AdapterEntry for the sub-directories of `root`. Safe to read from any thread."""

    def __init__(self, root: Path | None, *, first_task_id: int = 1, follow_symlinks: str = "inside"):
        self.root = root
        self.follow_symlinks = follow_symlinks  # inside | all | none (settings.SYMLINK_POLICIES)
        self._entries: dict[str, AdapterEntry] = {}
        self._invalid: dict[str, tuple[Fingerprint, str]] = {}  # name -> (content, reason) of failed loads
        self._skipped: dict[str, str] = {}
        self._next_id = first_task_id
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[AdapterEntry]:
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def get(self, name: str) -> AdapterEntry | None:
        """The entry of a servable adapter, or None (unknown, or known to be invalid)."""
        return self._entries.get(name)

    def invalid(self) -> dict[str, str]:
        """Adapters that are skipped, with the reason: no adapter files, or a load that failed."""
        return {**self._skipped, **{n: reason for n, (_, reason) in self._invalid.items()}}

    def mark_invalid(self, entry: AdapterEntry, reason: str) -> None:
        """Stop serving `entry` until its files change (a load or validation failed)."""
        with self._lock:
            if self._entries.get(entry.name) is entry:
                del self._entries[entry.name]
            self._invalid[entry.name] = (entry.fingerprint, reason)
        log.warning("adapter %r skipped: %s", entry.name, reason)

    def scan(self) -> ScanResult:
        """Re-read the directory tree; entries are swapped in one step, so readers never see half a scan."""
        found = self._list()
        with self._lock:
            old = self._entries
            new, added, changed, skipped = {}, [], [], {}
            for name, (path, fp, fmt, why) in found.items():
                if why is not None or fmt is None:
                    skipped[name] = why or (
                        "no adapter files (adapter_config.json + adapter_model.*, one .nemo, or model.lora_*.npy)"
                    )
                    continue
                bad = self._invalid.get(name)
                if bad and bad[0] == fp:
                    continue  # still the content that failed; retried once it changes
                self._invalid.pop(name, None)
                prev = old.get(name)
                if prev is not None and prev.fingerprint == fp:
                    new[name] = prev
                    continue
                new[name] = AdapterEntry(
                    name=name, path=path, format=fmt, fingerprint=fp, task_id=self._next_id
                )
                self._next_id += 1
                (changed if prev is not None else added).append(name)
            removed = sorted(set(old) - set(new))
            for name in set(self._invalid) - set(found):
                del self._invalid[name]
            self._entries, self._skipped = new, skipped
        result = ScanResult(sorted(added), removed, sorted(changed), skipped)
        self._log(result)
        return result

    def _list(self) -> dict[str, tuple[Path, Fingerprint, str | None, str | None]]:
        """name -> (path, fingerprint, format by names, why it is skipped or None)."""
        if self.root is None:
            return {}
        try:
            with os.scandir(self.root) as it:
                dirs = [(e.name, Path(e.path)) for e in it if e.is_dir() and not e.name.startswith(".")]
        except OSError as e:
            log.error("cannot read NIM_PEFT_SOURCE %s: %s", self.root, e)
            return {}
        out = {}
        for name, path in dirs:
            fp = _fingerprint(path)
            if fp is None:
                continue
            why = _name_problem(name) or link_problem(path, self.root, self.follow_symlinks)
            out[_printable(name)] = (path, fp, detect_by_names({f for f, _, _ in fp}), why)
        return out

    def _log(self, result: ScanResult, detail_limit: int = 20) -> None:
        """One line per change; a summary instead when a scan finds many (a first scan of 10,000 dirs)."""
        for kind, names in (
            ("added", result.added),
            ("changed", result.changed),
            ("removed", result.removed),
        ):
            if len(names) > detail_limit:
                log.info("%d adapters %s (%s, …)", len(names), kind, ", ".join(names[:5]))
                continue
            for name in names:
                entry = self._entries.get(name)
                suffix = f" ({entry.format}, task {entry.task_id})" if entry else ""
                log.info("adapter %r %s%s", name, kind, suffix)
