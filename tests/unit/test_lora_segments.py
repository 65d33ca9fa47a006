"""Mixed-adapter LoRA in the CPU kernels (csrc/lora.cpp, per adapter segment) against the pure-torch LoraBatch
(lora_ops.py, itself held to a naive per-token loop in test_lora_ops.py), over the shapes of batch the kernels
take different paths for: one token per adapter (streamed side by side), segments of several rows (AMX for
LoRA-A from 8 rows in bfloat16), ranks that differ, adapters lacking a module or a layer, base tokens in
between, DoRA rows, one or two threads. Tolerances as tests/unit/test_cpu_kernels.py.
"""

from __future__ import annotations

import pytest
import torch

from tests.kernel_checks import REL
from trtllm_peft.executor.torch import cpu_kernels
from trtllm_peft.executor.torch.lora_ops import GROUPS
from trtllm_peft.executor.torch.ops import KernelOps, TorchOps
from trtllm_peft.lora import LoraAdapter, LoraWeights, ModelSpec
from trtllm_peft.lora.modules import DEFAULT_TARGET_MODULES

KERNELS = cpu_kernels.load()
pytestmark = pytest.mark.skipif(KERNELS is None, reason=f"CPU kernels: {cpu_kernels.why_unavailable()}")
# hidden 64 / intermediate 96: K a multiple of 32, so bfloat16 segments of >= 16 rows take AMX where present
SPEC = ModelSpec(
    num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
    intermediate_size=96, vocab_size=50, dtype="float32", max_lora_rank=16,
)  # fmt: skip
ALL = dict.fromkeys(DEFAULT_TARGET_MODULES, 8)


def adapter(seed: int, ranks: dict[str, int], layers=(0, 1), dora: bool = False) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    w = {}
    for layer in layers:
        for m, r in ranks.items():
            d_in, d_out = SPEC.module_dims(m)
            lw = LoraWeights(torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g) * 0.1, 0.5)
            if dora:  # a normalized DoRA factor around 1 (what lora/dora.py leaves after load)
                lw = lw.with_tensors(magnitude=1 + 0.3 * torch.randn(d_out, generator=g), normalized=True)
            w[(layer, m)] = lw
    return LoraAdapter(weights=w, format="hf")


EIGHT = [adapter(i, ALL) for i in range(8)]  # equal rank, every module: the bench's shape, small
MIXED = [
    adapter(10, ALL),
    adapter(11, {"attn_q": 16, "attn_v": 2, "mlp_4h_to_h": 5}),  # other ranks, modules missing
    adapter(12, {"attn_dense": 1, "mlp_gate": 3}, layers=(1,)),  # one layer only
    adapter(13, ALL, dora=True),
    adapter(14, dict.fromkeys(DEFAULT_TARGET_MODULES, 4)),
]

CASES = {  # name: (adapters, each token's adapter index, -1 = base)
    "one token each, equal rank": (EIGHT, list(range(8))),
    "one token each, shuffled, base between": (EIGHT, [5, -1, 0, 7, 2, -1, 1, 6, 3, 4]),
    "one token each, some adapters idle": (EIGHT, [6, 1, 3]),
    "two tokens each": (EIGHT, [i % 8 for i in range(16)]),
    "eight rows each": (EIGHT, [i % 8 for i in range(64)]),
    "one adapter, every token": (EIGHT[:1], [0] * 20),
    "one adapter among base tokens": (EIGHT, [-1, 3, -1, -1, 3]),
    "one token each, ranks differ": (MIXED, [0, 1, 2, 4]),
    "ranks differ, long and short segments": (MIXED, [0] * 17 + [1] * 3 + [-1] * 2 + [4] * 18 + [2]),
    "dora beside plain and base": (MIXED, [3, 0, -1, 3, 4, 1, 3]),
    "dora, one token each": (MIXED, [3, 0, 4]),
    "dora, long segment": (MIXED, [3] * 20 + [0]),
    "only base tokens": (MIXED, [-1, -1, -1]),
    "dora and plain, equal rank, two tokens each": ([MIXED[3], MIXED[0]], [0, 1, -1, 1, 0]),
    "three tokens each, base between": (EIGHT[:5], [4, 3, 2, 1, 0, -1] * 3),
}


