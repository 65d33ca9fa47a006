"""huge_pages: 2 MiB-aligned, usable memory that outlives its mapping object; the model's packed weights and the
KV pool placed there compute what they did."""

from __future__ import annotations

import gc

import pytest
import torch

from tests.kernel_checks import KERNELS, needs_kernels
from trtllm_peft.executor.torch import huge_pages
from trtllm_peft.executor.torch.kv import PagedKVCache


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [
        ((3,), torch.float32),
        ((5, 7), torch.bfloat16),
        ((2, 1024, 1024), torch.float32),
        ((0, 4), torch.int64),
    ],
)
def test_empty_is_aligned_writable_and_keeps_its_mapping(shape, dtype):
    t = huge_pages.empty(shape, dtype)
    assert t.shape == shape and t.dtype == dtype and t.is_contiguous()
    assert t.data_ptr() % huge_pages.HUGE_PAGE == 0 or t.numel() == 0
    t.fill_(3)
    gc.collect()  # the mmap object is referenced only through the tensor
    assert bool((t == 3).all())


def test_an_arena_places_copies_side_by_side_each_on_a_cache_line():
    g = torch.Generator().manual_seed(0)
    src = [
        torch.randn(5, 3, generator=g),
        torch.randn(7, generator=g).to(torch.bfloat16),
        torch.randn(2, 2, 9),
    ]
    arena = huge_pages.Arena(chunk=4096)
    placed = [arena.place(t) for t in src] + [arena.place(torch.ones(600_000))]  # 2.4 MB: a new mapping
    want = [t.clone() for t in src]
    del src
    gc.collect()  # the copies do not depend on the originals
    assert (
        placed[0].data_ptr() % huge_pages.HUGE_PAGE == 0 and placed[3].data_ptr() % huge_pages.HUGE_PAGE == 0
    )
    assert (
        placed[1].data_ptr() == placed[0].data_ptr() + 64
        and placed[2].data_ptr() == placed[1].data_ptr() + 64
    )
    for p, w in zip(placed, want, strict=False):
        assert p.is_contiguous() and p.dtype == w.dtype and torch.equal(p, w)
    assert bool((placed[3] == 1).all())


def test_the_kv_pool_lies_on_huge_page_memory():
    c = PagedKVCache(2, 8, 4, 2, 16, torch.bfloat16, "cpu")
    assert c.k.data_ptr() % huge_pages.HUGE_PAGE == 0 and c.v.data_ptr() % huge_pages.HUGE_PAGE == 0
    c.clear([0, 3])
    assert not c.k[:, [0, 3]].any()


@needs_kernels
def test_kernel_linears_are_placed_and_compute_the_same():
    from trtllm_peft.executor.torch.ops import KernelOps

    ops = KernelOps(KERNELS)
    g = torch.Generator().manual_seed(1)
    ws = [torch.randn(40, 24, generator=g), torch.randn(16, 24, generator=g)]
    linears = [ops.linear(w) for w in ws]
    x = torch.randn(3, 24, generator=g)
    before = [lin(x) for lin in linears]
    ops.place_weights(linears)
    assert linears[0].packed.data_ptr() % huge_pages.HUGE_PAGE == 0
    for lin, want in zip(linears, before, strict=True):
        assert torch.equal(lin(x), want)


def test_a_pool_page_is_reused_only_once_no_tensor_lies_on_it():
    pool = huge_pages.PagePool(keep=4)
    a, b = pool.take(), pool.take()
    assert len(pool) == 2 and a.numel() == huge_pages.HUGE_PAGE
    assert a.data_ptr() % huge_pages.HUGE_PAGE == 0 and a.data_ptr() != b.data_ptr()
    view, freed = b[100:200].view(torch.int32), a.data_ptr()
    del a, b  # a's page is unused now; b's is still under `view`
    gc.collect()
    c = pool.take()
    assert c.data_ptr() == freed and len(pool) == 2
    assert pool.take().data_ptr() not in (freed, view.data_ptr() - 100) and len(pool) == 3
    view.fill_(7)  # the page stayed mapped for it
    assert bool((view == 7).all())


def test_a_pool_keeps_at_most_keep_unused_pages_and_reserve_makes_them_resident_up_front():
    pool = huge_pages.PagePool(keep=1)
    pages = [pool.take() for _ in range(3)]
    del pages
    gc.collect()
    pool.take()  # sees 3 unused, keeps 1 (and hands it out), unmaps 2
    assert len(pool) == 1
    pool.reserve(5 * huge_pages.HUGE_PAGE - 1)
    assert len(pool) == 5 and pool.keep == 5
    pool.reserve(huge_pages.HUGE_PAGE)  # never shrinks
    assert len(pool) == 5 and pool.keep == 5


@pytest.mark.parametrize("numel", [1000, 300_000, 600_000])  # 4 KB, 1.2 MB, 2.4 MB (over a page)
def test_an_arena_on_a_pool_places_on_its_pages_and_larger_tensors_on_their_own(numel):
    pool = huge_pages.PagePool()
    arena = huge_pages.Arena(pool=pool)
    src = [torch.arange(numel, dtype=torch.float32), torch.arange(numel, dtype=torch.float32) * 2]
    placed = [arena.place(t) for t in src]
    on_pages = numel * 4 <= huge_pages.HUGE_PAGE
    # two 1.2 MB copies do not share a page; two 4 KB ones do; 2.4 MB ones come from mappings of their own
    assert len(pool) == {1000: 1, 300_000: 2, 600_000: 0}[numel] and on_pages == (len(pool) > 0)
    for p, t in zip(placed, src, strict=True):
        assert p.data_ptr() % huge_pages.ALIGN == 0 and torch.equal(p, t)


def test_arena_slots_are_where_place_would_put_them():
    """Arena.slots (csrc/lora_pack.cpp writes there): in order, each on a cache line, a new page when one is full."""
    mib = 1 << 20
    maps, at = huge_pages.Arena(pool=huge_pages.PagePool()).slots([mib + 1, mib // 2, mib, 3])
    assert len(maps) == 2 and all(m.numel() == huge_pages.HUGE_PAGE for m in maps)
    assert at == [0, 0, 0, mib + 64, 1, 0, 1, mib]


class _Ops:
    def __init__(self):
        self.reserved = []

    def reserve_adapters(self, nbytes: int) -> None:
        self.reserved.append(nbytes)


TIER = 1000 * 8 * (16 + 24) * 4  # rank-units x bytes of one (the widest module: 16 in + 24 out, float32)


@pytest.mark.parametrize(
    ("device", "planned", "want"),
    [("cpu", 10**12, [TIER]), ("cpu", 5000, [5000]), ("cpu", 0, [0]), ("meta", 10**12, [])],
)
def test_the_batch_reserves_its_device_tier_up_front_on_the_cpu_within_the_plan(device, planned, want):
    from trtllm_peft.executor.torch.batch_lora import BatchLora
    from trtllm_peft.executor.torch.peft_cache import PeftCache
    from trtllm_peft.lora.spec import ModelSpec

    spec = ModelSpec(num_layers=2, hidden_size=16, num_heads=4, num_kv_heads=2, head_dim=4, intermediate_size=24,
                     vocab_size=50, dtype="float32", max_lora_rank=8)  # fmt: skip
    ops = _Ops()
    BatchLora(PeftCache(2000, 1000 * 8), ops, spec, torch.float32, device, planned)
    assert ops.reserved == want  # a tier larger than the memory plan's (e.g. "unbounded") gets the plan's
