"""The CPU kernels (csrc/) against the pure-torch ops (ops.TorchOps) they replace: same math, float32 and bfloat16,
within tests/kernel_checks.py's tolerances."""

from __future__ import annotations

import pytest
import torch

from tests.kernel_checks import DTYPES, KERNELS, close, needs_kernels
from trtllm_peft.executor.torch import cpu_kernels
from trtllm_peft.executor.torch.kv import PagedKVCache
from trtllm_peft.executor.torch.ops import KernelOps, TorchOps


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"avx512f", "avx512bw", "avx512vl", "avx512_bf16"}, None),
        ({"avx2", "fma"}, "this CPU lacks avx512f, avx512bw, avx512vl, avx512_bf16"),
        ({"avx512f", "avx512bw", "avx512vl"}, "this CPU lacks avx512_bf16"),
        (set(), "this CPU lacks avx512f, avx512bw, avx512vl, avx512_bf16"),
    ],
)
def test_why_unavailable_names_the_missing_instructions(flags, expected):
    got = cpu_kernels.why_unavailable(flags)
    if expected is None:  # the CPU qualifies; only a missing compiler could still say no
        assert got is None or "compiler" in got
    else:
        assert got == expected


def test_cpu_flags_reads_the_flags_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16\nbugs\t: none\n")
    assert cpu_kernels.cpu_flags(info) == {"fpu", "avx512f", "avx512_bf16"}
    assert cpu_kernels.cpu_flags(tmp_path / "missing") == set()


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("m", "n", "k"),
    [(1, 16, 576), (8, 960, 576), (9, 49, 7), (3, 40, 16), (17, 33, 129), (40, 576, 1536), (2, 5, 1)],
)
@pytest.mark.parametrize("bias", [False, True])
def test_linear_equals_f_linear(dtype, m, n, k, bias):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    w, x = torch.randn(n, k, generator=g).to(dtype), torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    want = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
    close(KernelOps(KERNELS).linear(w, b)(x), want, dtype)


@pytest.fixture
def amx_paths():
    """Both bf16 paths of the kernels in turn: AMX tiles (where this CPU has them) and weight streaming."""
    paths = [True, False] if KERNELS.amx_available() else [False]
    yield paths
    KERNELS.set_amx(True)


@needs_kernels
@pytest.mark.parametrize(
    ("m", "n", "k"),
    [(5, 40, 64), (8, 960, 576), (16, 48, 32), (17, 40, 64), (33, 49, 96), (64, 960, 576), (65, 80, 96), (129, 33, 32), (300, 576, 1536),
     (40, 33, 129)],
)  # fmt: skip
def test_amx_and_weight_streaming_paths_both_equal_f_linear(amx_paths, m, n, k):
    """Rows >= 5 with K a multiple of 32 take AMX tiles where available (partial row blocks, an odd
    number of 16-column blocks, a masked last block; more than 64 rows load x with the streaming hint);
    K = 129 always streams. Both paths stay within one bfloat16 rounding of the float32 product, and of
    each other."""
    g = torch.Generator().manual_seed(m + n + k)
    w, x, b = (torch.randn(s, generator=g).bfloat16() for s in ((n, k), (m, k), (n,)))
    linear = KernelOps(KERNELS).linear(w, b)
    want = torch.nn.functional.linear(x.float(), w.float(), b.float())
    got = {}
    for on in amx_paths:
        assert KERNELS.set_amx(on) == on
        before = KERNELS.amx_products()
        got[on] = linear(x)
        assert KERNELS.amx_products() - before == (on and k % 32 == 0)  # the path we meant ran
        close(got[on], want, torch.bfloat16)
        y = torch.randn(m, n + 8, generator=g).bfloat16()
        before = y.clone()
        linear.add_to(y[:, 3 : 3 + n], x)  # accumulate into a column slice
        close(y[:, 3 : 3 + n], before[:, 3 : 3 + n].float() + want, torch.bfloat16)
        assert torch.equal(y[:, :3], before[:, :3]) and torch.equal(y[:, 3 + n :], before[:, 3 + n :])
    close(got[amx_paths[0]], got[False], torch.bfloat16)


