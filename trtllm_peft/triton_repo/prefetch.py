"""`lora_prefetch_dir` from NIM_PEFT_SOURCE: every adapter as TensorRT-LLM tensors under a numeric task id.

TensorRT-LLM loads `<dir>/<task id>/model.lora_{weights,config}.npy` at start and skips folders not named by
a number (PeftCacheManager::prefetchLoraWeights), so Triton clients must send ids, not names. The map
name → task id is written beside the repository (`lora_tasks.json`); ids already in that file are kept, so
regenerating the repository never gives an adapter's id to another one.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from trtllm_peft import formats
from trtllm_peft.errors import AdapterError
from trtllm_peft.lora.dora import WeightOf
from trtllm_peft.lora.spec import ModelSpec
from trtllm_peft.serving.catalog import Catalog

log = logging.getLogger(__name__)

TASKS_FILE = "lora_tasks.json"


@dataclass
class PrefetchResult:
    tasks: dict[str, int] = field(default_factory=dict)  # adapter name -> task id
    skipped: dict[str, str] = field(default_factory=dict)  # adapter name -> why

    def to_json(self) -> str:
        return json.dumps({"tasks": self.tasks, "skipped": self.skipped}, indent=2, sort_keys=True) + "\n"


def previous_ids(tasks_file: Path) -> dict[str, int]:
    """Task ids of an earlier run (empty when there is none or it is unreadable)."""
    try:
        tasks = json.loads(tasks_file.read_text()).get("tasks", {})
        return {str(k): int(v) for k, v in tasks.items()}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def write_prefetch_dir(
    peft_source: Path | None, out: Path, spec: ModelSpec, keep: dict[str, int], base: WeightOf | None = None
) -> PrefetchResult:
    """Convert every adapter of `peft_source` into `out/<id>/`; adapters that do not fit are skipped, with why.

    `base` (the engine's weights) normalizes DoRA magnitudes, as TensorRT-LLM's rows carry them."""
    result = PrefetchResult()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    catalog = Catalog(peft_source)
    scan = catalog.scan()
    result.skipped.update(scan.skipped)
    next_id = max(keep.values(), default=0) + 1
    for entry in catalog:
        task_id = keep.get(entry.name)
        if task_id is None:
            task_id, next_id = next_id, next_id + 1
        try:
            adapter = formats.load_for_engine(entry.path, spec, base)
            formats.save(adapter, out / str(task_id), "trtllm", spec)
        except AdapterError as e:
            shutil.rmtree(out / str(task_id), ignore_errors=True)
            result.skipped[entry.name] = str(e)
            log.warning("adapter %r skipped: %s", entry.name, e)
            continue
        result.tasks[entry.name] = task_id
    return result
