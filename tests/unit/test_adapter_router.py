"""adapter_router.py: task ids of the `peft` model against what `triton-repo` prefetched (fp16 engine)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_LLAMA, make_peft_adapter
from trtllm_peft.engine.engine_dir import engine_config, write_configs
from trtllm_peft.lora import load_spec
from trtllm_peft.serving.catalog import Catalog
from trtllm_peft.settings import Settings
from trtllm_peft.triton_repo import generate_repository
from trtllm_peft.triton_repo.adapter_router import (
    ROUTER_TASK_BASE,
    AdapterRouter,
    AdapterUnavailableError,
    PrefetchedIds,
    UnknownAdapterError,
)


@pytest.fixture
def setup(tmp_path) -> tuple[Path, Path, Path]:
    engine = tmp_path / "engine"
    cfg = engine_config(
        TINY_LLAMA, dtype="float16", max_batch_size=4, max_seq_len=64, max_num_tokens=64, max_lora_rank=8
    )
    write_configs(engine, cfg, {"backend": "trtllm"})
    loras = tmp_path / "loras"
    make_peft_adapter(loras / "a", seed=1, r=4)
    make_peft_adapter(loras / "big", seed=2, r=16)  # over the engine's max rank
    repo = tmp_path / "repo"
    generate_repository(
        engine, repo, Settings(peft_source=loras, max_gpu_loras=1, max_cpu_loras=2), gpu_free_bytes=2**34
    )
    return engine, loras, repo


def router(engine: Path, loras: Path, repo: Path) -> AdapterRouter:
    return AdapterRouter(
        load_spec(engine),
        Catalog(loras, first_task_id=ROUTER_TASK_BASE),
        PrefetchedIds.read(repo / "lora_tasks.json"),
        refresh_interval=None,
        max_cached=2,
    )


def test_prefetched_adapter_is_used_by_id_until_its_files_change(setup):
    engine, loras, repo = setup
    r = router(engine, loras, repo)
    task = r.resolve("a")
    assert task.task_id == 1 and not r.needs_weights(
        task
    )  # prefetched at start: by id from the first request
    assert r.packed(task).weights.dtype == torch.float16  # converted to the engine dtype when resent
    make_peft_adapter(loras / "a", seed=9, r=4)  # new content under the same name
    r.catalog.scan()
    changed = r.resolve("a")
    assert changed.task_id >= ROUTER_TASK_BASE and r.needs_weights(changed)  # never the old id: new weights


def test_not_cached_resets_the_belief(setup):
    r = router(*setup)
    task = r.resolve("a")
    r.engine_lacks(task.task_id)
    assert r.needs_weights(task)
    r.engine_has(task.task_id)
    assert not r.needs_weights(task)
    assert r.not_cached("LoRA task 1 not found in cache. Please send LoRA weights with request")


def test_unknown_and_unservable_names(setup):
    r = router(*setup)
    with pytest.raises(UnknownAdapterError, match="Available adapters: a, big"):
        r.resolve("nope")
    with pytest.raises(AdapterUnavailableError, match="rank 16"):
        r.packed(r.resolve("big"))
    with pytest.raises(AdapterUnavailableError, match="cannot be served"):
        r.resolve("big")  # remembered as invalid until its files change