@pytest.fixture
def streaming():
    """The weight-streaming kernel alone (no AMX), its knobs restored afterwards."""
    KERNELS.set_amx(False)
    yield KERNELS
    KERNELS.set_streaming()
    KERNELS.set_amx(True)


# (rows, out, in): 1-8 rows in one pass and 9-64 in several, one unit or many with a partial last unit
# (width 8/6/3 blocks by rows), a masked last block, odd K, and K of one k pair; a prefill-sized product
# (200 rows of o-proj: split by its rows whatever split_min, in pieces of units).
STREAM_SHAPES = [(1, 16 * 8 * 3 + 5, 33), (2, 300, 2), (4, 16 * 6 * 2 + 16, 64), (5, 400, 31), (8, 960, 576),
                 (9, 200, 48), (16, 100, 129), (17, 3 * 16 * 5, 64), (33, 250, 96), (64, 97, 17),
                 (200, 576, 576)]  # fmt: skip


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "n", "k"), STREAM_SHAPES)
def test_streaming_prefetch_and_thread_split_change_no_bit(streaming, dtype, m, n, k):
    """Prefetching (on or off) and splitting small products over threads move no arithmetic: every knob
    setting gives the same bits, within rounding of F.linear, also accumulating (+ bias) into a column slice."""
    g = torch.Generator().manual_seed(m * 7 + n + k)
    w, x, b = (torch.randn(s, generator=g).to(dtype) for s in ((n, k), (m, k), (n,)))
    linear = KernelOps(KERNELS).linear(w, b)
    want = torch.nn.functional.linear(x.float(), w.float(), b.float())
    y0 = torch.randn(m, n + 5, generator=g).to(dtype)
    got = []
    for prefetch, split in [(True, 0), (False, 2**40), (True, 2**40), (False, 0)]:
        streaming.set_streaming(prefetch, split)
        y = y0.clone()
        linear.add_to(y[:, 2 : 2 + n], x)
        got.append((linear(x), y))
    close(got[0][0], want, dtype)
    close(got[0][1][:, 2 : 2 + n], y0[:, 2 : 2 + n].float() + want, dtype)
    assert torch.equal(got[0][1][:, :2], y0[:, :2]) and torch.equal(got[0][1][:, 2 + n :], y0[:, 2 + n :])
    for out, y in got[1:]:
        assert torch.equal(out, got[0][0]) and torch.equal(y, got[0][1])


# set_split(steal, spin_us, sleep) (csrc/thread_pool.cpp): shares with stealing or halves, spin, caller asleep
SPLITS = [(True, 50, True), (False, 200, False), (True, 0, True), (True, 200, False), (False, 0, True)]


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "n", "k"), [(1, 389, 33), (8, 960, 576), (17, 240, 64), (64, 97, 17)])
def test_thread_split_settings_change_no_bit(streaming, dtype, m, n, k):
    """Every split and wait setting, on two threads, gives the bits of one thread, also accumulating into y."""
    g = torch.Generator().manual_seed(m + n + k)
    w, x, b = (torch.randn(s, generator=g).to(dtype) for s in ((n, k), (m, k), (n,)))
    linear = KernelOps(KERNELS).linear(w, b)
    y0 = torch.randn(m, n, generator=g).to(dtype)
    streaming.set_streaming(True, 0)  # every product split
    got = []
    try:  # one thread first: the reference bits
        for threads, split in [(1, SPLITS[0])] + [(2, s) for s in SPLITS]:
            KERNELS.set_num_threads(threads)
            KERNELS.set_split(*split)
            y = y0.clone()
            linear.add_to(y, x)
            got.append((linear(x), y))
    finally:
        KERNELS.set_split()
        KERNELS.set_num_threads(0)
    close(got[0][0], torch.nn.functional.linear(x.float(), w.float(), b.float()), dtype)
    for out, y in got[1:]:
        assert torch.equal(out, got[0][0]) and torch.equal(y, got[0][1])


