"""serving/packed_store.py: packed adapters in unnamed files, mapped back on a host-cache miss."""

from __future__ import annotations

import os

import pytest
import torch

from trtllm_peft.lora import PackedLora
from trtllm_peft.serving.packed_store import PackedStore


def packed(rows: int, width: int, rank: int = 4, dtype=torch.float32, seed: int = 0) -> PackedLora:
    g = torch.Generator().manual_seed(seed)
    weights = torch.randn(rows, width, generator=g).to(dtype)  # [N, W]
    config = torch.tensor([[1, i, rank, 0] for i in range(rows)], dtype=torch.int32).reshape(rows, 4)
    return PackedLora(weights=weights, config=config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_put_then_get_gives_the_same_bytes(dtype):
    store = PackedStore(1000)
    p = packed(6, 37, dtype=dtype)
    kept = store.put(7, p)
    again = store.get(7)
    for got in (kept, again):
        assert got.weights.dtype == dtype and got.weights.shape == (6, 37)
        assert torch.equal(got.weights.view(torch.uint8), p.weights.view(torch.uint8))
        assert torch.equal(got.config, p.config) and got.rank_units == p.rank_units
    assert store.get(8) is None
    assert (store.hits, store.writes, len(store), store.used_units) == (1, 1, 1, 24)
    store.close()


def test_least_recently_used_goes_first_within_the_budget():
    store = PackedStore(3 * 8)  # three adapters of 2 rows x rank 4
    for task in (1, 2, 3):
        store.put(task, packed(2, 5, seed=task))
    assert store.get(1) is not None  # 2 is now the least recently used
    store.put(4, packed(2, 5, seed=4))
    assert [t in store for t in (1, 2, 3, 4)] == [True, False, True, True]
    assert store.used_units == 24
    store.close()


@pytest.mark.parametrize(
    "case, rows, rank, capacity",
    [("larger than the whole budget", 3, 8, 16), ("no values", 0, 4, 16)],
)
def test_what_cannot_be_kept_is_handed_back_unchanged(case, rows, rank, capacity):
    store = PackedStore(capacity)
    p = packed(rows, 5, rank=rank)
    assert store.put(1, p) is p, case
    assert 1 not in store and store.used_units == 0


def test_writes_through_a_mapping_never_reach_the_file():
    store = PackedStore(100)
    p = packed(2, 5)
    kept = store.put(1, p)
    kept.weights[0, 0] = 1e9  # copy-on-write mapping: this process's page only
    assert torch.equal(store.get(1).weights, p.weights)
    store.close()


def test_mappings_outlive_discard_and_close():
    store = PackedStore(100)
    p = packed(2, 5)
    a = store.put(1, p).weights
    b = store.get(1).weights
    store.discard(1)
    assert 1 not in store and store.used_units == 0 and store.get(1) is None
    store.put(2, packed(2, 5, seed=2))
    store.close()
    assert len(store) == 0
    assert torch.equal(a, p.weights) and torch.equal(b, p.weights)


def test_files_have_no_name_and_their_descriptors_are_closed(tmp_path):
    before = set(os.listdir("/proc/self/fd"))
    store = PackedStore(100, tmp_path)
    for task in range(3):
        store.put(task, packed(2, 5, seed=task))
    assert list(tmp_path.iterdir()) == []  # nothing another process could open or swap
    assert len(set(os.listdir("/proc/self/fd")) - before) == 3
    store.close()
    assert set(os.listdir("/proc/self/fd")) - before == set()


def test_a_file_cut_short_is_forgotten_not_mapped():
    store = PackedStore(100)
    store.put(1, packed(2, 5))
    os.ftruncate(store._files[1].fd, 8)  # not expected: only this process holds the file
    assert store.get(1) is None and 1 not in store and store.used_units == 0


def test_a_full_disk_hands_back_the_adapter(monkeypatch, caplog):
    store = PackedStore(100)
    p = packed(2, 5)

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("trtllm_peft.serving.packed_store._write", no_space)
    assert store.put(1, p) is p and 1 not in store
    assert "No space left" in caplog.text


def test_files_are_bounded_too_not_only_rank_units():
    store = PackedStore(10_000, max_files=2)  # room for hundreds by rank-units
    for task in (1, 2, 3):
        store.put(task, packed(1, 3, rank=1, seed=task))
    assert [t in store for t in (1, 2, 3)] == [False, True, True] and store.used_units == 2
    store.close()


@pytest.mark.parametrize("capacity, max_files", [(0, 1), (1, 0)])
def test_budgets_must_be_positive(capacity, max_files):
    with pytest.raises(ValueError):
        PackedStore(capacity, max_files=max_files)


def test_a_cache_path_that_does_not_exist_is_made(tmp_path):
    store = PackedStore(100, tmp_path / "a" / "b")
    assert torch.equal(store.put(1, packed(2, 5)).weights, packed(2, 5).weights) and 1 in store
    store.close()
