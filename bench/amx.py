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
from engine import ROOT, EngineDir, TorchExecutor, _time, build_engine, floor_ms, machine, ours_runner

from trtllm_peft.executor.api import Request
from trtllm_peft.executor.torch import cpu_kernels
from trtllm_peft.executor.torch.linear import KernelLinear

SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576), (576, 49152)]  # (in, out)
PREFILL = 512
DTYPES = ["bfloat16", "float32"]
ENGINES = {dt: ROOT / "engines" / f"smollm2-135m-{dt}-b64" for dt in DTYPES}  # batch 64, 512-token prompts


def ensure_engines(dtypes: list[str]) -> None:
    for dt in dtypes:
        if not (ENGINES[dt] / "model.safetensors").is_file():
            build_engine(None, ENGINES[dt], dtype=dt, max_batch_size=64, max_seq_len=640, quiet=False)


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


def toggled(kernels, run, on: bool):
    def go(tokens: int) -> None:
        kernels.set_amx(on)
        try:
            run(tokens)
        finally:
            kernels.set_amx(True)

    return go


def decode(kernels, dt: str, batches: list[int], n: int, repeats: int, m: dict) -> None:
    engine = ENGINES[dt]
    params = sum(v.numel() for v in EngineDir.open(engine).load_weights().values())
    sizes = dict(max_batch_size=max(batches), max_seq_len=PREFILL + 8, memory_budget_bytes=4 * 2**30)
    with TorchExecutor(engine, **sizes) as ex:
        for b in batches:
            runs = {on: toggled(kernels, ours_runner(ex, [], b, 0), on) for on in (True, False)}
            t1, tn = dict.fromkeys(runs, float("inf")), dict.fromkeys(runs, float("inf"))
            for _ in range(repeats):
                for on, run in runs.items():
                    t1[on] = min(t1[on], _time(lambda run=run: run(1)))
                    tn[on] = min(tn[on], _time(lambda run=run: run(n)))
            rate = {on: b * (n - 1) / (tn[on] - t1[on]) for on in runs}
            floor = b / floor_ms(params, dt, b, m) * 1e3
            print(
                f"  decode  {dt:<8} batch {b:<3} AMX {rate[True]:7.1f}  streaming {rate[False]:7.1f} tok/s"
                f"  floor {floor:7.1f}  ({rate[True] / floor:.0%} / {rate[False] / floor:.0%} of it)",
                flush=True,
            )
        g = torch.Generator().manual_seed(1)
        for on in (True, False):  # a new prompt every time: no cached prefix to reuse
            run = toggled(
                kernels, lambda _t: _one(ex, torch.randint(100, 40000, (PREFILL,), generator=g).tolist()), on
            )
            t = best(lambda run=run: run(1), repeats)
            gflops = 2 * params * PREFILL / t / 1e9
            peak = m[f"mm_{dt}"]
            print(
                f"  prefill {dt:<8} {'AMX' if on else 'streaming':<9} {PREFILL / t:7.0f} tok/s  "
                f"{gflops:5.0f} GFLOP/s = {gflops / peak:.0%} of the matmul peak {peak:.0f}",
                flush=True,
            )


def _one(ex, prompt: list[int]) -> None:
    (rid,) = ex.enqueue_requests([Request(prompt, 1)])
    while True:
        for r in ex.await_responses(timeout=600):
            assert not r.has_error(), r.error_msg
            if r.result.is_final:
                return


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["all", "linears", "engine"], default="all")
    ap.add_argument("--dtypes", nargs="+", default=DTYPES, choices=DTYPES)
    ap.add_argument("--rows", default="8,16,32,64,128,512")
    ap.add_argument("--batches", default="8,16,32,64")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
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
            decode(kernels, dt, [int(b) for b in args.batches.split(",")], args.tokens, args.repeats, m)
    load = os.getloadavg()
    print(f"load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")


if __name__ == "__main__":
    main()
