"""Decode tokens/s of the base model's call structures, one process, variants alternating per round.

    .venv/bin/python bench/decode_ab.py --dtypes bfloat16 float32 --batches 8 16 32 64

One executor; its decode-only steps run op by op (`model.fuse = False`: eight kernel calls a layer), two calls
a layer (`model.decoder = None`: the fused layer parts called from Python), or as one call (`model.decoder`,
csrc/decode_step.cpp: the default). Prints each variant's tokens/s (bench/engine.py's formula), its ratio to the
first, the floor and the load.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine import ENGINES, MAX_SEQ, ensure_engines, floor_ms, interleaved_rates, machine  # noqa: E402
from engine_cases import ours_runner  # noqa: E402

from trtllm_peft.executor.torch import TorchExecutor  # noqa: E402


def variant(ex: TorchExecutor, run, fuse: bool, one_call: bool):
    decoder = ex.model.decoder

    def go(n: int) -> None:
        ex.model.fuse, ex.model.decoder = fuse, decoder if one_call else None
        try:
            run(n)
        finally:
            ex.model.fuse, ex.model.decoder = True, decoder

    return go


def bench(dt: str, batches: list[int], tokens: int, repeats: int, m: dict, names: list[str]) -> None:
    sizes = dict(max_batch_size=max(batches), max_seq_len=MAX_SEQ, memory_budget_bytes=3 * 2**30)
    with TorchExecutor(ENGINES[dt], **sizes) as ex:
        layers = ex.model.layers
        params = ex.model.embed.numel() + sum(
            lin.packed.numel() for ly in layers for lin in (ly.qkv, ly.o, ly.gate_up, ly.down)
        )
        for b in batches:
            run = ours_runner(ex, [], b, 0)
            runs = {name: variant(ex, run, *VARIANTS[name]) for name in names}
            rates = interleaved_rates(runs, b, tokens, repeats)
            first = next(iter(rates.values()))
            floor = b / floor_ms(params, dt, b, m) * 1e3
            cells = "  ".join(f"{k} {r:6.1f} ({r / first:.3f}x, {r / floor:.1%})" for k, r in rates.items())
            load = os.getloadavg()[0]
            print(f"  {dt:<8} b{b:<3} floor {floor:6.0f}  {cells}  load {load:.1f}", flush=True)


# (model.fuse, model.decoder kept) per variant
VARIANTS = {
    "op by op": (False, False),
    "per layer": (True, False),
    "one call": (True, True),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=list(ENGINES))
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", nargs="+", default=["per layer", "one call"], choices=list(VARIANTS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average {' / '.join(f'{v:.1f}' for v in os.getloadavg())}")
    ensure_engines(args.dtypes)
    m = machine()
    print(
        f"machine: read {m['read_gbs']:.1f} GB/s, matmul fp32 {m['mm_float32']:.0f}, bf16 {m['mm_bfloat16']:.0f}"
    )
    for dt in args.dtypes:
        bench(dt, args.batches, args.tokens, args.repeats, m, args.variants)


if __name__ == "__main__":
    main()
