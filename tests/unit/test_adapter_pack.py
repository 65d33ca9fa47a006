"""lora_grouped.prepare_packed (one kernel call, csrc/lora_pack.cpp) against what it replaced: lora_ops.prepare's
dense groups packed array by array (kernels.pack) — the same bytes, for every kind of adapter the engine takes:
float32 and bfloat16 engines, ranks below the adapter's largest (odd ones: bfloat16 pads k pairs), modules or
layers missing, modules the engine lacks, DoRA factors beside plain parts, scales that round, sources in other
dtypes or strided, shapes that leave partial column blocks, and adapters read from each on-disk format."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from tests.kernel_checks import DTYPES, KERNELS, needs_kernels
from trtllm_peft import formats
from trtllm_peft.executor.torch import huge_pages
from trtllm_peft.executor.torch.lora_grouped import prepare_packed
from trtllm_peft.executor.torch.lora_ops import prepare
from trtllm_peft.lora import LoraAdapter, LoraWeights, ModelSpec, pack, unpack
from trtllm_peft.lora.modules import DEFAULT_TARGET_MODULES

pytestmark = needs_kernels

ALL = dict.fromkeys(DEFAULT_TARGET_MODULES, 8)
SPEC = ModelSpec(
    num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
    intermediate_size=96, vocab_size=50, dtype="float32", max_lora_rank=16,
)  # fmt: skip
# odd in-features and partial 16-column blocks; an engine without attn_k (its columns keep a DoRA factor of 1)
ODD = dataclasses.replace(SPEC, hidden_size=63, intermediate_size=88)
NO_K = dataclasses.replace(SPEC, lora_target_modules=tuple(m for m in ALL if m != "attn_k"))


def adapter(ranks, layers=(0, 1), spec=SPEC, scale=0.5, dora=(), dtype=torch.float32, strided=False, seed=0):
    """Random weights per (layer, module); `dora`: the modules that carry a normalized DoRA factor."""
    g = torch.Generator().manual_seed(seed)
    w = {}
    for layer in layers:
        for m, r in ranks.items():
            d_in, d_out = spec.module_dims(m)
            a = torch.randn(r, d_in, generator=g).to(dtype)
            b = (torch.randn(d_out, r, generator=g) * 0.1).to(dtype)
            if strided:  # column-major views, as a transposed checkpoint tensor would be
                a, b = a.t().contiguous().t(), b.t().contiguous().t()
            mag = (1 + 0.3 * torch.randn(d_out, generator=g)).to(dtype) if m in dora else None
            w[(layer, m)] = LoraWeights(a, b, scale, magnitude=mag, normalized=mag is not None)
    return LoraAdapter(weights=w, format="hf")


def from_file(fmt: str):
    def read(tmp_path):
        formats.save(adapter(ALL, scale=16 / math.sqrt(8)), tmp_path / fmt, fmt, SPEC)
        return formats.load_for_engine(tmp_path / fmt, SPEC)

    return read


def engine_rows(dtype):
    def read(_):  # the executor's intake: A and B are views of the request's [N, W] rows (scale 1)
        rows = pack(adapter({"attn_q": 16, "attn_v": 3, "mlp_gate": 7}, dora=("attn_v",)), dtype)
        return unpack(rows.weights, rows.config, SPEC)

    return read


CASES = {  # name: (engine spec, adapter or a function of tmp_path giving one)
    "every module, equal rank": (SPEC, adapter(ALL)),
    "ranks below the largest, modules missing": (SPEC, adapter({"attn_q": 16, "attn_v": 2, "attn_dense": 5})),
    "one layer, odd largest rank": (SPEC, adapter({"attn_dense": 1, "mlp_gate": 3}, layers=(1,))),
    "dora beside plain parts": (SPEC, adapter(ALL, dora=("attn_k", "mlp_gate", "attn_dense"))),
    "scale that rounds": (SPEC, adapter(ALL, scale=16 / math.sqrt(5))),
    "float16 sources": (SPEC, adapter(ALL, scale=0.3, dora=("attn_q",), dtype=torch.float16)),
    "bfloat16 sources": (SPEC, adapter(ALL, scale=0.3, dora=("mlp_4h_to_h",), dtype=torch.bfloat16)),
    "float64 sources": (SPEC, adapter(ALL, scale=0.3, dora=("attn_v",), dtype=torch.float64)),
    "strided sources": (SPEC, adapter({"attn_q": 4, "mlp_h_to_4h": 6}, strided=True)),
    "odd in-features, partial blocks": (ODD, adapter({**ALL, "attn_q": 5}, spec=ODD, dora=("mlp_4h_to_h",))),
    "module the engine lacks, dora gap": (NO_K, adapter(ALL, dora=tuple(DEFAULT_TARGET_MODULES))),
    "PEFT file": (SPEC, from_file("hf")),
    "NeMo file": (SPEC, from_file("nemo")),
    "TensorRT-LLM .npy": (SPEC, from_file("trtllm")),
}


def reference(source, spec, dtype) -> dict:
    """Session 11's prepare_packed: the dense layout, each array packed (the DoRA factor as float32)."""
    dense = prepare(source, spec, dtype, "cpu")
    return {
        key: [KERNELS.pack(g.a.reshape(-1, g.a.shape[2]))]
        + [KERNELS.pack(bt.t().contiguous()) for bt in g.bt]
        + ([] if g.mag is None else [g.mag.float()])
        for key, g in dense.groups.items()
    }


def check(source, spec, dtype) -> None:
    got, want = prepare_packed(KERNELS, source, spec, dtype, "cpu"), reference(source, spec, dtype)
    assert got.groups.keys() == want.keys() and got.width == source.max_rank
    assert got.rank_units == sum(w.rank for _, w in source)
    for key, g in got.groups.items():
        arrays = [g.a, *g.b, *([] if g.mag is None else [g.mag])]
        assert len(arrays) == len(want[key]), key
        for x, y in zip(arrays, want[key], strict=True):
            assert x.dtype == y.dtype and x.shape == y.shape, key
            assert torch.equal(x.view(torch.uint8), y.view(torch.uint8)), key  # bit for bit, -0.0 and all
            assert x.is_contiguous() and x.data_ptr() % huge_pages.ALIGN == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_prepare_packed_writes_the_bytes_of_the_dense_layout_packed(case, dtype, tmp_path):
    spec, source = CASES[case]
    check(source(tmp_path) if callable(source) else source, spec, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_engines_rows_pack_as_their_dense_layout(dtype):
    check(engine_rows(dtype)(None), SPEC, dtype)


@pytest.mark.parametrize(
    ("at", "message"),
    [([0, 0, 0, 64] + [0, 128] * 8, "overlap"), ([0, 0], "fewer slots"), ([5, 0] * 10, "no such page")],
)
def test_bad_slots_are_refused(at, message):
    w = adapter({"attn_q": 4}, layers=(0,)).weights[(0, "attn_q")]
    page = torch.zeros(huge_pages.HUGE_PAGE, dtype=torch.uint8)
    none = [None, None]
    with pytest.raises(RuntimeError, match=message):  # qkv: A then three B
        KERNELS.pack_adapter([page], at, torch.float32, 4, [3, 64, 128], [0, 64, 64, 32, 96, 32],
                             [w.a, None, None], [w.b, *none], [1.0] * 3, [None, *none])  # fmt: skip