def _argmax_cases():
    g = torch.Generator().manual_seed(3)
    big = torch.randn(5, 49152, generator=g)
    ties = torch.zeros(3, 37)
    ties[0, [4, 20]] = 2.0  # the first maximum wins
    ties[1, 36] = 1.0  # in the masked tail chunk
    ties[2] = float("-inf")  # a row banned entirely (guided decoding)
    nan = torch.randn(2, 100, generator=g)
    nan[0, [70, 90]] = float("nan")  # torch: a NaN is the maximum, the first one wins
    nan[1, 5] = float("inf")
    return {"vocab": big, "ties": ties, "nan": nan, "one": torch.tensor([[7.0]]), "slice": big[:, 3:1000]}


@needs_kernels
@pytest.mark.parametrize("case", ["vocab", "ties", "nan", "one", "slice"])
def test_argmax_equals_torch(case):
    logits = _argmax_cases()[case]
    got = KernelOps(KERNELS).argmax(logits)
    assert got.dtype == torch.long and torch.equal(got, torch.argmax(logits, dim=-1))


@needs_kernels
@pytest.mark.parametrize(("m", "n", "k"), [(16, 40, 64), (48, 960, 576), (100, 576, 1536)])
def test_amx_weight_prefetch_changes_no_result(amx_paths, m, n, k):
    """set_amx(prefetch=False) (bench/amx_profile.py's A/B) only drops the software prefetch: the same
    products in the same order, so bit-identical outputs."""
    g = torch.Generator().manual_seed(m + n + k)
    w, x = torch.randn(n, k, generator=g).bfloat16(), torch.randn(m, k, generator=g).bfloat16()
    linear = KernelOps(KERNELS).linear(w)
    got = []
    for prefetch in (True, False):
        KERNELS.set_amx(True, 16, prefetch)
        before = KERNELS.amx_products()
        got.append(linear(x))
        assert KERNELS.amx_products() - before == int(KERNELS.amx_available())
    assert torch.equal(got[0], got[1])


@needs_kernels
def test_amx_is_used_only_where_the_cpu_has_it():
    flags = cpu_kernels.cpu_flags()
    if KERNELS.amx_available():
        assert {"amx_tile", "amx_bf16"} <= flags
    if not {"amx_tile", "amx_bf16"} <= flags:
        assert not KERNELS.amx_available() and KERNELS.set_amx(True) is False
    assert KERNELS.set_amx(False) is False
    assert KERNELS.set_amx(True) is KERNELS.amx_available()


FIRST_USE_IN_A_THREAD = """
import threading, torch
from trtllm_peft.executor.torch import cpu_kernels
from trtllm_peft.executor.torch.ops import KernelOps
kernels = cpu_kernels.load()
w, x = torch.randn(64, 64).bfloat16(), torch.randn(32, 64).bfloat16()
out = {}
t = threading.Thread(target=lambda: out.setdefault("y", KernelOps(kernels).linear(w)(x)))
t.start()
t.join()
err = (out["y"].float() - x.float() @ w.float().t()).abs().max() / (x.float() @ w.float().t()).abs().max()
print(kernels.amx_available(), float(err))
"""


