"""The adapter catalog: names from directories, task ids that change with content, invalid adapters, scale."""

from __future__ import annotations

import os
import time
import tracemalloc

from trtllm_peft.serving.catalog import Catalog, detect_by_names


def _hf(d, content="x"):
    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_config.json").write_text("{}")
    (d / "adapter_model.safetensors").write_text(content)


def _trt(d):
    d.mkdir(parents=True)
    (d / "model.lora_config.npy").write_text("c")
    (d / "model.lora_weights.npy").write_text("w")


def test_detect_by_names_table():
    assert detect_by_names({"adapter_config.json", "adapter_model.bin"}) == "hf"
    assert detect_by_names({"model.lora_config.bin", "model.lora_weights.npy"}) == "trtllm"
    assert detect_by_names({"model.lora_keys.npy", "model.lora_weights.npy"}) == "trtllm"
    assert detect_by_names({"x.nemo"}) == "nemo"
    assert detect_by_names({"a.nemo", "b.nemo"}) is None
    assert detect_by_names({"adapter_config.json"}) is None
    assert detect_by_names(set()) is None


def test_scan_adds_changes_removes_with_fresh_task_ids(tmp_path):
    _hf(tmp_path / "math")
    _trt(tmp_path / "squad")
    (tmp_path / "squad-nemo").mkdir()
    (tmp_path / "squad-nemo" / "s.nemo").write_text("n")
    (tmp_path / ".pulling-tmp").mkdir()  # hidden: a download in progress
    _hf(tmp_path / ".pulling-tmp")
    cat = Catalog(tmp_path)
    first = cat.scan()
    assert first.added == ["math", "squad", "squad-nemo"] and not first.removed
    ids = {e.name: e.task_id for e in cat}
    assert len(set(ids.values())) == 3 and min(ids.values()) >= 1
    assert [e.format for e in cat] == ["hf", "trtllm", "nemo"]

    assert not cat.scan().any  # nothing changed: same entries, same ids
    assert {e.name: e.task_id for e in cat} == ids

    p = tmp_path / "math" / "adapter_model.safetensors"
    p.write_text("new content!")
    os.utime(p, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    os.rename(tmp_path / "squad", tmp_path / "squad-v2")
    result = cat.scan()
    assert result.changed == ["math"] and result.added == ["squad-v2"] and result.removed == ["squad"]
    assert cat.get("math").task_id not in ids.values()
    assert cat.get("squad-v2").task_id not in ids.values()  # same content, new name: never an old id
    assert cat.get("squad") is None


def test_non_adapter_dirs_are_skipped_with_a_reason_and_retried(tmp_path):
    (tmp_path / "half-copied").mkdir()
    (tmp_path / "half-copied" / "adapter_config.json").write_text("{}")
    cat = Catalog(tmp_path)
    result = cat.scan()
    assert "half-copied" in result.skipped and "no adapter files" in cat.invalid()["half-copied"]
    _hf(tmp_path / "half-copied")
    assert cat.scan().added == ["half-copied"]


def test_failed_load_is_remembered_until_the_files_change(tmp_path):
    _hf(tmp_path / "bad")
    cat = Catalog(tmp_path)
    cat.scan()
    entry = cat.get("bad")
    cat.mark_invalid(entry, "truncated safetensors file")
    assert cat.get("bad") is None and cat.invalid() == {"bad": "truncated safetensors file"}
    assert not cat.scan().any and cat.get("bad") is None  # same bytes: still invalid
    _hf(tmp_path / "bad", content="fixed now")
    result = cat.scan()
    assert result.added == ["bad"] and cat.get("bad").task_id != entry.task_id and not cat.invalid()


def test_missing_root_is_an_empty_catalog(tmp_path):
    assert not Catalog(tmp_path / "nope").scan().any
    assert len(Catalog(None)) == 0 and not Catalog(None).scan().any


def test_scanning_10000_adapters_holds_no_weights(tmp_path):
    for i in range(10_000):
        d = tmp_path / f"a{i:05d}"
        d.mkdir()
        (d / "adapter_config.json").write_bytes(b"{}")
        (d / "adapter_model.safetensors").write_bytes(b"0" * 4096)
    cat = Catalog(tmp_path)
    tracemalloc.start()
    cat.scan()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(cat) == 10_000
    # bounded per adapter (names, paths, stats: ~2 KB, varying a little run to run), no file contents:
    # holding them would take more than the 41 MB of weights on disk here
    assert peak < 10_000 * 3_000
    assert not cat.scan().any  # a rescan of unchanged adapters changes nothing (its speed: bench/catalog.py)
