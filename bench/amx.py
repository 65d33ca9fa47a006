"""The CPU kernels' AMX path against their weight-streaming path (and oneDNN), in one process, same run.

    .venv/bin/python bench/amx.py                 # linears + decode + prefill, both dtypes
    .venv/bin/python bench/amx.py --part linears  # only the projection shapes

linears: GFLOP/s of SmolLM2-135M's projections (576→960 qkv, 576→576 o, 576→3072 gate|up, 1536→576 down,
576→49152 lm_head) at 8..512 rows: our kernels with AMX (bf16 only), our weight-streaming kernel, and torch's
matmul on the plain weight (oneDNN; AMX in bf16). decode: our engine's base-model decode tokens/s at batch
8..64 with AMX on and off (cases alternate within each round), beside the floor of bench/engine.py. prefill:
tokens/s of one 512-token prompt, on and off, as a fraction of the measured matmul peak of its dtype.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from engine import ENGINES, MAX_SEQ, EngineDir, TorchExecutor, _time, ensure_engines, floor_ms, machine
from engine_cases import PREFILL_LEN, ours_prefill, ours_runner, prefill_flops

from trtllm_peft.executor.torch import cpu_kernels
from trtllm_peft.executor.torch.linear import KernelLinear

SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576), (576, 49152)]  # (in, out)
DTYPES = ["bfloat16", "float32"]
NAMES = {True: "AMX", False: "streaming"}


def best(fn, n: int) -> float:
    fn()
    t = float("inf")
    for _ in range(n):
        s = time.perf_counter()
        fn()
        t = min(t, time.perf_counter() - s)
    return t


def linears(kernels, dtypes: list[str], rows: list[int]) -> None:
    print("GFLOP/s: ours AMX / ours streaming / torch matmul (oneDNN)")
    for dt in dtypes:
        for k, n in SHAPES:
            w = torch.randn(n, k).to(getattr(torch, dt))
            ours, wt, cells = KernelLinear(kernels, w), w.t(), []
            for m in rows:
                x = torch.randn(m, k).to(w.dtype)
                t = {}
                for on in (True, False):
                    kernels.set_amx(on)
                    t[on] = best(lambda: ours(x), 10)  # noqa: B023
                kernels.set_amx(True)
                t["mm"] = best(lambda: x @ wt, 10)  # noqa: B023
                cells.append(f"{m}: " + "/".join(f"{2 * m * n * k / v / 1e9:.0f}" for v in t.values()))
            print(f"  {dt:<8} {k:>4}→{n:<5} " + "  ".join(cells), flush=True)


def toggled(kernels, run, on: bool, min_rows: int = 5):
    def go(tokens: int) -> None:
        kernels.set_amx(on, min_rows)
        try:
            run(tokens)
        finally:
            kernels.set_amx(True)

    return go


def decode(kernels, dt: str, batches: list[int], n: int, repeats: int, m: dict, min_rows: int) -> None:
    paths = (True, False) if dt == "bfloat16" else (False,)  # float32 has no AMX path
    e = EngineDir.open(ENGINES[dt])
    weights = e.load_weights()
    params, flops = sum(v.numel() for v in weights.values()), prefill_flops(weights, e.hf_config)
    del weights
    sizes = dict(max_batch_size=max(batches), max_seq_len=MAX_SEQ, memory_budget_bytes=4 * 2**30)
    with TorchExecutor(ENGINES[dt], **sizes) as ex:
        for b in batches:
            run = ours_runner(ex, [], b, 0)
            runs = {on: toggled(kernels, run, on, min_rows) for on in paths}
            t1, tn = dict.fromkeys(runs, float("inf")), dict.fromkeys(runs, float("inf"))
            for _ in range(repeats):
                for on, run in runs.items():
                    t1[on] = min(t1[on], _time(lambda run=run: run(1)))
                    tn[on] = min(tn[on], _time(lambda run=run: run(n)))
            floor = b / floor_ms(params, dt, b, m) * 1e3
            cells = [f"{NAMES[on]} {b * (n - 1) / (tn[on] - t1[on]):7.1f} tok/s" for on in runs]
            print(f"  decode  {dt:<8} batch {b:<3} floor {floor:7.1f}  " + "  ".join(cells), flush=True)
        prefill = ours_prefill(ex)  # one prompt source: a fresh prompt on every call, whichever path runs
        runs = {on: toggled(kernels, prefill, on) for on in paths}
        best_t = dict.fromkeys(runs, float("inf"))
        for _ in range(repeats + 1):  # a fresh 512-token prompt every call (engine_cases.prefill_prompts)
            for on, run in runs.items():
                best_t[on] = min(best_t[on], _time(lambda run=run: run(1)))
        peak = m[f"mm_{dt}"]
        for on, t in best_t.items():
            print(
                f"  prefill {dt:<8} {NAMES[on]:<9} {PREFILL_LEN / t:7.0f} tok/s  "
                f"{flops / t / 1e9:5.0f} GFLOP/s = {flops / t / 1e9 / peak:.0%} of the matmul peak {peak:.0f}",
                flush=True,
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["all", "linears", "engine"], default="all")
    ap.add_argument("--dtypes", nargs="+", default=DTYPES, choices=DTYPES)
    ap.add_argument("--rows", default="8,16,32,64,128,512")
    ap.add_argument("--batches", default="8,16,32,64")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-rows", type=int, default=5, help="fewest rows the AMX case puts on AMX tiles")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kernels = cpu_kernels.load()
    assert kernels is not None, cpu_kernels.why_unavailable()
    kernels.set_num_threads(args.threads)
    load = os.getloadavg()
    print(
        f"AMX available: {kernels.amx_available()}; load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}"
    )
    if args.part in ("all", "linears"):
        linears(kernels, args.dtypes, [int(r) for r in args.rows.split(",")])
    if args.part in ("all", "engine"):
        ensure_engines(args.dtypes)
        m = machine()
        print(
            f"machine: read {m['read_gbs']:.1f} GB/s, matmul fp32 {m['mm_float32']:.0f}, bf16 {m['mm_bfloat16']:.0f}"
        )
        for dt in args.dtypes:
            decode(
                kernels,
                dt,
                [int(b) for b in args.batches.split(",")],
                args.tokens,
                args.repeats,
                m,
                args.min_rows,
            )
    load = os.getloadavg()
    print(f"load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")


if __name__ == "__main__":
    main()
