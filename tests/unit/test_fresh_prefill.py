"""A prefill's fresh chunks (nothing cached before them): the fresh_qkv kernel (csrc/attend_chunk.cpp: RoPE of q
and k + the K/V cache write in one pass) against the torch ops it replaces (model.py `_split_rope` +
`PagedKVCache.put`), and the model's prefill through it against the torch path and plain TorchOps."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import TINY_LLAMA, tiny_llama_model
from trtllm_peft.engine.engine_dir import ArchConfig
from trtllm_peft.executor.torch import cpu_kernels
from trtllm_peft.executor.torch.kv import PagedKVCache
from trtllm_peft.executor.torch.model import Chunk, LlamaModel, plan_fresh
from trtllm_peft.executor.torch.ops import KernelOps, TorchOps, rope

KERNELS = cpu_kernels.load()
needs_kernels = pytest.mark.skipif(KERNELS is None, reason=f"CPU kernels: {cpu_kernels.why_unavailable()}")
DTYPES = [torch.float32, torch.bfloat16]
# float32: the kernel's products may be fused (one rounding fewer); bfloat16: one rounding step of the output
TOL = {torch.float32: 2e-6, torch.bfloat16: 1e-2}


def tables_for(lengths: list[int], tpb: int, g: torch.Generator) -> list[torch.Tensor]:
    """One block table per chunk, blocks drawn at random from one pool (scattered, never shared)."""
    widths = [-(-n // tpb) for n in lengths]
    pool = torch.randperm(sum(widths) + 3, generator=g).to(torch.int32)
    out, off = [], 0
    for w in widths:
        out.append(pool[off : off + w])
        off += w
    return out


def rope_tables(length: int, hd: int, dtype, g: torch.Generator):
    angles = torch.outer(torch.arange(length).float(), torch.rand(hd // 2, generator=g) * 3)
    emb = torch.cat([angles, angles], -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tpb", [4, 32])
@pytest.mark.parametrize(
    ("lengths", "shape"),
    [
        ([1], (9, 3, 64)),  # one token
        ([5], (9, 3, 64)),  # a partial block
        ([512], (9, 3, 64)),  # bench/engine.py's prefill (rows split over the threads)
        ([33, 33, 33], (9, 3, 64)),  # several prompts of one length (one SDPA group)
        ([7, 20, 7], (4, 2, 8)),  # head_dim 8: a masked half-vector
        ([130], (2, 1, 34)),  # head_dim 34: one full and one partial vector per half
    ],
)
def test_fresh_qkv_equals_torch_rope_and_put(dtype, tpb, lengths, shape):
    heads, kv_heads, hd = shape
    g = torch.Generator().manual_seed(sum(lengths) * 7 + hd)
    n = sum(lengths)
    qkv = torch.randn(n, (heads + 2 * kv_heads) * hd + 5, generator=g).to(dtype)[:, 5:]  # a column slice
    cos, sin = rope_tables(max(lengths), hd, dtype, g)
    positions = torch.cat([torch.arange(m) for m in lengths])
    tables = tables_for(lengths, tpb, g)
    caches = [
        PagedKVCache(2, sum(t.numel() for t in tables) + 3, tpb, kv_heads, hd, dtype, "cpu") for _ in "ab"
    ]
    for c in caches:
        c.k.copy_(torch.arange(c.k.numel()).view(c.k.shape))  # stale values: unwritten slots must stay
        c.v.copy_(-c.k)
    rows = torch.cat([caches[0].rows(t, 0, m) for t, m in zip(tables, lengths, strict=True)])

    c_, s_ = cos[positions][:, None, :], sin[positions][:, None, :]
    want = rope(qkv[:, : (heads + kv_heads) * hd].reshape(n, heads + kv_heads, hd), c_, s_)
    v = qkv[:, (heads + kv_heads) * hd :].reshape(n, kv_heads, hd)
    caches[0].put(1, rows, want[:, heads:], v)
    got = KERNELS.fresh_qkv(qkv, cos, sin, positions, caches[1].k[1], caches[1].v[1], rows, *shape)

    assert got.shape == (n, heads + kv_heads, hd) and got.is_contiguous()
    tol = TOL[dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    torch.testing.assert_close(caches[1].k, caches[0].k, rtol=tol, atol=tol)  # k rotated, stale slots kept
    assert torch.equal(caches[1].v, caches[0].v)  # v copied


def _bad(**change):
    args = dict(
        qkv=torch.randn(4, (2 + 2) * 8),
        cos=torch.randn(16, 8),
        sin=torch.randn(16, 8),
        positions=torch.arange(4),
        kc=torch.zeros(3, 1, 4, 8),
        vc=torch.zeros(3, 1, 4, 8),
        rows=torch.arange(4),
        num_heads=2,
        num_kv_heads=1,
        head_dim=8,
    )
    args.update(change)
    return list(args.values())


@needs_kernels
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (_bad(), None),
        (_bad(qkv=torch.randn(4, 33)), "qkv must be"),
        (_bad(qkv=torch.randn(32, 4).t()), "contiguous rows"),
        (_bad(positions=torch.arange(4, dtype=torch.int32)), "positions must be int64"),
        (_bad(positions=torch.arange(3)), "positions must be int64"),
        (_bad(positions=torch.tensor([0, 1, 2, 16])), "bad position"),
        (_bad(rows=torch.tensor([0, 1, 2, 12])), "bad row"),
        (_bad(rows=torch.tensor([0, 1, -1, 2])), "bad row"),
        (_bad(rows=torch.arange(5)), "rows must be int64"),
        (_bad(kc=torch.zeros(3, 2, 4, 8), vc=torch.zeros(3, 2, 4, 8)), "cache must be"),
        (_bad(qkv=torch.randn(4, 32, dtype=torch.bfloat16)), "must have one dtype"),
        (
            _bad(
                **{k: torch.zeros(3, 1, 4, 8, dtype=torch.float64) for k in ("kc", "vc")},
                **{k: torch.randn(16, 8, dtype=torch.float64) for k in ("cos", "sin")},
                qkv=torch.randn(4, 32, dtype=torch.float64),
            ),
            "float32 or bfloat16",
        ),  # fmt: skip
    ],
)
def test_fresh_qkv_refuses_bad_arguments(args, message):
    if message is None:
        assert KERNELS.fresh_qkv(*args).shape == (4, 3, 8)
        return
    with pytest.raises(RuntimeError, match=message):
        KERNELS.fresh_qkv(*args)


def tiny_model(dtype, ops) -> LlamaModel:
    cfg = TINY_LLAMA
    arch = ArchConfig(
        num_layers=cfg["num_hidden_layers"],
        hidden_size=cfg["hidden_size"],
        num_heads=cfg["num_attention_heads"],
        num_kv_heads=cfg["num_key_value_heads"],
        head_dim=cfg["head_dim"],
        intermediate_size=cfg["intermediate_size"],
        vocab_size=cfg["vocab_size"],
    )
    weights = tiny_llama_model(3).state_dict()
    return LlamaModel(arch, weights, dtype, "cpu", max_seq_len=cfg["max_position_embeddings"], ops=ops)


def prefill(model: LlamaModel, lengths: list[int], tpb: int = 4) -> tuple[torch.Tensor, PagedKVCache]:
    """Logits of every chunk's last token [len(lengths), V] of one iteration prefilling fresh prompts."""
    g = torch.Generator().manual_seed(sum(lengths))
    a = model.arch
    tables = tables_for(lengths, tpb, g)
    cache = PagedKVCache(a.num_layers, sum(t.numel() for t in tables) + 3, tpb, a.num_kv_heads, a.head_dim,
                         model.dtype, "cpu")  # fmt: skip
    cache.k.zero_(), cache.v.zero_()
    ids = torch.randint(0, a.vocab_size, (sum(lengths),), generator=g)
    positions = torch.cat([torch.arange(n) for n in lengths])
    chunks = [Chunk(t, 0, n) for t, n in zip(tables, lengths, strict=True)]
    return model.step(ids, positions, chunks, None, cache), cache


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("lengths", "whole"),
    [([1], True), ([37], True), ([9, 9], True), ([5, 12, 5], False), ([12, 5], False)],
)
def test_model_prefill_routes_agree(dtype, lengths, whole):
    """Fresh chunks through SDPA after the fresh_qkv kernel, through SDPA after the torch ops it replaces, and
    through the chunk-attention kernel (the default, but for bfloat16 on AMX): the same logits and cache, and
    within tolerance of plain TorchOps. One prompt or several, one length (no gather) or mixed lengths (gather
    and scatter)."""
    g = torch.Generator().manual_seed(0)
    tables = tables_for(lengths, 4, g)
    assert plan_fresh([Chunk(t, 0, n) for t, n in zip(tables, lengths, strict=True)], PagedKVCache(
        1, 64, 4, 1, 2, torch.float32, "cpu")).whole is whole  # fmt: skip
    model = tiny_model(dtype, KernelOps(KERNELS))
    kernel = model.fresh_kernel
    assert kernel is not None
    assert model.fresh_sdpa is (dtype == torch.bfloat16 and KERNELS.amx_available())
    results = {}
    for route, sdpa, fresh_kernel in [("kernel+sdpa", True, kernel), ("torch+sdpa", True, None),
                                      ("attend_chunk", False, kernel)]:  # fmt: skip
        model.fresh_sdpa, model.fresh_kernel = sdpa, fresh_kernel
        results[route] = prefill(model, lengths)
    plain, _ = prefill(tiny_model(dtype, TorchOps()), lengths)
    tol = 2e-5 if dtype == torch.float32 else 5e-2
    want, want_cache = results["torch+sdpa"]
    for route, (got, cache) in results.items():
        torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=route)
        torch.testing.assert_close(cache.k, want_cache.k, rtol=tol, atol=tol, msg=route)
        torch.testing.assert_close(cache.v, want_cache.v, rtol=tol, atol=tol, msg=route)
        torch.testing.assert_close(got, plain, rtol=tol, atol=tol, msg=route)
