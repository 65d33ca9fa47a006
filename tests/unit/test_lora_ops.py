"""Mixed-adapter LoRA against a naive per-token loop: y[t] += B_{s[t]} (A_{s[t]} x[t]) per part, or nothing
for base. Both implementations: lora_ops.LoraBatch (TorchOps, dense masked ops) and lora_grouped (KernelOps,
per adapter segment in the CPU kernels)."""

from __future__ import annotations

import pytest
import torch

from trtllm_peft.executor.torch import cpu_kernels
from trtllm_peft.executor.torch.lora_ops import GROUPS, part_slices
from trtllm_peft.executor.torch.ops import KernelOps, TorchOps
from trtllm_peft.lora import LoraAdapter, LoraWeights, ModelSpec
from trtllm_peft.lora.modules import DEFAULT_TARGET_MODULES

SPEC = ModelSpec(
    num_layers=2,
    hidden_size=16,
    num_heads=4,
    num_kv_heads=2,
    head_dim=4,
    intermediate_size=24,
    vocab_size=50,
    dtype="float32",
    max_lora_rank=8,
)


def adapter(seed: int, ranks: dict[str, int], layers=(0, 1), scale: float = 0.5) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    w = {}
    for layer in layers:
        for m, r in ranks.items():
            d_in, d_out = SPEC.module_dims(m)
            w[(layer, m)] = LoraWeights(
                torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g), scale
            )
    return LoraAdapter(weights=w, format="hf")


ADAPTERS = [
    adapter(1, dict.fromkeys(DEFAULT_TARGET_MODULES, 4)),
    adapter(2, {"attn_q": 8, "attn_v": 2}, scale=2.0),  # subset of modules, mixed ranks
    adapter(3, {"mlp_gate": 3, "mlp_4h_to_h": 5, "attn_dense": 1}, layers=(1,)),  # one layer only
]


@pytest.fixture(params=["torch", "kernels"])
def ops(request):
    if request.param == "torch":
        return TorchOps()
    kernels = cpu_kernels.load()
    if kernels is None:
        pytest.skip(f"CPU kernels: {cpu_kernels.why_unavailable()}")
    return KernelOps(kernels)


def batch_of(ops, adapters, dtype=torch.float32):
    return ops.lora_batch([ops.prepare_lora(a, SPEC, dtype, "cpu") for a in adapters], SPEC, dtype, "cpu")


def naive(
    x: torch.Tensor, token_adapter: list[int], layer: int, group: str, adapters=ADAPTERS
) -> torch.Tensor:
    """Per token, per module: scale · B (A x) into the module's output columns."""
    width = {"qkv": 16 + 2 * 8, "o": 16, "gate_up": 48, "down": 16}[group]
    y = torch.zeros(x.shape[0], width, dtype=torch.float64)
    for t, j in enumerate(token_adapter):
        if j < 0:
            continue
        for m, sl in part_slices(SPEC)[group]:
            w = adapters[j].weights.get((layer, m))
            if w is not None:
                y[t, sl] += (w.b.double() @ (w.a.double() @ x[t].double())) * w.scale
    return y


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize(
    "token_adapter", [[0, 1, 2, -1, 1, 0], [2, 2, 2], [-1, -1], [1], [0] * 11 + [2, -1, 1] * 3]
)
def test_batched_ops_equal_a_naive_loop(ops, group, token_adapter):
    batch = batch_of(ops, ADAPTERS)
    mask = batch.mask(torch.tensor(token_adapter))
    d_in = 24 if group == "down" else 16
    x = torch.randn(len(token_adapter), d_in)
    for layer in range(SPEC.num_layers):
        want = naive(x, token_adapter, layer, group)
        y = torch.zeros_like(want, dtype=torch.float32)
        batch.apply_group(layer, group, x, y, mask)
        torch.testing.assert_close(y.double(), want, atol=1e-4, rtol=1e-4)


