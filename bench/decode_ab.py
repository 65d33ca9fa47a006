"""Decode tokens/s of the layout and call changes of issue #15, one process, variants alternating per round.

    .venv/bin/python bench/decode_ab.py --dtypes bfloat16 float32 --batches 8 16 32 64

Two executors on the same engine: one with its packed weights and KV pool where torch's allocator puts them
(4 KiB pages: the engine before huge_pages.py), one on 2 MiB pages; each run op by op (`model.fuse = False`:
eight kernel calls a layer, as before the fused layer parts) and fused (two). Prints each variant's tokens/s
(bench/engine.py's formula), its ratio to the first, the floor, and the processes' AnonHugePages.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine import ENGINES, MAX_SEQ, ensure_engines, floor_ms, interleaved_rates, machine  # noqa: E402
from engine_cases import ours_runner  # noqa: E402

from trtllm_peft.executor.torch import TorchExecutor, huge_pages  # noqa: E402
from trtllm_peft.executor.torch.ops import KernelOps  # noqa: E402


@contextlib.contextmanager
def small_pages():
    """Executors built inside allocate weights and KV pool with torch's allocator, as before huge_pages.py."""
    place, empty = KernelOps.place_weights, huge_pages.empty
    KernelOps.place_weights = lambda self, linears: None
    huge_pages.empty = lambda shape, dtype, device="cpu": torch.empty(shape, dtype=dtype, device=device)
    try:
        yield
    finally:
        KernelOps.place_weights, huge_pages.empty = place, empty


def anon_huge_kb() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return -1


def fused(ex: TorchExecutor, run, on: bool):
    def go(n: int) -> None:
        ex.model.fuse = on
        run(n)

    return go


def bench(dt: str, batches: list[int], tokens: int, repeats: int, m: dict) -> None:
    sizes = dict(max_batch_size=max(batches), max_seq_len=MAX_SEQ, memory_budget_bytes=3 * 2**30)
    with contextlib.ExitStack() as stack:
        with small_pages():
            small = stack.enter_context(TorchExecutor(ENGINES[dt], **sizes))
        huge = stack.enter_context(TorchExecutor(ENGINES[dt], **sizes))
        layers = huge.model.layers
        params = huge.model.embed.numel() + sum(
            lin.packed.numel() for ly in layers for lin in (ly.qkv, ly.o, ly.gate_up, ly.down)
        )
        for b in batches:
            r_small, r_huge = ours_runner(small, [], b, 0), ours_runner(huge, [], b, 0)
            runs = {
                "4K op by op": fused(small, r_small, False),
                "2M op by op": fused(huge, r_huge, False),
                "4K fused": fused(small, r_small, True),
                "2M fused": fused(huge, r_huge, True),
            }
            rates = interleaved_rates(runs, b, tokens, repeats)
            first = next(iter(rates.values()))
            floor = b / floor_ms(params, dt, b, m) * 1e3
            cells = "  ".join(f"{k} {r:6.1f} ({r / first:.3f}x)" for k, r in rates.items())
            load = os.getloadavg()[0]
            print(f"  {dt:<8} b{b:<3} floor {floor:6.0f}  {cells}  load {load:.1f}", flush=True)
        print(f"  AnonHugePages {anon_huge_kb() / 1024:.0f} MiB (both executors)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=list(ENGINES))
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average {' / '.join(f'{v:.1f}' for v in os.getloadavg())}")
    ensure_engines(args.dtypes)
    m = machine()
    print(
        f"machine: read {m['read_gbs']:.1f} GB/s, matmul fp32 {m['mm_float32']:.0f}, bf16 {m['mm_bfloat16']:.0f}"
    )
    for dt in args.dtypes:
        bench(dt, args.batches, args.tokens, args.repeats, m)


if __name__ == "__main__":
    main()
