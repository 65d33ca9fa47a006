"""A layer's parts in one kernel call each (csrc/layer_ops.cpp: norm_linear, mlp_into, decode_attention_into)
against the torch ops they compose, and the model's fused base path against its op-by-op path."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tests.conftest import TINY_LLAMA, tiny_llama_model
from tests.kernel_checks import DTYPES, KERNELS, close, needs_kernels
from tests.unit.test_fresh_prefill import tiny_model
from trtllm_peft.executor.torch.kv import PagedKVCache
from trtllm_peft.executor.torch.model import Chunk, LlamaModel
from trtllm_peft.executor.torch.ops import KernelOps, TorchOps

HIDDEN, INTER, Q, KV = 88, 152, 96, 32  # tails inside a 16-lane step; q: 3 heads, kv: 1 head of 32


def _weights(g, dtype, bias: bool):
    shapes = {
        "qkv": (Q + 2 * KV, HIDDEN),
        "o": (HIDDEN, Q),
        "gate_up": (2 * INTER, HIDDEN),
        "down": (HIDDEN, INTER),
    }
    w = {
        name: (torch.randn(shape, generator=g) / shape[1] ** 0.5).to(dtype) for name, shape in shapes.items()
    }
    b = (torch.randn(Q + 2 * KV, generator=g) / 4).to(dtype) if bias else None
    return w, b, torch.randn(HIDDEN, generator=g).to(dtype), torch.randn(HIDDEN, generator=g).to(dtype)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 8, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_norm_linear_and_mlp_into_equal_the_torch_ops(dtype, rows, bias):
    g = torch.Generator().manual_seed(rows + bias)
    w, b, ln1, ln2 = _weights(g, dtype, bias)
    x = (torch.randn(rows, HIDDEN, generator=g) * 3).to(dtype)
    for ops in (TorchOps(), KernelOps(KERNELS)):
        qkv, gu, down = ops.linear(w["qkv"], b), ops.linear(w["gate_up"]), ops.linear(w["down"])
        got = ops.norm_linear(x, ln1, 1e-5, qkv)
        close(got, qkv(ops.rms_norm(x, ln1, 1e-5)), dtype)
        y, want = x.clone(), x.clone()
        ops.mlp_into(y, ln2, 1e-5, gu, down)
        down.add_to(want, ops.silu_mul(gu(ops.rms_norm(x, ln2, 1e-5))))
        close(y, want, dtype)
        if isinstance(ops, KernelOps):  # the composition is the same calls: bit for bit
            assert torch.equal(got, qkv(ops.rms_norm(x, ln1, 1e-5))) and torch.equal(y, want)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_decode_attention_into_equals_the_torch_ops(dtype, bias):
    """x += o(attention(qkv(norm(x)))) through one kernel call == the torch ops, same cache written."""
    g = torch.Generator().manual_seed(7 + bias)
    w, b, ln1, _ = _weights(g, dtype, bias)
    heads, kv_heads, hd, tpb, rows = 3, 1, 32, 4, 5
    positions = torch.tensor([0, 3, 9, 4, 15])
    tables = torch.randperm(rows * 4, generator=g).view(rows, 4).to(torch.int32)
    angles = torch.outer(torch.arange(16).float(), torch.rand(hd // 2, generator=g))
    cos, sin = (
        torch.cat([angles, angles], -1).cos().to(dtype),
        torch.cat([angles, angles], -1).sin().to(dtype),
    )
    x = torch.randn(rows, HIDDEN, generator=g).to(dtype)
    results = []
    for ops in (TorchOps(), KernelOps(KERNELS)):
        cache = PagedKVCache(2, rows * 4, tpb, kv_heads, hd, dtype, "cpu")
        cache.k.zero_(), cache.v.zero_()
        y = x.clone()
        args = (cos, sin, positions, cache, 1, (heads, kv_heads, hd), tables)
        ops.decode_attention_into(y, ln1, 1e-5, ops.linear(w["qkv"], b), ops.linear(w["o"]), *args)
        results.append((y, cache))
    (want, ref), (got, ker) = results
    close(got, want, dtype)
    close(ker.k, ref.k, dtype)
    close(ker.v, ref.v, dtype)


def _decode(model, steps: int = 3) -> list[torch.Tensor]:
    """Logits of a prefill of 3 prompts (the fused path of every layer but attention), then of `steps`
    decode-only iterations (the whole layer fused)."""
    a, lengths = model.arch, [5, 9, 3]
    tables = torch.arange(12, dtype=torch.int32).view(3, 4)  # 16 positions a sequence
    cache = PagedKVCache(a.num_layers, 12, 4, a.num_kv_heads, a.head_dim, model.dtype, "cpu")
    cache.k.zero_(), cache.v.zero_()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, a.vocab_size, (sum(lengths),), generator=g)
    positions = torch.cat([torch.arange(n) for n in lengths])
    chunks = [Chunk(t, 0, n) for t, n in zip(tables, lengths, strict=True)]
    out = [model.step(ids, positions, chunks, None, cache)]
    positions = torch.tensor(lengths)
    for _ in range(steps):
        ids = torch.randint(0, a.vocab_size, (len(lengths),), generator=g)
        out.append(model.step(ids, positions, [], tables, cache))
        positions = positions + 1
    return out


def _model(dtype, ops, bias: bool) -> LlamaModel:
    """The tiny Llama, or a Qwen2-like one with q/k/v biases."""
    if not bias:
        return tiny_model(dtype, ops)
    cfg = TINY_LLAMA
    arch = replace(tiny_model(dtype, TorchOps()).arch, qkv_bias=True)
    weights = tiny_llama_model(3).state_dict()
    g = torch.Generator().manual_seed(5)
    for i in range(arch.num_layers):
        for n in "qkv":
            rows = weights[f"model.layers.{i}.self_attn.{n}_proj.weight"].shape[0]
            weights[f"model.layers.{i}.self_attn.{n}_proj.bias"] = torch.randn(rows, generator=g) / 4
    return LlamaModel(arch, weights, dtype, "cpu", max_seq_len=cfg["max_position_embeddings"], ops=ops)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_model_decode_fused_equals_op_by_op_and_torch(dtype, bias):
    """Decode-only steps as one call (csrc/decode_step.cpp), as two calls a layer, op by op: bit for bit the same
    logits; and close to the torch ops."""
    model = _model(dtype, KernelOps(KERNELS), bias)
    assert model.fuse and model.decoder is not None
    one_call = _decode(model)
    model.decoder = None
    per_layer = _decode(model)
    model.fuse = False
    op_by_op = _decode(model)
    plain = _decode(_model(dtype, TorchOps(), bias))
    tol = 2e-5 if dtype == torch.float32 else 5e-2
    for c, f, o, p in zip(one_call, per_layer, op_by_op, plain, strict=True):
        # the same kernels, fewer calls
        assert c.dtype == torch.float32 and torch.equal(c, f) and torch.equal(f, o)
        torch.testing.assert_close(f, p, rtol=tol, atol=tol)
