"""The weight-streaming linear kernel alone on a decode step's products: set_streaming variants, alternating.

    .venv/bin/python bench/linear_stream.py --dtypes bfloat16 float32 --batches 8 16 32 64

SmolLM2-135M's products (30 layers of qkv, o, gate|up, down, then the LM head: 270 MB bfloat16), random
weights packed and placed on 2 MiB pages as the engine places them (KernelOps.place_weights), x of `batch`
rows. One "step" calls every product once, in layer order (weights never fit in cache: each step streams all
of them from memory). Variants (csrc/linear.cpp set_streaming) alternate within each round; per variant the
median of the rounds' steps, as ms a step and GB/s of packed weights, beside the machine's read bandwidth.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import torch

from trtllm_peft.executor.torch import cpu_kernels, huge_pages
from trtllm_peft.executor.torch.ops import KernelOps

# (out, in) of SmolLM2-135M's products: qkv, o, gate|up, down (x 30 layers), then the LM head
LAYER = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
HEAD = (49152, 576)
LAYERS = 30

# set_streaming(prefetch, split_min): the next unit into L2 (above 4 rows) or not
VARIANTS = {"no prefetch": (False, 16384), "default": (True, 16384)}


def read_gbs() -> float:
    """torch's sum over 256 MiB on 2 MiB pages: the machine's read bandwidth, best of 5."""
    y = huge_pages.empty((64 << 20,), torch.float32)
    y.fill_(1)
    best = min(_timed(y.sum) for _ in range(5))
    return y.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def products(ops: KernelOps, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    shapes = LAYER * LAYERS + [HEAD]
    lins = [ops.linear(torch.randn(s, generator=g).mul_(0.05).to(dtype)) for s in shapes]
    ops.place_weights(lins)
    return lins


def bench(k, dtype: torch.dtype, batches: list[int], rounds: int, steps: int, names: list[str]) -> None:
    lins = products(KernelOps(k), dtype)
    nbytes = sum(lin.packed.numel() * lin.packed.element_size() for lin in lins)
    for b in batches:
        xs = {K: torch.randn(b, K).to(dtype) for K in (576, 1536)}
        outs = [torch.empty(b, lin.out_features, dtype=dtype) for lin in lins]
        times = alternate(k, functools.partial(step, k, lins, xs, outs), rounds, steps, names)
        ceiling(k, lins, xs, outs, b)
        base, best = statistics.median(times[names[0]]), min(times[names[0]])
        cells = "  ".join(
            f"{v} {statistics.median(t) * 1e3:6.2f} ms {nbytes / statistics.median(t) / 1e9:5.1f} GB/s "
            f"({base / statistics.median(t):.3f}x; best {nbytes / min(t) / 1e9:5.1f} {best / min(t):.3f}x)"
            for v, t in times.items()
        )
        print(f"  {str(dtype)[6:]:<8} b{b:<3} {cells}  load {os.getloadavg()[0]:.1f}", flush=True)


def step(k, lins, xs, outs) -> None:
    """Every product once, in layer order."""
    for lin, y in zip(lins, outs, strict=True):
        k.linear_into(xs[lin.in_features], lin.packed, lin.out_features, None, y, False)


def alternate(k, fn, rounds: int, steps: int, names: list[str]) -> dict[str, list[float]]:
    """Seconds of each of `steps` calls of fn per variant per round, the variants alternating; round 0 warms up."""
    times: dict[str, list[float]] = {v: [] for v in names}
    for r in range(rounds + 1):
        for v in names:
            k.set_streaming(*VARIANTS[v])
            got = [_timed(fn) for _ in range(steps)]
            if r:
                times[v].extend(got)
    k.set_streaming()
    return times


def ceiling(k, lins, xs, outs, b: int) -> None:
    """The default kernel's GB/s on the o projections streamed from memory (30 of them) vs one o projection
    30 times (0.66 MB bfloat16: from L2): how far the kernel is from its compute limit at this batch."""
    o = lins[1 : 4 * LAYERS : 4]

    def run(ws) -> None:
        for lin in ws:
            k.linear_into(xs[576], lin.packed, lin.out_features, None, outs[1], False)

    nbytes = sum(lin.packed.numel() * lin.packed.element_size() for lin in o)
    res = {"memory": [], "cache": []}
    for _ in range(8):
        res["memory"].append(_timed(lambda: run(o)))
        res["cache"].append(_timed(lambda: run([o[0]] * LAYERS)))
    cells = "  ".join(f"{n} {nbytes / min(t) / 1e9:5.1f} GB/s" for n, t in res.items())
    print(f"  o projections b{b}: {cells}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4, help="steps a variant runs each round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args()
    k = cpu_kernels.load()
    k.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    k.set_amx(False)
    print(f"load average {' / '.join(f'{v:.1f}' for v in os.getloadavg())}; kernels {k.__file__}")
    print(f"machine: read {read_gbs():.1f} GB/s (2 MiB pages)")
    for dt in args.dtypes:
        bench(k, getattr(torch, dt), args.batches, args.rounds, args.steps, args.variants)


if __name__ == "__main__":
    main()
