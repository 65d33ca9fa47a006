"""Decode attention alone: two builds of the CPU kernels (.so files) against each other, in one process.

    .venv/bin/python bench/attend_decode.py OLD.so NEW.so            # e.g. main's _prebuilt vs this tree's
    .venv/bin/python bench/attend_decode.py NEW.so --rounds 7        # one build: µs a call only

`attend_decode` (RoPE, K/V write, attention over the paged cache) at SmolLM2-135M's shape (9 query heads,
3 kv heads, head dim 64, 32 tokens a block), every row at position ctx − 1, `--batches` (8 16 32 64) and
`--contexts` (40 512 1000), both dtypes; the builds' outputs must agree within the kernel tests' tolerances. A 48 MiB buffer is written before every call, so the K/V cache comes from DRAM
as in a decode step (whose weight streaming evicts it between layers). The builds alternate within each
round; a case's time is the best over the rounds of the median of `--calls` calls. One kernel thread: two
loaded builds are two thread pools, whose idle workers would compete for the cores.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time
from pathlib import Path

import torch

HEADS, KV_HEADS, HEAD_DIM, TPB = 9, 3, 64, 32
REL = {torch.float32: 2e-6, torch.bfloat16: 1e-2}  # tests/kernel_checks.py: float32 / one bf16 rounding step


def load_module(path: str):
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.set_num_threads(1)
    return module


def inputs(dtype: torch.dtype, batch: int, ctx: int) -> tuple:
    """attend_decode's arguments: qkv, cos, sin, positions, K and V cache, shuffled block tables."""
    g = torch.Generator().manual_seed(batch * ctx)
    width = (ctx + TPB - 1) // TPB
    blocks = batch * width + 2
    tables = (
        torch.randperm(blocks, generator=g)[: batch * width].view(batch, width).to(torch.int32).contiguous()
    )
    kc, vc = (torch.randn(blocks, KV_HEADS, TPB, HEAD_DIM, generator=g).to(dtype) for _ in range(2))
    qkv = torch.randn(batch, (HEADS + 2 * KV_HEADS) * HEAD_DIM, generator=g).to(dtype)
    angles = torch.outer(torch.arange(width * TPB).float(), torch.rand(HEAD_DIM // 2, generator=g))
    cos, sin = (
        torch.cat([angles, angles], -1).cos().to(dtype),
        torch.cat([angles, angles], -1).sin().to(dtype),
    )
    positions = torch.full((batch,), ctx - 1, dtype=torch.int64)
    return qkv, cos, sin, positions, kc, vc, tables


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("builds", nargs="+", help="kernel modules (.so); the first is the reference")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=15)
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--contexts", type=int, nargs="+", default=[40, 512, 1000])
    args = ap.parse_args()
    torch.set_num_threads(1)
    mods = {Path(p).stem[-12:]: load_module(p) for p in args.builds}
    flush = torch.ones(12 * 2**20)
    print(f"load average {' / '.join(f'{x:.1f}' for x in os.getloadavg())}")

    def call(module, a) -> float:
        flush.mul_(1.0)  # evict the cache
        t = time.perf_counter()
        module.attend_decode(*a, HEADS, KV_HEADS, HEAD_DIM)
        return time.perf_counter() - t

    for dtype in (torch.bfloat16, torch.float32):
        for batch in args.batches:
            for ctx in args.contexts:
                a = inputs(dtype, batch, ctx)
                outs = [m.attend_decode(*a, HEADS, KV_HEADS, HEAD_DIM) for m in mods.values()]
                scale = outs[0].float().abs().max().clamp(min=1.0)
                err = max(((o.float() - outs[0].float()).abs().max() / scale).item() for o in outs)
                assert err <= REL[dtype], f"the builds disagree: relative error {err:.1e}"
                best = dict.fromkeys(mods, float("inf"))
                for _ in range(args.rounds):
                    for name, m in mods.items():
                        best[name] = min(best[name], statistics.median(call(m, a) for _ in range(args.calls)))
                ref = next(iter(best.values()))
                cells = "  ".join(f"{n} {t * 1e6:7.1f} µs ({ref / t:.2f}x)" for n, t in best.items())
                print(f"{str(dtype)[6:]:<8} batch {batch:<3} ctx {ctx:<5} {cells}", flush=True)
    print(f"load average at the end {' / '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
