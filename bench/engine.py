"""Reference engine vs OpenVINO GenAI and transformers (+ peft): decode and prefill throughput, same prompts.

    .venv/bin/python bench/engine.py                    # float32 + bfloat16, batch 8/16/32/64, 24 new tokens
    .venv/bin/python bench/engine.py --peer openvino    # + OpenVINO GenAI (`make openvino` first)
    .venv/bin/python bench/engine.py --quick            # batch 8 only, 8 new tokens

Decode throughput = (B × (N − 1)) / (time to generate N tokens − time to generate 1 token): prefill cancels
out. Rows: our engine base / 1 adapter / 8 distinct adapters (rank 16, all seven modules) / 8 distinct DoRA
adapters (the same, `use_dora=True`), OpenVINO GenAI base / 1 adapter / 8 distinct adapters (one adapter set
per generate() call, so 8 calls), transformers `generate` base / peft 1 adapter / peft mixed batch
(`adapter_names`). Prefill: tokens/s of one 512-token prompt (time to first token), as a share of the
measured matmul peak of its dtype. It also measures this machine's read bandwidth and matmul rate and prints
the physical floor of a decode step: weight bytes ÷ bandwidth, or FLOPs ÷ matmul rate where larger. Writes
bench/results/engine.json and bench/engine.png, and prints every target met or missed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine_cases import (  # noqa: E402
    N_ADAPTERS,
    PREFILL_LEN,
    PROMPT_LEN,
    hf_model,
    hf_prefill,
    hf_runner,
    make_adapters,
    ours_prefill,
    ours_runner,
    ours_tokens,
    peft_model,
    prefill_flops,
)
from engine_report import DORA_CASE, HF, MIXED, OURS, OV, report  # noqa: E402

from trtllm_peft import formats  # noqa: E402
from trtllm_peft.engine.base_weights import BaseWeights  # noqa: E402
from trtllm_peft.engine.build import build_engine  # noqa: E402
from trtllm_peft.engine.engine_dir import EngineDir  # noqa: E402
from trtllm_peft.executor.torch import TorchExecutor, huge_pages  # noqa: E402
from trtllm_peft.lora import load_spec, pack  # noqa: E402

# the bench's own engines: batch 64 and a 512-token prompt need more than the default engine's limits
ENGINES = {dt: ROOT / "engines" / f"bench-smollm2-135m-{dt}" for dt in ("float32", "bfloat16")}
MAX_BATCH, MAX_SEQ = 64, 1024


def machine() -> dict[str, float]:
    """Read bandwidth (GB/s) and matmul rate (GFLOP/s, float32 and bfloat16) of this machine, now.

    The bandwidth is read from 2 MiB pages, where the engine keeps its weights and KV pool: on this AMD EPYC
    a sum reads 62 GB/s there against 37 GB/s on 4 KiB pages (torch.ones gets 4 KiB pages unless THP is
    `always`, and a lucky reading landed on huge pages now and then, so the floor moved between runs)."""
    x = huge_pages.empty((256 * 2**20 // 4,), torch.float32).fill_(1.0)  # 256 MiB
    x.sum()
    t = _best(lambda: x.sum(), 5)
    return {
        "read_gbs": x.numel() * 4 / t / 1e9,
        **{f"mm_{dt}": mm_rate(dt) for dt in ("float32", "bfloat16")},
    }


def mm_rate(dtype: str) -> float:
    """GFLOP/s of torch's 1024×1024×1024 matmul in `dtype` (oneDNN: AMX tiles for bfloat16 where the CPU has
    them), best of five."""
    a, b = (torch.randn(1024, 1024, dtype=getattr(torch, dtype)) for _ in range(2))
    a @ b
    return 2 * 1024**3 / _best(lambda: a @ b, 5) / 1e9


def refresh(m: dict[str, float]) -> None:
    """Measure the machine again and keep the best of each figure: one reading under load from other jobs
    would set a floor the engines beat (the floors come from the best readings of the whole run)."""
    for k, v in machine().items():
        m[k] = max(m[k], v)


def floor_rows(result: dict, m: dict[str, float]) -> list[dict]:
    keys = dict.fromkeys((r["dtype"], r["batch"]) for r in result["rows"])
    return [
        {"dtype": dt, "batch": b, "system": "floor", "case": "base",
         "tok_s": b / floor_ms(result["meta"]["params"][dt], dt, b, m) * 1e3}
        for dt, b in keys
    ]  # fmt: skip


def _best(fn, n: int) -> float:
    best = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def floor_ms(params: int, dtype: str, batch: int, m: dict[str, float]) -> float:
    """Physical floor of one decode step: weights read once, or the matmul FLOPs, whichever takes longer."""
    size = 4 if dtype == "float32" else 2
    read = params * size / (m["read_gbs"] * 1e9)
    compute = 2 * params * batch / (m[f"mm_{dtype}"] * 1e9)
    return max(read, compute) * 1e3


def _time(fn) -> float:
    """Seconds one call of fn takes; a runner that times itself (the OpenVINO worker) returns them."""
    t = time.perf_counter()
    own = fn()
    return own if isinstance(own, float) else time.perf_counter() - t


def best_times(runs: dict, tokens: list[int], repeats: int) -> dict[tuple, dict[int, float]]:
    """Best time of each case for each token count; cases alternate within each round, so load from other
    processes hits them alike."""
    best = {k: dict.fromkeys(tokens, float("inf")) for k in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            for n in tokens:
                best[name][n] = min(best[name][n], _time(lambda run=run, n=n: run(n)))
    return best


def interleaved_rates(runs: dict, batch: int, n: int, repeats: int) -> dict[tuple, float]:
    """Decode tokens/s per case: (B·(n−1)) / (best time of n tokens − best time of 1 token)."""
    best = best_times(runs, [1, n], repeats)
    return {k: batch * (n - 1) / max(t[n] - t[1], 1e-9) for k, t in best.items()}


def ensure_engines(dtypes: list[str]) -> None:
    for dt in dtypes:
        cfg = ENGINES[dt] / "config.json"
        bc = EngineDir.open(ENGINES[dt]).config["build_config"] if cfg.is_file() else {}
        if bc.get("max_batch_size", 0) < MAX_BATCH or bc.get("max_seq_len", 0) < MAX_SEQ:
            build_engine(
                None, ENGINES[dt], dtype=dt, max_batch_size=MAX_BATCH, max_seq_len=MAX_SEQ, quiet=False
            )


def decode_runs(ex, plain, ov, hf: tuple, packed: list, dora: list, b: int, hf_batches: list[int]) -> dict:
    """Every decode case at batch b: (system, case) → run(tokens)."""
    runs = {
        (OURS, "base"): ours_runner(ex, packed, b, 0),
        (OURS, "1 adapter"): ours_runner(ex, packed, b, 1),
        (OURS, MIXED): ours_runner(ex, packed, b, N_ADAPTERS),
    }
    if dora:  # task ids after the plain adapters': a reused id would serve the plain weights
        runs[(OURS, DORA_CASE)] = ours_runner(ex, dora, b, N_ADAPTERS, N_ADAPTERS + 1)
    if ov is not None:
        for case, k in (("base", 0), ("1 adapter", 1), (MIXED, N_ADAPTERS)):
            runs[(OV, case)] = ov.runner(b, k)
    if b in hf_batches:
        base, pm = hf
        runs[(HF, "base")] = hf_runner(base, b)
        runs[(HF, "1 adapter")] = hf_runner(pm, b)
        runs[(HF, MIXED)] = hf_runner(pm, b, adapter_names=[f"a{i % N_ADAPTERS}" for i in range(b)])
    if plain is not None:  # the same engine on plain torch ops: what the CPU kernels add
        runs[("trtllm-peft, torch ops", "base")] = ours_runner(plain, packed, b, 0)
        runs[("trtllm-peft, torch ops", MIXED)] = ours_runner(plain, packed, b, N_ADAPTERS)
    return runs


def prefill_rows(dt: str, ex, ov, hf_base, flops: float, m: dict, repeats: int) -> list[dict]:
    """Time to first token of one PREFILL_LEN-token prompt, best of `repeats` interleaved rounds; the matmul
    peak it is compared with is measured in the same rounds (best of the run start's and theirs), so that
    both see the same load."""
    runs = {OURS: ours_prefill(ex), HF: hf_prefill(hf_base)}
    if ov is not None:
        runs[OV] = ov.prefill()
    best, peak = dict.fromkeys(runs, float("inf")), m[f"mm_{dt}"]
    for _ in range(repeats):
        for name, run in runs.items():
            best[name] = min(best[name], _time(lambda run=run: run(1)))
        peak = max(peak, mm_rate(dt))
    m[f"mm_{dt}"] = peak
    rows = []
    for system, t in best.items():
        gflops = flops / t / 1e9
        rows.append({"dtype": dt, "system": system, "tok_s": PREFILL_LEN / t, "gflops": gflops,
                     "peak_gflops": peak, "pct_peak": gflops / peak})  # fmt: skip
        print(f"  {dt:<9} prefill {PREFILL_LEN} {system:<22} {PREFILL_LEN / t:8.0f} tok/s {gflops:6.0f} GFLOP/s "
              f"(peak {peak:.0f})")  # fmt: skip
    return rows


def bench_dtype(dt: str, args, dirs: list[Path], dora_dirs: list[Path], m: dict, result: dict) -> None:
    engine, torch_dt = ENGINES[dt], getattr(torch, dt)
    spec, base_weights = load_spec(engine), BaseWeights.open(engine)
    packed = [pack(formats.load_for_engine(d, spec), torch_dt) for d in dirs]
    # DoRA: magnitudes normalized once, here, against this engine's weights (what the server does at load)
    dora = [pack(formats.load_for_engine(d, spec, base_weights), torch_dt) for d in dora_dirs]
    e = EngineDir.open(engine)
    weights = e.load_weights()
    result["meta"]["params"][dt] = sum(v.numel() for v in weights.values())
    flops = prefill_flops(weights, e.hf_config)
    del weights
    hf = hf_model(engine, torch_dt), peft_model(engine, torch_dt, dirs)
    sizes = dict(max_batch_size=max(args.batches), max_seq_len=MAX_SEQ, memory_budget_bytes=6 * 2**30)
    with contextlib.ExitStack() as stack:
        ex = stack.enter_context(TorchExecutor(engine, **sizes))
        plain = (
            stack.enter_context(TorchExecutor(engine, cpu_kernels=False, **sizes)) if args.torch_ops else None
        )
        ov = None
        if args.peer == "openvino":
            from engine_openvino import OpenVinoPeer, agreement

            ov = stack.enter_context(OpenVinoPeer(engine, dt, dirs, args.threads, max(args.batches)))
            agree = agreement(ours_tokens(ex, 8, args.tokens), ov.tokens(8, args.tokens))
            result["openvino"]["agreement"][dt] = agree
            print(f"  {dt:<9} OpenVINO greedy agreement with ours (base, batch 8): {agree}")
        result["prefill"] += prefill_rows(dt, ex, ov, hf[0], flops, m, args.repeats + 1)
        for b in args.batches:
            runs = decode_runs(ex, plain, ov, hf, packed, dora, b, args.hf_batches)
            refresh(m)
            for (system, case), r in interleaved_rates(runs, b, args.tokens, args.repeats).items():
                result["rows"].append({"dtype": dt, "batch": b, "system": system, "case": case, "tok_s": r})
                print(f"  {dt:<9} batch {b:<3} {system:<22} {case:<26} {r:8.1f} tok/s", flush=True)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8 tokens, batch 8 only, two rounds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(ENGINES))
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="default 8 16 32 64 (--quick: 8)")
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=2, help="rounds; each case keeps its best")
    ap.add_argument(
        "--peer", choices=["openvino"], default=None, help="also run OpenVINO GenAI (make openvino)"
    )
    ap.add_argument(
        "--hf-batches",
        type=int,
        nargs="+",
        default=[8, 32],
        help="batches with transformers+peft rows (slow)",
    )
    ap.add_argument("--torch-ops", action="store_true", help="also run our engine on plain torch ops")
    ap.add_argument("--no-dora", action="store_true", help="skip the 8 DoRA adapters case")
    args = ap.parse_args()
    args.tokens = args.tokens or (8 if args.quick else 24)
    args.batches = args.batches or ([8] if args.quick else [8, 16, 32, 64])
    if max(args.batches) > MAX_BATCH:
        ap.error(f"--batches: at most {MAX_BATCH}")
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.peer == "openvino":
        from engine_openvino import check_installed

        check_installed()
    load = os.getloadavg()
    print(f"threads {args.threads}, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min)")
    ensure_engines(args.dtypes)
    m = machine()
    print(f"machine: read {m['read_gbs']:.1f} GB/s, matmul fp32 {m['mm_float32']:.0f} GFLOP/s, "
          f"bf16 {m['mm_bfloat16']:.0f} GFLOP/s")  # fmt: skip
    meta = {"machine_start": dict(m), "machine": m, "params": {}, "threads": args.threads, "quick": args.quick, "tokens": args.tokens,
            "prompt_len": PROMPT_LEN, "load_average_start": load}  # fmt: skip
    result = {"meta": meta, "rows": [], "prefill": []}
    if args.peer == "openvino":
        from engine_openvino import HOW

        result["openvino"] = {"agreement": {}, "how": HOW}
    with tempfile.TemporaryDirectory() as tmp:
        dirs = make_adapters(ENGINES[args.dtypes[0]], Path(tmp))
        dora_dirs = [] if args.no_dora else make_adapters(ENGINES[args.dtypes[0]], Path(tmp), dora=True)
        for dt in args.dtypes:
            bench_dtype(dt, args, dirs, dora_dirs, m, result)
    result["rows"] = floor_rows(result, m) + result["rows"]
    print(f"machine, best of the run: read {m['read_gbs']:.1f} GB/s, matmul fp32 {m['mm_float32']:.0f} GFLOP/s, "
          f"bf16 {m['mm_bfloat16']:.0f} GFLOP/s")  # fmt: skip
    report(result, ROOT)


if __name__ == "__main__":
    main()
