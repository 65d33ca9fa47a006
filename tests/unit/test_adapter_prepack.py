"""AdapterLeases with a PackedStore: adapters packed ahead at start, mapped back on a host-cache miss."""

from __future__ import annotations

import asyncio

import pytest
import torch

from tests.conftest import random_lora
from trtllm_peft import formats
from trtllm_peft.lora import pack
from trtllm_peft.serving.adapter_leases import AdapterLeases, AdapterUnavailableError
from trtllm_peft.serving.catalog import Catalog
from trtllm_peft.serving.host_cache import HostCache
from trtllm_peft.serving.packed_store import PackedStore


@pytest.fixture
def catalog(tmp_path, tiny_spec):
    for i, fmt in enumerate(("hf", "nemo", "trtllm")):
        formats.save(random_lora(tiny_spec, rank=4, seed=i), tmp_path / f"a{i}-{fmt}", fmt, tiny_spec)
    bad = tmp_path / "b-broken"
    formats.save(random_lora(tiny_spec, rank=4, seed=9), bad, "hf", tiny_spec)
    (bad / "adapter_config.json").write_text("{")
    cat = Catalog(tmp_path)
    cat.scan()
    return cat


def leases(tiny_spec, catalog, store_adapters: int) -> AdapterLeases:
    store = PackedStore(tiny_spec.cache_units(store_adapters)) if store_adapters else None
    return AdapterLeases(
        spec=tiny_spec, catalog=catalog, host_cache=HostCache(tiny_spec.cache_units(4)), store=store
    )


def test_prepacked_adapters_are_mapped_back_with_the_bytes_of_a_fresh_load(tiny_spec, catalog):
    al = leases(tiny_spec, catalog, 8)

    async def run():
        assert await al.prepack(list(catalog)) == 3
        return [await al.lease(catalog.get(n)) for n in ("a0-hf", "a1-nemo", "a2-trtllm")]

    got = asyncio.run(run())
    assert al.store.hits == 3 and al.store.writes == 3
    for name, p in zip(("a0-hf", "a1-nemo", "a2-trtllm"), got, strict=True):
        fresh = pack(formats.load_for_engine(catalog.get(name).path, tiny_spec), tiny_spec.dtype)
        assert torch.equal(p.weights, fresh.weights) and torch.equal(p.config, fresh.config)
    al.close()


def test_a_broken_adapter_found_ahead_is_refused_at_once_with_its_reason(tiny_spec, catalog):
    al = leases(tiny_spec, catalog, 8)
    entry = catalog.get("b-broken")
    asyncio.run(al.prepack(list(catalog)))
    assert catalog.get("b-broken") is None and "b-broken" in catalog.invalid()

    async def lease():
        await al.lease(entry)

    with pytest.raises(AdapterUnavailableError):  # its queued lease still reads it once, and fails the same
        asyncio.run(lease())
    al.close()


# each test adapter is 1/16 of a max-rank one (three good ones); what does not fit is left to its first use,
# and none packed ahead is evicted for another, whichever loader lane finishes first
@pytest.mark.parametrize("store_sixteenths, packed", [(0, 0), (1, 1), (2, 2), (3, 3), (16, 3)])
def test_packing_ahead_packs_what_fits_and_evicts_nothing(tiny_spec, catalog, store_sixteenths, packed):
    al = leases(tiny_spec, catalog, 0)
    if store_sixteenths:
        al.store = PackedStore(tiny_spec.cache_units(1) * store_sixteenths // 16)
    assert asyncio.run(al.prepack(list(catalog))) == packed
    if al.store is not None:
        assert len(al.store) == packed and al.store.used_units <= al.store.capacity_units
    al.close()
