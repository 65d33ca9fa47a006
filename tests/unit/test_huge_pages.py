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
