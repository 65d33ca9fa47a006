"""The chunk-attention kernel (csrc/attend_chunk.cpp) against the torch ops it replaces (ops.TorchOps.attend_chunk):
float32 lanes, and bfloat16 pairs on vdpbf16ps (csrc/attend_pairs.h), over head sizes whose lanes end in a
partial vector, partial blocks, and a cache whose slots outside the sequence hold NaN (a kernel that read one
would show it: 0 · NaN is NaN)."""

from __future__ import annotations

import pytest
import torch

from tests.kernel_checks import DTYPES, KERNELS, close, needs_kernels
from trtllm_peft.executor.torch.kv import PagedKVCache
from trtllm_peft.executor.torch.ops import KernelOps, TorchOps


def poison_outside(cache: PagedKVCache, table: torch.Tensor, end: int) -> None:
    """NaN in every slot but the sequence's positions 0..end-1."""
    tpb = cache.k.shape[3]
    keep = torch.zeros(cache.k.shape[1], tpb, dtype=torch.bool)  # [num_blocks, tpb]
    for p in range(end):
        keep[table[p // tpb], p % tpb] = True
    for t in (cache.k, cache.v):
        t[0].permute(0, 2, 1, 3)[~keep] = float("nan")  # [num_blocks, tpb, kv, hd] view


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tpb", [4, 7, 32])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(9, 3, 64), (4, 1, 80), (3, 3, 34)])
@pytest.mark.parametrize(("start", "n"), [(32, 1), (37, 24), (5, 60), (0, 9), (700, 17), (0, 45)])
def test_attend_chunk_equals_torch_causal_over_the_cached_prefix(
    dtype, tpb, heads, kv_heads, head_dim, start, n
):
    """A prompt chunk after cached positions (reuse, chunked prefill) or from position 0 (a fresh prefill): the
    blocked kernel (tiles of rows per kv head, several tiles and partial blocks here) against SDPA over the
    gathered blocks; odd key counts in a block leave the last key pair half empty in bfloat16."""
    g = torch.Generator().manual_seed(start * 100 + n + head_dim)
    width = -(-(start + n) // tpb)
    table = torch.randperm(width + 4, generator=g)[:width].to(torch.int32)
    qkv = torch.randn(n, (heads + 2 * kv_heads) * head_dim, generator=g).to(dtype)
    angles = torch.outer(torch.arange(start + n).float(), torch.rand(head_dim // 2, generator=g))
    cos, sin = (
        torch.cat([angles, angles], -1).cos().to(dtype),
        torch.cat([angles, angles], -1).sin().to(dtype),
    )
    caches = [PagedKVCache(1, width + 4, tpb, kv_heads, head_dim, dtype, "cpu") for _ in range(2)]
    caches[0].k.copy_(torch.randn(caches[0].k.shape, generator=g))  # the cached prefix
    caches[0].v.copy_(torch.randn(caches[0].v.shape, generator=g))
    poison_outside(caches[0], table, start)
    caches[1].k.copy_(caches[0].k)
    caches[1].v.copy_(caches[0].v)
    positions = torch.arange(start, start + n)
    shape = (heads, kv_heads, head_dim)
    want = TorchOps().attend_chunk(qkv, cos, sin, positions, caches[0], 0, shape, table)
    got = KernelOps(KERNELS).attend_chunk(qkv, cos, sin, positions, caches[1], 0, shape, table)
    assert torch.isfinite(got.float()).all()
    close(got, want, dtype)
    close(caches[1].k.nan_to_num(), caches[0].k.nan_to_num(), dtype)
    torch.testing.assert_close(caches[1].v, caches[0].v, rtol=0, atol=0, equal_nan=True)
