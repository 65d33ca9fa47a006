"""Decode products' thread split, A/B in one process: tokens/s and tokens per CPU-second, variants alternating.

    .venv/bin/python bench/decode_split.py --dtypes bfloat16 --batches 8 32 --rounds 5
    .venv/bin/python bench/decode_split.py --busy 1      # beside one busy-looping process (a loaded box)

Variants (`set_split(steal, spin_us, sleep)`, csrc/thread_pool.cpp): decode products in contiguous halves
("halves", the kernels before parallel_units) or in shares with stealing ("steal"); the caller yielding in a
loop while its worker is late (as before) or asleep ("sleep"); the pool workers spinning a given number of
microseconds between parallel regions before they sleep. Cases: the base model and 8 distinct
adapters (bench/engine.py's). tokens/s as bench/engine.py computes it (best of the rounds); CPU per token from
the process's CPU time (every thread: the engine's, the pool worker's spin included), median of the rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine import ENGINES, MAX_SEQ, ensure_engines  # noqa: E402
from engine_cases import N_ADAPTERS, make_adapters, ours_runner  # noqa: E402

from trtllm_peft import formats  # noqa: E402
from trtllm_peft.executor.torch import TorchExecutor  # noqa: E402
from trtllm_peft.executor.torch.cpu_kernels import load as load_kernels  # noqa: E402
from trtllm_peft.lora import load_spec, pack  # noqa: E402

# name -> set_split(steal, spin_us, sleep)
VARIANTS = {
    "halves": (False, 200, False),
    "steal": (True, 200, False),
    "steal+sleep": (True, 200, True),
    "steal+sleep, spin 50": (True, 50, True),
    "steal+sleep, spin 20": (True, 20, True),
}


def measure(run, n: int) -> tuple[float, float]:
    """(wall s, process CPU s) of run(n)."""
    w, c = time.perf_counter(), time.process_time()
    run(n)
    return time.perf_counter() - w, time.process_time() - c


def rates(runs: dict, b: int, n: int, rounds: int) -> dict[str, tuple[float, float]]:
    """variant -> (tokens/s of the best rounds, tokens per CPU-s of the median round)."""
    k = load_kernels()
    walls = {v: {1: [], n: []} for v in runs}
    cpus = {v: [] for v in runs}
    for _ in range(rounds):
        for v, run in runs.items():
            k.set_split(*VARIANTS[v[1]])
            try:
                (w1, c1), (wn, cn) = measure(run, 1), measure(run, n)
            finally:
                k.set_split()
            walls[v][1].append(w1)
            walls[v][n].append(wn)
            cpus[v].append(cn - c1)
    tok = b * (n - 1)
    return {
        v: (tok / max(min(walls[v][n]) - min(walls[v][1]), 1e-9), tok / statistics.median(cpus[v]))
        for v in runs
    }


def bench(dt: str, dirs: list[Path], args) -> None:
    engine = ENGINES[dt]
    packed = [pack(formats.load_for_engine(d, load_spec(engine)), getattr(torch, dt)) for d in dirs]
    sizes = dict(max_batch_size=max(args.batches), max_seq_len=MAX_SEQ, memory_budget_bytes=6 * 2**30)
    with TorchExecutor(engine, **sizes) as ex:
        for b in args.batches:
            cases = {"base": ours_runner(ex, packed, b, 0)}
            if args.adapters:
                cases["8 distinct"] = ours_runner(ex, packed, b, N_ADAPTERS)
            runs = {(c, v): r for c, r in cases.items() for v in args.variants}
            got = rates(runs, b, args.tokens, args.rounds)
            load = os.getloadavg()[0]
            for (c, v), (tps, cpu) in got.items():
                t0, c0 = got[(c, args.variants[0])]
                print(f"{dt:<9} b{b:<3} {c:<10} {v:<15} {tps:7.1f} tok/s ({tps / t0:.3f}x)  "
                      f"{cpu:7.1f} tok/CPU-s ({cpu / c0:.3f}x)  load {load:.1f}", flush=True)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=list(ENGINES))
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--variants", nargs="+", default=["halves", "steal"], choices=list(VARIANTS))
    ap.add_argument("--adapters", action="store_true", help="the 8 distinct adapters case too")
    ap.add_argument("--busy", type=int, default=0, help="busy-looping processes beside the bench")
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(f"load average {os.getloadavg()}")
    ensure_engines(args.dtypes)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            dirs = make_adapters(ENGINES[args.dtypes[0]], Path(tmp)) if args.adapters else []
            for dt in args.dtypes:
                bench(dt, dirs, args)
    finally:
        for p in busy:
            p.kill()
            p.wait()


if __name__ == "__main__":
    main()