def width(group: str) -> int:
    return {"qkv": 128, "o": 64, "gate_up": 192, "down": 64}[group]


def run(ops, adapters, token_adapter, group, dtype, x, y0, bias) -> torch.Tensor:
    batch = ops.lora_batch([ops.prepare_lora(a, SPEC, dtype, "cpu") for a in adapters], SPEC, dtype, "cpu")
    mask = batch.mask(torch.tensor(token_adapter))
    out = []
    for layer in range(SPEC.num_layers):
        y = y0.clone()
        batch.apply_group(layer, group, x, y, mask, bias if batch.scales(layer, group) else None)
        out.append(y)
    return torch.stack(out)


@pytest.fixture
def kernel_paths():
    """(threads, amx) combinations: one and two threads; AMX on and off where the CPU has it."""
    amx = [True, False] if KERNELS.amx_available() else [False]
    yield [(t, a) for t in (1, 2) for a in amx]
    KERNELS.set_num_threads(0)
    KERNELS.set_amx(True)


@pytest.fixture(params=[True, False], ids=["trail", "no trail"])
def trail(request):
    """LoraGroup.project with the adapters' weights prefetched during the base projection (default), and without."""
    KERNELS.set_lora_trail(request.param)
    yield request.param
    KERNELS.set_lora_trail(True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("case", list(CASES))
def test_segments_equal_the_torch_ops(kernel_paths, dtype, group, case):
    adapters, token_adapter = CASES[case]
    g = torch.Generator().manual_seed(len(case))
    x = torch.randn(len(token_adapter), 96 if group == "down" else 64, generator=g).to(dtype)
    y0 = torch.randn(len(token_adapter), width(group), generator=g).to(dtype)
    bias = torch.randn(width(group), generator=g).to(dtype) if group == "qkv" else None
    want = run(TorchOps(), adapters, token_adapter, group, dtype, x, y0, bias)
    for threads, amx in kernel_paths:
        KERNELS.set_num_threads(threads)
        KERNELS.set_amx(amx)
        got = run(KernelOps(KERNELS), adapters, token_adapter, group, dtype, x, y0, bias)
        scale = want.float().abs().max().clamp(min=1.0)
        err = float((got.float() - want.float()).abs().max() / scale)
        assert err <= REL[dtype], f"threads {threads}, amx {amx}: relative error {err:.2e}"
        base = torch.tensor(token_adapter) < 0
        assert torch.equal(got[:, base], y0[base].expand(SPEC.num_layers, -1, -1))  # base rows untouched


@pytest.mark.parametrize(
    ("token_adapter", "adapters", "message"),
    [
        (torch.tensor([0, 2]), 2, "adapter index out of range"),
        (torch.tensor([0, 1], dtype=torch.int32), 2, "int64"),
        (torch.tensor([[0, 1]]), 2, r"int64 \[T\]"),
        (torch.tensor([0]), -1, "adapters must be >= 0"),
    ],
)
def test_bad_rows_are_refused_by_name(token_adapter, adapters, message):
    with pytest.raises(RuntimeError, match=message):
        KERNELS.LoraRows(token_adapter, adapters)


def test_rows_of_another_batch_are_refused():
    ops = KernelOps(KERNELS)
    batch = ops.lora_batch(
        [ops.prepare_lora(a, SPEC, torch.float32, "cpu") for a in EIGHT[:2]], SPEC, torch.float32, "cpu"
    )
    rows = batch.mask(torch.tensor([0, 1, 1]))
    x, y = torch.randn(2, 64), torch.zeros(2, 128)
    with pytest.raises(RuntimeError, match="rows do not match this batch"):
        batch.apply_group(0, "qkv", x, y, rows)
    three = ops.lora_batch(
        [ops.prepare_lora(a, SPEC, torch.float32, "cpu") for a in EIGHT[:3]], SPEC, torch.float32, "cpu"
    )
    with pytest.raises(RuntimeError, match="rows do not match this batch"):
        three.apply_group(0, "qkv", torch.randn(3, 64), torch.zeros(3, 128), rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank", [2, 6, 16, 32])
@pytest.mark.parametrize("rows", [1, 5, 16, 21])
def test_group_with_partial_column_blocks(kernel_paths, trail, dtype, rank, rows):
    """One adapter's group straight through kernels.LoraGroup (apply, and project with a base projection): parts
    of 40 and 24 columns (partial 16-column blocks, a part starting mid-block), ranks 2-32, row counts on both
    sides of the AMX LoRA-A threshold."""
    g = torch.Generator().manual_seed(rank * 100 + rows)
    widths, k_in = [40, 24], 64
    a = torch.randn(2 * rank, k_in, generator=g).to(dtype)  # [P·R, in]
    bs = [(torch.randn(w, rank, generator=g) * 0.1).to(dtype) for w in widths]  # B_p [out_p, R]
    x = torch.randn(rows, k_in, generator=g).to(dtype)
    y0 = torch.randn(rows, sum(widths), generator=g).to(dtype)
    xa = (x.float() @ a.float().T).to(dtype).float()  # rounded to the dtype between A and B, as PEFT
    delta = torch.cat([xa[:, p * rank : (p + 1) * rank] @ b.float().T for p, b in enumerate(bs)], dim=1)
    want = (y0.float() + delta).to(dtype)
    group = KERNELS.LoraGroup(a=[KERNELS.pack(a)], b=[[KERNELS.pack(b) for b in bs]], ranks=[rank],
                              starts=[0, widths[0]], widths=widths, mag=[None])  # fmt: skip
    w = (torch.randn(sum(widths), k_in, generator=g) * 0.2).to(dtype)  # the base projection, for project()
    base = (y0.float() + (x.float() @ w.float().T).to(dtype).float()).to(dtype)
    projected = (base.float() + delta).to(dtype)  # rounded after W x, then after the delta: as two calls
    for threads, amx in kernel_paths:
        KERNELS.set_num_threads(threads)
        KERNELS.set_amx(amx)
        y = y0.clone()
        group.apply(x, y, None, None)
        err = float((y.float() - want.float()).abs().max() / want.float().abs().max().clamp(min=1.0))
        assert err <= REL[dtype], f"threads {threads}, amx {amx}: relative error {err:.2e}"
        y = y0.clone()
        group.project(x, KERNELS.pack(w), sum(widths), None, y, True, None)
        err = float(
            (y.float() - projected.float()).abs().max() / projected.float().abs().max().clamp(min=1.0)
        )
        assert err <= REL[dtype], f"project: threads {threads}, amx {amx}: relative error {err:.2e}"


def project(ops, adapters, token_adapter, group, dtype, x, w, bias, y0) -> torch.Tensor:
    """Every layer's `project` of this group: into a copy of y0 (the residual), or a new tensor when y0 is None."""
    batch = ops.lora_batch([ops.prepare_lora(a, SPEC, dtype, "cpu") for a in adapters], SPEC, dtype, "cpu")
    mask, linear = batch.mask(torch.tensor(token_adapter)), ops.linear(w, bias)
    return torch.stack(
        [
            batch.project(layer, group, linear, x, mask, None if y0 is None else y0.clone())
            for layer in range(SPEC.num_layers)
        ]
    )


PROJECT_CASES = {
    **CASES,
    "prefill-sized: more rows than a fused call": (EIGHT[:3], [i % 4 - 1 for i in range(70)]),
}


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("case", list(PROJECT_CASES))
def test_project_equals_the_torch_ops(kernel_paths, trail, residual, dtype, group, case):
    """The base projection and its LoRA in one call (LoraGroup.project, csrc/lora.cpp) against the torch ops'
    projection then delta; into the residual or a new tensor; DoRA groups and long inputs take the two calls;
    with and without the adapters' prefetch during the base projection (`trail`)."""
    adapters, token_adapter = PROJECT_CASES[case]
    g = torch.Generator().manual_seed(len(case) + 7)
    k_in = 96 if group == "down" else 64
    x = torch.randn(len(token_adapter), k_in, generator=g).to(dtype)
    w = (torch.randn(width(group), k_in, generator=g) * 0.2).to(dtype)
    bias = torch.randn(width(group), generator=g).to(dtype) if group == "qkv" else None
    y0 = torch.randn(len(token_adapter), width(group), generator=g).to(dtype) if residual else None
    want = project(TorchOps(), adapters, token_adapter, group, dtype, x, w, bias, y0)
    for threads, amx in kernel_paths:
        KERNELS.set_num_threads(threads)
        KERNELS.set_amx(amx)
        got = project(KernelOps(KERNELS), adapters, token_adapter, group, dtype, x, w, bias, y0)
        scale = want.float().abs().max().clamp(min=1.0)
        err = float((got.float() - want.float()).abs().max() / scale)
        assert err <= REL[dtype], f"threads {threads}, amx {amx}: relative error {err:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("source", [MIXED[1], MIXED[3]], ids=["plain", "dora"])
def test_prepare_packed_places_an_adapter_in_one_mapping(source, dtype):
    """The device tier's packed groups (lora_grouped.prepare_packed): equal to packing the dense ones, each
    tensor contiguous on a cache line, all of one adapter in one span (its 2 MiB-page mapping)."""
    from trtllm_peft.executor.torch.lora_grouped import prepare_packed
    from trtllm_peft.executor.torch.lora_ops import prepare

    dense = prepare(source, SPEC, dtype, "cpu")
    packed = prepare_packed(KERNELS, source, SPEC, dtype, "cpu")
    spans = []
    for key, g in packed.groups.items():
        d = dense.groups[key]
        want = [KERNELS.pack(d.a.reshape(-1, d.a.shape[2]))] + [
            KERNELS.pack(bt.t().contiguous()) for bt in d.bt
        ]
        assert (g.mag is None) == (d.mag is None)
        if g.mag is not None:  # the kernels read float32
            want.append(d.mag.float())
        for got, ref in zip([g.a, *g.b, *([] if g.mag is None else [g.mag])], want, strict=True):
            assert torch.equal(got, ref) and got.is_contiguous() and got.data_ptr() % 64 == 0
            spans.append((got.data_ptr(), got.data_ptr() + got.numel() * got.element_size()))
    total = sum(end - start for start, end in spans)
    assert max(e for _, e in spans) - min(s for s, _ in spans) < total + 64 * len(spans)


BESIDE = ["one token each, equal rank", "one token each, ranks differ", "two tokens each"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", BESIDE)
def test_project_beside_another_caller_is_unchanged(dtype, case):
    """Several adapters' project (base and adapters in one region, csrc/lora.cpp project_side) from two threads
    at once: the pool serves one caller, the other runs every task itself and must do the base shares it would
    otherwise wait for — bit for bit the result of a lone call, and no hang."""
    import threading

    adapters, token_adapter = CASES[case]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(len(token_adapter), 64, generator=g).to(dtype)
    w = (torch.randn(width("gate_up"), 64, generator=g) * 0.2).to(dtype)
    KERNELS.set_num_threads(2)
    ops = KernelOps(KERNELS)
    want = project(ops, adapters, token_adapter, "gate_up", dtype, x, w, None, None)
    got: list[torch.Tensor] = []

    def caller() -> None:
        for _ in range(20):
            got.append(project(ops, adapters, token_adapter, "gate_up", dtype, x, w, None, None))

    threads = [threading.Thread(target=caller) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    KERNELS.set_num_threads(0)
    assert len(got) == 40 and all(torch.equal(y, want) for y in got)
