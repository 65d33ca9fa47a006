"""Decode-only steps with adapters as one kernel call (csrc/decode_step.cpp with a DecodeLora) against the same
steps layer by layer through `LlamaModel._forward` (bit for bit: the same kernels in the same order) and the
torch ops with the torch LoraBatch (close): distinct adapters one token each, several tokens each, one adapter
for every row, base rows between, adapters lacking groups or layers, DoRA beside plain LoRA; one and two
threads, the adapters' prefetch on and off."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import TINY_LLAMA
from tests.kernel_checks import DTYPES, KERNELS, close, needs_kernels
from tests.unit.test_fresh_prefill import tiny_model
from trtllm_peft.executor.torch.kv import PagedKVCache
from trtllm_peft.executor.torch.model import Chunk
from trtllm_peft.executor.torch.ops import KernelOps, TorchOps
from trtllm_peft.lora import LoraAdapter, LoraWeights, ModelSpec
from trtllm_peft.lora.modules import DEFAULT_TARGET_MODULES

SPEC = ModelSpec(
    num_layers=TINY_LLAMA["num_hidden_layers"], hidden_size=TINY_LLAMA["hidden_size"],
    num_heads=TINY_LLAMA["num_attention_heads"], num_kv_heads=TINY_LLAMA["num_key_value_heads"],
    head_dim=TINY_LLAMA["head_dim"], intermediate_size=TINY_LLAMA["intermediate_size"],
    vocab_size=TINY_LLAMA["vocab_size"], dtype="float32", max_lora_rank=16,
)  # fmt: skip
ALL = dict.fromkeys(DEFAULT_TARGET_MODULES, 4)


def adapter(seed: int, ranks: dict[str, int], layers=(0, 1, 2), dora: bool = False) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    w = {}
    for layer in layers:
        for m, r in ranks.items():
            d_in, d_out = SPEC.module_dims(m)
            lw = LoraWeights(
                torch.randn(r, d_in, generator=g) / 4, torch.randn(d_out, r, generator=g) / 4, 0.5
            )
            if dora:
                lw = lw.with_tensors(magnitude=1 + 0.3 * torch.randn(d_out, generator=g), normalized=True)
            w[(layer, m)] = lw
    return LoraAdapter(weights=w, format="hf")


EIGHT = [adapter(i, ALL) for i in range(8)]
MIXED = [
    adapter(20, ALL),
    adapter(21, {"attn_q": 8, "attn_v": 2, "mlp_4h_to_h": 5}),  # other ranks, groups missing
    adapter(22, {"attn_dense": 1, "mlp_gate": 3}, layers=(1,)),  # one layer only
    adapter(23, ALL, dora=True),
]
CASES = {  # name: (adapters, each row's adapter index, -1 = base)
    "one token each": (EIGHT, list(range(8))),
    "two tokens each, base between": (EIGHT, [i % 8 for i in range(16)] + [-1, -1]),
    "one adapter, every row": (EIGHT[:1], [0] * 5),
    "one adapter among base rows": (EIGHT, [-1, 3, -1, 3]),
    "groups and layers missing": (MIXED[:3], [0, 1, 2, -1, 2, 1]),
    "dora beside plain and base": (MIXED, [3, 0, -1, 3, 1, 2]),
}


def _steps(model, ops, adapters, rows: list[int], steps: int = 3) -> list[torch.Tensor]:
    """Logits of a prefill of one prompt per row (layer by layer), then of `steps` decode-only steps."""
    a, n, dtype = model.arch, len(rows), model.dtype
    lora = ops.lora_batch([ops.prepare_lora(x, SPEC, dtype, "cpu") for x in adapters], SPEC, dtype, "cpu")
    tables = torch.arange(n * 4, dtype=torch.int32).view(n, 4)  # 16 positions a row
    cache = PagedKVCache(a.num_layers, n * 4, 4, a.num_kv_heads, a.head_dim, dtype, "cpu")
    cache.k.zero_(), cache.v.zero_()
    g = torch.Generator().manual_seed(n)
    lengths = [3 + i % 5 for i in range(n)]
    ids = torch.randint(0, a.vocab_size, (sum(lengths),), generator=g)
    positions = torch.cat([torch.arange(k) for k in lengths])
    owner = torch.tensor([r for r, k in zip(rows, lengths, strict=True) for _ in range(k)])
    chunks = [Chunk(t, 0, k) for t, k in zip(tables, lengths, strict=True)]
    out = [model.step(ids, positions, chunks, None, cache, lora, owner)]
    positions = torch.tensor(lengths)
    for _ in range(steps):
        ids = torch.randint(0, a.vocab_size, (n,), generator=g)
        out.append(model.step(ids, positions, [], tables, cache, lora, torch.tensor(rows)))
        positions = positions + 1
    return out


@pytest.fixture
def paths():
    """(threads, prefetch of the adapters during the base projection) combinations."""
    yield [(t, trail) for t in (1, 2) for trail in (True, False)]
    KERNELS.set_num_threads(0)
    KERNELS.set_lora_trail(True)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_decode_with_adapters_in_one_call_equals_layer_by_layer_and_torch(paths, dtype, case):
    adapters, rows = CASES[case]
    ops = KernelOps(KERNELS)
    model = tiny_model(dtype, ops)
    calls = []
    decoder = model.decoder
    model.decoder = lambda *a: calls.append(len(a)) or decoder(*a)
    plain = _steps(tiny_model(dtype, TorchOps()), TorchOps(), adapters, rows)
    tol = 2e-5 if dtype == torch.float32 else 5e-2
    for threads, trail in paths:
        KERNELS.set_num_threads(threads)
        KERNELS.set_lora_trail(trail)
        model.fuse_lora = True
        one_call = _steps(model, ops, adapters, rows)
        model.fuse_lora = False
        layered = _steps(model, ops, adapters, rows)
        for c, f, p in zip(one_call, layered, plain, strict=True):
            assert c.dtype == torch.float32 and torch.equal(c, f)  # the same kernels, fewer calls
            torch.testing.assert_close(f, p, rtol=tol, atol=tol)
    assert calls == [6] * 3 * len(paths)  # every decode step of the one-call runs went through the decoder
    close(one_call[-1], plain[-1], dtype)


@needs_kernels
def test_a_torch_lora_batch_on_the_kernels_decodes_layer_by_layer():
    """The one-call step takes the grouped batch's plan; the torch LoraBatch (no plan) keeps `_forward`."""
    adapters, rows = CASES["dora beside plain and base"]
    model = tiny_model(torch.float32, KernelOps(KERNELS))
    got = _steps(model, TorchOps(), adapters, rows)
    want = _steps(tiny_model(torch.float32, TorchOps()), TorchOps(), adapters, rows)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=2e-5, atol=2e-5)