@needs_kernels
def test_first_amx_product_in_a_fresh_process_and_thread_is_safe():
    """The engine thread may run the first 32-row bf16 product before anyone queried AMX: detection (and
    Linux's grant of the tile state, without which a tile instruction is SIGILL) must come first by itself."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", FIRST_USE_IN_A_THREAD], capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-2000:]
    available, err = done.stdout.split()
    assert available == str(KERNELS.amx_available()) and float(err) < 1e-2


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_to_a_column_slice_leaves_the_other_columns_alone(dtype):
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(40, 24, generator=g).to(dtype), torch.randn(6, 48, generator=g).to(dtype)
    y = torch.randn(6, 60, generator=g).to(dtype)
    before = y.clone()
    KernelOps(KERNELS).linear(w).add_to(y[:, 7:47], x[:, 24:])  # strided x and y, both column slices
    want = before[:, 7:47].float() + x[:, 24:].float() @ w.float().t()
    close(y[:, 7:47], want, dtype)
    assert torch.equal(y[:, :7], before[:, :7]) and torch.equal(y[:, 47:], before[:, 47:])


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 8, 300])
def test_rms_norm_and_silu_mul_equal_torch(dtype, rows):
    g = torch.Generator().manual_seed(rows)
    x, w = (torch.randn(rows, 576, generator=g) * 3).to(dtype), torch.randn(576, generator=g).to(dtype)
    gu = (torch.randn(rows, 2 * 1536, generator=g) * 4).to(dtype)
    ref, ker = TorchOps(), KernelOps(KERNELS)
    close(ker.rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5), dtype)
    close(ker.silu_mul(gu), ref.silu_mul(gu), dtype)


@pytest.fixture(params=[1 << 40, 0], ids=["attn-one-thread", "attn-split"])
def attend_split(request):
    """Decode attention on the calling thread, or split over the threads."""
    KERNELS.set_streaming(attend_split=request.param)
    yield request.param
    KERNELS.set_streaming()


# (heads, kv heads, head dim): a kv head's query heads go in groups of 3 (bfloat16 hd <= 64, float32 hd <= 32),
# 2 (bfloat16 hd <= 128) or 1: whole groups, short last ones (8 = 3 + 3 + 2, 5 = 3 + 2, 4 = 3 + 1), head dims
# that end inside a register step (4, 8, 34, 40, 200) and long ones (float32 up to 13 steps of 16).
ATTEND_SHAPES = [
    (9, 3, 64),
    (4, 2, 4),
    (4, 4, 8),
    (8, 1, 40),
    (10, 2, 16),
    (6, 1, 96),
    (3, 1, 128),
    (4, 1, 34),
    (2, 1, 200),
]


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens_per_block", [4, 12, 32])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), ATTEND_SHAPES)
def test_attend_decode_equals_torch_and_writes_the_same_cache(
    attend_split, dtype, tokens_per_block, heads, kv_heads, head_dim
):
    """Through shuffled block tables (paged: a row's blocks anywhere in the pool), kernel == torch ops, on one
    thread or split over the threads."""
    g = torch.Generator().manual_seed(heads * head_dim + tokens_per_block)
    rows, max_len, tpb = 5, 96, tokens_per_block
    positions = torch.tensor([0, 7, 31, 3, 95])  # each row at its own position, one at the last slot
    width = max_len // tpb
    num_blocks = rows * width + 3
    perm = torch.randperm(num_blocks, generator=g)[: rows * width].view(rows, width)
    tables = perm.to(torch.int32).contiguous()
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * head_dim, generator=g).to(dtype)
    angles = torch.outer(torch.arange(max_len).float(), torch.rand(head_dim // 2, generator=g))
    cos, sin = (
        torch.cat([angles, angles], -1).cos().to(dtype),
        torch.cat([angles, angles], -1).sin().to(dtype),
    )
    caches = []
    for _ in range(2):
        c = PagedKVCache(2, num_blocks, tpb, kv_heads, head_dim, dtype, "cpu")
        c.k.copy_(torch.randn(c.k.shape, generator=g))  # stale values beyond each position must be ignored
        c.v.copy_(torch.randn(c.v.shape, generator=g))
        caches.append(c)
    # the kernel's cache: NaN in every slot outside the sequences (the torch ops' gather would read some)
    stale = torch.ones(num_blocks, tpb, dtype=torch.bool)
    for b, p in enumerate(positions.tolist()):
        for t in range(p + 1):
            stale[tables[b, t // tpb], t % tpb] = False
    stale = stale[None, :, None, :, None].expand_as(caches[0].k)  # [layers, blocks, kv, tpb, hd]
    caches[1].k.copy_(caches[0].k.masked_fill(stale, float("nan")))
    caches[1].v.copy_(caches[0].v.masked_fill(stale, float("nan")))
    shape = (heads, kv_heads, head_dim)
    want = TorchOps().attend_decode(qkv, cos, sin, positions, caches[0], 1, shape, tables)
    got = KernelOps(KERNELS).attend_decode(qkv, cos, sin, positions, caches[1], 1, shape, tables)
    close(got, want, dtype)
    assert torch.equal(caches[1].k.isnan(), stale) and torch.equal(caches[1].v.isnan(), stale)
    close(caches[1].k.nan_to_num(), caches[0].k.masked_fill(stale, 0), dtype)
    assert torch.equal(caches[1].v.nan_to_num(), caches[0].v.masked_fill(stale, 0))
    # the written slots are where the block tables say
    for b, p in enumerate(positions.tolist()):
        v_in = qkv[b, (heads + kv_heads) * head_dim :].view(kv_heads, head_dim)
        assert torch.equal(caches[1].v[1, tables[b, p // tpb], :, p % tpb], v_in)


def test_module_name_differs_per_checkout(tmp_path):
    """Two checkouts of the same sources get two modules (two build dirs): neither rebuilds the other's."""
    copy = tmp_path / "csrc"
    copy.mkdir()
    for f in cpu_kernels.CSRC.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    assert cpu_kernels.module_name(copy) != cpu_kernels.module_name()
    assert cpu_kernels.module_name() == cpu_kernels.module_name(cpu_kernels.CSRC)


def test_waiting_for_a_live_builder_is_bounded_and_logged(tmp_path, caplog, monkeypatch):
    """Another live process holding the build lock: we give up after wait_s and say so (torch ops run)."""
    monkeypatch.setattr(cpu_kernels, "LOG_EVERY_S", 0.1)
    with cpu_kernels.build_lock(tmp_path / cpu_kernels.OUR_LOCK, 1.0) as held:
        assert held
        with caplog.at_level("INFO", logger=cpu_kernels.__name__):
            assert cpu_kernels.build(tmp_path, "never_built", wait_s=0.5) is None
    assert f"pid {__import__('os').getpid()}" in caplog.text
    assert "another process kept building them for over 0 s" in caplog.text
    assert not list(tmp_path.glob("*.so"))


@needs_kernels
@pytest.mark.parametrize("group", ["qkv", "o", "gate_up", "down"])
def test_lora_segments_long_enough_for_amx_equal_the_torch_ops(amx_paths, group):
    """Adapter segments of >= 16 tokens with hidden and intermediate sizes that are multiples of 32: LoRA-A
    runs on AMX tiles (B, K = rank, streams); both paths equal the dense torch LoRA within bf16 rounding."""
    from trtllm_peft.lora import LoraAdapter, LoraWeights, ModelSpec
    from trtllm_peft.lora.modules import DEFAULT_TARGET_MODULES

    spec = ModelSpec(
        num_layers=1, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
        intermediate_size=96, vocab_size=50, dtype="bfloat16", max_lora_rank=16,
    )  # fmt: skip
    g = torch.Generator().manual_seed(7)

    def adapter(rank: int) -> LoraAdapter:
        w = {}
        for m in DEFAULT_TARGET_MODULES:
            d_in, d_out = spec.module_dims(m)
            a, b = torch.randn(rank, d_in, generator=g), torch.randn(d_out, rank, generator=g) * 0.1
            w[(0, m)] = LoraWeights(a, b, 0.5)
        return LoraAdapter(weights=w, format="hf")

    adapters, dt = [adapter(8), adapter(16)], torch.bfloat16
    token_adapter = torch.tensor([0] * 20 + [1] * 17 + [-1] * 3 + [0])
    x = torch.randn(len(token_adapter), 96 if group == "down" else 64, generator=g).to(dt)
    width = {"qkv": 128, "o": 64, "gate_up": 192, "down": 64}[group]
    y0 = torch.randn(len(token_adapter), width, generator=g).to(dt)

    def run(ops) -> torch.Tensor:
        batch = ops.lora_batch([ops.prepare_lora(a, spec, dt, "cpu") for a in adapters], spec, dt, "cpu")
        y = y0.clone()
        batch.apply_group(0, group, x, y, batch.mask(token_adapter))
        return y

    want = run(TorchOps())
    for on in amx_paths:
        assert KERNELS.set_amx(on) == on
        close(run(KernelOps(KERNELS)), want, dt)