EQUAL_RANK = [  # one token each: the kernels stream these adapters side by side (lora.cpp single tokens)
    adapter(4, dict.fromkeys(DEFAULT_TARGET_MODULES, 4)),
    adapter(5, {"attn_q": 4, "mlp_gate": 2, "mlp_4h_to_h": 3}),  # width 4, some modules lower or absent
    adapter(6, dict.fromkeys(DEFAULT_TARGET_MODULES, 4), layers=(1,)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("token_adapter", [[2, 0, 1], [1, -1, 0, 2], [0, 1]])
def test_one_token_per_adapter_of_equal_rank_equals_a_naive_loop(ops, dtype, group, token_adapter):
    batch = batch_of(ops, EQUAL_RANK, dtype)
    mask = batch.mask(torch.tensor(token_adapter))
    x = torch.randn(len(token_adapter), 24 if group == "down" else 16).to(dtype)
    for layer in range(SPEC.num_layers):
        want = naive(x.float(), token_adapter, layer, group, EQUAL_RANK)
        y = torch.zeros_like(want, dtype=dtype)
        batch.apply_group(layer, group, x, y, mask)
        tol = 1e-4 if dtype == torch.float32 else 0.03 * float(want.abs().max().clamp(min=1))
        torch.testing.assert_close(y.double(), want, atol=tol, rtol=1e-4 if dtype == torch.float32 else 0.02)


def test_one_adapter_alone_needs_no_mask(ops):
    batch = batch_of(ops, ADAPTERS[:1])
    assert batch.mask(torch.zeros(5, dtype=torch.long)) is None
    x = torch.randn(5, 16)
    y = torch.zeros(5, 32)
    batch.apply_group(0, "qkv", x, y, None)
    torch.testing.assert_close(y.double(), naive(x, [0] * 5, 0, "qkv"), atol=1e-4, rtol=1e-4)


def test_a_batch_of_one_adapter_has_its_width_and_unit_cost(ops):
    t = ops.prepare_lora(ADAPTERS[1], SPEC, torch.float32, "cpu")
    assert t.width == 8 and t.rank_units == 2 * (8 + 2)
    batch = ops.lora_batch([t], SPEC, torch.float32, "cpu")
    assert set(batch.groups) == {(0, "qkv"), (1, "qkv")}  # no work for groups the adapter lacks


def test_bfloat16_ops_stay_close_to_float64(ops):
    batch = batch_of(ops, ADAPTERS, torch.bfloat16)
    tok = [0, 1, 2, -1]
    x = torch.randn(4, 16)
    y = torch.zeros(4, 48, dtype=torch.bfloat16)
    batch.apply_group(1, "gate_up", x.bfloat16(), y, batch.mask(torch.tensor(tok)))
    want = naive(x, tok, 1, "gate_up")
    assert (y.double() - want).abs().max() < 0.05 * want.abs().max()


def dora(a: LoraAdapter, seed: int, skip: tuple[str, ...] = ()) -> LoraAdapter:
    """`a` with a normalized DoRA factor around 1 on every module but `skip` (rows stay plain LoRA there)."""
    g = torch.Generator().manual_seed(seed)
    w = {
        k: v
        if k[1] in skip
        else v.with_tensors(magnitude=1 + 0.5 * torch.randn(v.out_features, generator=g), normalized=True)
        for k, v in a
    }
    return a.with_weights(w)


DORA_MIX = [dora(ADAPTERS[0], 7), ADAPTERS[1], dora(ADAPTERS[2], 8, skip=("mlp_gate",))]


def naive_dora(x, base, bias, token_adapter, layer, group, adapters=DORA_MIX) -> torch.Tensor:
    """PEFT's DoRA per token: g ⊙ (W x + Σ s·B·A x) + bias, g = 1 outside DoRA modules (x·Wᵀ given as `base`)."""
    y = base.double() + naive(x, token_adapter, layer, group, adapters)
    for t, j in enumerate(token_adapter):
        for m, sl in part_slices(SPEC)[group]:
            w = adapters[j].weights.get((layer, m)) if j >= 0 else None
            if w is not None and w.is_dora:
                y[t, sl] *= w.magnitude.double()
    return y + (0 if bias is None else bias.double())


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("token_adapter", [[0, 1, 2, -1, 1, 0], [2, 2], [0] * 5, [1, -1], [0, 2, 1]])
def test_dora_rows_beside_lora_rows_equal_peft_math(ops, group, token_adapter):
    """y must hold W x + bias alone when scales(): apply_group adds the deltas, then rescales DoRA tokens."""
    batch = batch_of(ops, DORA_MIX)
    mask = batch.mask(torch.tensor(token_adapter))
    d_in, width = (24 if group == "down" else 16), {"qkv": 32, "o": 16, "gate_up": 48, "down": 16}[group]
    x = torch.randn(len(token_adapter), d_in)
    bias = torch.randn(width) if group == "qkv" else None  # Qwen2's q/k/v bias stays unscaled, as in PEFT
    for layer in range(SPEC.num_layers):
        base = torch.randn(len(token_adapter), width)
        y = base + (0 if bias is None else bias)
        assert batch.scales(layer, group) == any(
            DORA_MIX[j].weights.get((layer, m)) is not None and DORA_MIX[j].weights[(layer, m)].is_dora
            for j in range(3)
            for m, _ in part_slices(SPEC)[group]
        )
        batch.apply_group(layer, group, x, y, mask, bias)
        want = naive_dora(x, base, bias, token_adapter, layer, group)
        torch.testing.assert_close(y.double(), want, atol=1e-4, rtol=1e-4)


def test_plain_rows_stay_bit_for_bit_when_a_dora_adapter_shares_the_batch(ops):
    """The same batch with the second adapter's magnitudes dropped: the first adapter's rows are identical."""
    x, y0, bias, tokens = torch.randn(3, 16), torch.randn(3, 32), torch.randn(32), torch.tensor([0, 0, 1])
    with_dora, without = batch_of(ops, [ADAPTERS[1], DORA_MIX[0]]), batch_of(ops, [ADAPTERS[1], ADAPTERS[0]])
    want, got = y0.clone(), y0.clone()
    without.apply_group(0, "qkv", x, want, without.mask(tokens), bias)
    with_dora.apply_group(0, "qkv", x, got, with_dora.mask(tokens), bias)
    assert torch.equal(got[:2], want[:2]) and not torch.equal(got[2], want[2])
