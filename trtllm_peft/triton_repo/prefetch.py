"""`lora_prefetch_dir` from NIM_PEFT_SOURCE: every adapter as TensorRT-LLM tensors under a numeric task id.

TensorRT-LLM loads `<dir>/<task id>/model.lora_{weights,config}.npy` at start and skips folders not named by
a number (PeftCacheManager::prefetchLoraWeights), so Triton clients must send ids, not names. The map
name → task id is written beside the repository (`lora_tasks.json`); ids already in that file are kept, so
regenerating the repository never gives an adapter's id to another one.

A bf16 engine gets no prefetch files: TensorRT-LLM reads them with `loadNpy`, whose `typeFromNumpyDesc`
(cpp/tensorrt_llm/runtime/utils/numpyUtils.cpp @1069bc9d, the only version in the source index) knows
`? u1 i1 i4 i8 f2 f4`; numpy writes bfloat16 as `|V2`, so a bf16 prefetch file would fail the model's start
("numpy data type 'V2' not supported"). Its adapters still get their ids here, and are served by name through
the `peft` model (peft_model.py), which sends the weights as bf16 tensors in the request.
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
NPY_DTYPES = ("float16", "float32")  # what loadNpy reads (f2, f4); bfloat16 (|V2) it refuses


@dataclass
class PrefetchResult:
    tasks: dict[str, int] = field(default_factory=dict)  # adapter name -> task id
    skipped: dict[str, str] = field(default_factory=dict)  # adapter name -> why
    fingerprints: dict[str, list] = field(default_factory=dict)  # adapter name -> files seen (catalog's)
    prefetched: bool = True  # False: ids only, no files (the engine dtype has no .npy TensorRT-LLM reads)

    def to_json(self) -> str:
        doc = {
            "tasks": self.tasks,
            "skipped": self.skipped,
            "fingerprints": self.fingerprints,
            "prefetched": self.prefetched,
        }
        return json.dumps(doc, indent=2, sort_keys=True) + "\n"


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

    For an engine dtype TensorRT-LLM cannot read from .npy (bf16) the adapters are checked and numbered but
    no file is written (`prefetched` False). `base` (the engine's weights) normalizes DoRA magnitudes, as
    TensorRT-LLM's rows carry them."""
    result = PrefetchResult(prefetched=spec.dtype in NPY_DTYPES)
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
            if result.prefetched:
                formats.save(adapter, out / str(task_id), "trtllm", spec)
        except AdapterError as e:
            shutil.rmtree(out / str(task_id), ignore_errors=True)
            result.skipped[entry.name] = str(e)
            log.warning("adapter %r skipped: %s", entry.name, e)
            continue
        result.tasks[entry.name] = task_id
        result.fingerprints[entry.name] = [list(f) for f in entry.fingerprint]
    return result
