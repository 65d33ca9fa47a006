"""Reference engine vs transformers (+ peft): decode throughput, in one process, on the same prompts.

    .venv/bin/python bench/engine.py            # full run (float32 + bfloat16, batch 8 and 32)
    .venv/bin/python bench/engine.py --quick    # fewer tokens, one repeat

Decode throughput = (B × (N − 1)) / (time to generate N tokens − time to generate 1 token): prefill cancels
out. Rows: our engine base / 1 adapter / 8 distinct adapters (rank 16, all seven modules) / 8 distinct DoRA
adapters (the same, `use_dora=True`: target ≥ 0.9× the 8 plain ones, same run), transformers
`generate` base / peft 1 adapter / peft mixed batch (`adapter_names`). It also measures this machine's read
bandwidth and matmul rate and prints the physical floor of a decode step: weight bytes ÷ bandwidth, or
FLOPs ÷ matmul rate where larger. Writes bench/results/engine.json and bench/engine.png.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trtllm_peft import formats  # noqa: E402
from trtllm_peft.engine.base_weights import BaseWeights  # noqa: E402
from trtllm_peft.engine.build import build_engine  # noqa: E402
from trtllm_peft.engine.engine_dir import EngineDir, hf_checkpoint  # noqa: E402
from trtllm_peft.executor.api import LoraConfig, Request  # noqa: E402
from trtllm_peft.executor.torch import TorchExecutor  # noqa: E402
from trtllm_peft.lora import load_spec, pack  # noqa: E402

ENGINES = {"float32": ROOT / "engines" / "smollm2-135m", "bfloat16": ROOT / "engines" / "smollm2-135m-bf16"}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPT_LEN, RANK, N_ADAPTERS = 16, 16, 8
DORA_CASE = f"{N_ADAPTERS} distinct DoRA adapters"


def machine() -> dict[str, float]:
    """Read bandwidth (GB/s) and matmul rate (GFLOP/s, float32 and bfloat16) of this machine, now."""
    x = torch.ones(256 * 2**20 // 4)  # 256 MiB
    x.sum()
    t = _best(lambda: x.sum(), 5)
    out = {"read_gbs": x.numel() * 4 / t / 1e9}
    for dt in (torch.float32, torch.bfloat16):
        a, b = torch.randn(1024, 1024, dtype=dt), torch.randn(1024, 1024, dtype=dt)
        a @ b
        out[f"mm_{dt}".replace("torch.", "")] = 2 * 1024**3 / _best(lambda: a @ b, 5) / 1e9  # noqa: B023
    return out


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


def prompts(batch: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(100, 40000, (batch, PROMPT_LEN), generator=g).tolist()


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def interleaved_rates(runs: dict[str, object], batch: int, n: int, repeats: int) -> dict[str, float]:
    """Decode tokens/s per case: (B·(n−1)) / (best time of n tokens − best time of 1 token).

    Cases alternate within each round, so load from other processes hits them alike; best-of-rounds.
    """
    t1 = dict.fromkeys(runs, float("inf"))
    tn = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, run in runs.items():
            t1[name] = min(t1[name], _time(lambda run=run: run(1)))
            tn[name] = min(tn[name], _time(lambda run=run: run(n)))
    return {k: batch * (n - 1) / max(tn[k] - t1[k], 1e-9) for k in runs}


# ---- our engine ---------------------------------------------------------------------------------------


def ours_runner(ex: TorchExecutor, packed: list, batch: int, n_adapters: int, first_task: int = 1):
    """run(tokens): one batch through the executor, adapters i % n_adapters (weights sent once per task;
    task ids from `first_task`, so that two sets of adapters never share one)."""
    sent: set[int] = set()

    def lora(i: int):
        if not n_adapters:
            return None
        j = i % n_adapters
        if j in sent:
            return LoraConfig(first_task + j)
        sent.add(j)
        return LoraConfig(first_task + j, packed[j].weights, packed[j].config)

    def run(tokens: int) -> None:
        ids = ex.enqueue_requests(
            [Request(p, tokens, lora_config=lora(i)) for i, p in enumerate(prompts(batch))]
        )
        left = set(ids)
        while left:
            for r in ex.await_responses(timeout=600):
                assert not r.has_error(), r.error_msg
                left.discard(r.request_id)

    run(2)  # warm-up: adapters into the cache
    return run


# ---- transformers + peft ------------------------------------------------------------------------------


def hf_model(engine: Path, dtype: torch.dtype):
    """transformers' model on exactly the engine's weights (a checkpoint view, loaded by from_pretrained)."""
    from transformers import AutoModelForCausalLM

    view = hf_checkpoint(EngineDir.open(engine), Path(tempfile.mkdtemp(prefix="hf_view_")))
    return AutoModelForCausalLM.from_pretrained(str(view), dtype=dtype).eval()


def make_adapters(engine: Path, out: Path, dora: bool = False) -> list[Path]:
    """N_ADAPTERS real peft adapters (rank 16, all modules, random non-zero weights; DoRA: magnitudes too), saved."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    dirs = []
    for i in range(N_ADAPTERS):
        cfg = PeftLoraConfig(r=RANK, lora_alpha=32, target_modules=TARGETS, use_dora=dora)
        m = get_peft_model(hf_model(engine, torch.float32), cfg)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "lora_" in name:  # DoRA magnitudes: around their initial ‖W + s·B·A‖, random
                    p.copy_(p * (1 + 0.2 * torch.randn(p.shape, generator=g)) if "magnitude" in name else
                            torch.randn(p.shape, generator=g) * 0.02)  # fmt: skip
        d = out / f"{'dora' if dora else 'a'}{i}"
        m.save_pretrained(str(d))
        dirs.append(d)
    return dirs


def hf_runner(model, batch: int, **gen_kwargs):
    ids = torch.tensor(prompts(batch))

    def run(tokens: int) -> None:
        with torch.inference_mode():
            model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                pad_token_id=0,
                **gen_kwargs,
            )

    run(2)
    return run


def peft_model(engine: Path, dtype: torch.dtype, dirs: list[Path]):
    from peft import PeftModel

    model = PeftModel.from_pretrained(
        hf_model(engine, dtype), str(dirs[0]), adapter_name="a0", torch_dtype=dtype
    )
    for i, d in enumerate(dirs[1:], start=1):
        model.load_adapter(str(d), adapter_name=f"a{i}")
    model.set_adapter("a0")
    return model.eval()


# ---- main ---------------------------------------------------------------------------------------------


def ensure_engines(dtypes: list[str]) -> None:
    for dt in dtypes:
        if not (ENGINES[dt] / "model.safetensors").is_file():
            build_engine(None, ENGINES[dt], dtype=dt, max_batch_size=32, max_seq_len=512, quiet=False)


def bench_dtype(
    dt: str,
    batches: list[int],
    n: int,
    repeats: int,
    dirs: list[Path],
    rows: list[dict],
    m: dict,
    torch_ops: bool = False,
    dora_dirs: list[Path] = (),
) -> None:
    engine, torch_dt = ENGINES[dt], getattr(torch, dt)
    spec, base_weights = load_spec(engine), BaseWeights.open(engine)
    packed = [pack(formats.load_for_engine(d, spec), torch_dt) for d in dirs]
    # DoRA: magnitudes normalized once, here, against this engine's weights (what the server does at load)
    dora = [pack(formats.load_for_engine(d, spec, base_weights), torch_dt) for d in dora_dirs]
    params = sum(v.numel() for v in EngineDir.open(engine).load_weights().values())
    base, pm = hf_model(engine, torch_dt), peft_model(engine, torch_dt, dirs)
    mixed = f"{N_ADAPTERS} distinct adapters"
    sizes = dict(max_batch_size=max(batches), max_seq_len=PROMPT_LEN + n + 8, memory_budget_bytes=6 * 2**30)
    with contextlib.ExitStack() as stack:
        ex = stack.enter_context(TorchExecutor(engine, **sizes))
        plain = stack.enter_context(TorchExecutor(engine, cpu_kernels=False, **sizes)) if torch_ops else None
        for b in batches:
            runs = {
                ("trtllm-peft (ours)", "base"): ours_runner(ex, packed, b, 0),
                ("trtllm-peft (ours)", "1 adapter"): ours_runner(ex, packed, b, 1),
                ("trtllm-peft (ours)", mixed): ours_runner(ex, packed, b, N_ADAPTERS),
                ("transformers+peft", "base"): hf_runner(base, b),
                ("transformers+peft", "1 adapter"): hf_runner(pm, b),
                ("transformers+peft", mixed): hf_runner(
                    pm, b, adapter_names=[f"a{i % N_ADAPTERS}" for i in range(b)]
                ),
            }
            if dora:  # task ids after the plain adapters': a reused id would serve the plain weights
                runs[("trtllm-peft (ours)", DORA_CASE)] = ours_runner(ex, dora, b, N_ADAPTERS, N_ADAPTERS + 1)
            if plain is not None:  # the same engine on plain torch ops: what the CPU kernels add
                runs[("trtllm-peft, torch ops", "base")] = ours_runner(plain, packed, b, 0)
                runs[("trtllm-peft, torch ops", mixed)] = ours_runner(plain, packed, b, N_ADAPTERS)
                if dora:
                    runs[("trtllm-peft, torch ops", DORA_CASE)] = ours_runner(
                        plain, dora, b, N_ADAPTERS, N_ADAPTERS + 1
                    )
            rates = {
                ("floor", "base"): b / floor_ms(params, dt, b, m) * 1e3,
                **interleaved_rates(runs, b, n, repeats),
            }
            for (system, case), rate in rates.items():
                rows.append({"dtype": dt, "batch": b, "system": system, "case": case, "tok_s": rate})
                print(f"  {dt:<9} batch {b:<3} {system:<22} {case:<20} {rate:8.1f} tok/s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8 tokens, batch 8 only, two rounds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(ENGINES))
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument(
        "--torch-ops",
        action="store_true",
        help="also run our engine on plain torch ops (TRTLLM_PEFT_CPU_KERNELS=0)",
    )
    ap.add_argument("--no-dora", action="store_true", help="skip the 8 DoRA adapters case")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n = args.tokens or (8 if args.quick else 24)
    batches, repeats = ([8], 2) if args.quick else ([8, 32], 2)
    load = os.getloadavg()
    print(f"threads {args.threads}, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min)")
    ensure_engines(args.dtypes)
    m = machine()
    print(
        f"machine: read {m['read_gbs']:.1f} GB/s, matmul fp32 {m['mm_float32']:.0f} GFLOP/s, bf16 {m['mm_bfloat16']:.0f} GFLOP/s"
    )
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        dirs = make_adapters(ENGINES[args.dtypes[0]], Path(tmp))
        dora_dirs = [] if args.no_dora else make_adapters(ENGINES[args.dtypes[0]], Path(tmp), dora=True)
        for dt in args.dtypes:
            bench_dtype(dt, batches, n, repeats, dirs, rows, m, args.torch_ops, dora_dirs)
    report(rows, m, args, load)


def report(rows: list[dict], m: dict, args, load) -> None:
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": m,
        "threads": args.threads,
        "quick": args.quick,
        "load_average_start": load,
        "load_average_end": os.getloadavg(),
    }
    (out / "engine.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(markdown(rows))
    print(targets(rows))
    plot(rows, ROOT / "bench" / "engine.png")


def _rate(rows, dt, b, system, case):
    return next(
        (
            r["tok_s"]
            for r in rows
            if (r["dtype"], r["batch"], r["system"], r["case"]) == (dt, b, system, case)
        ),
        None,
    )


def markdown(rows: list[dict]) -> str:
    keys = sorted({(r["dtype"], r["batch"]) for r in rows})
    cases = list(dict.fromkeys((r["system"], r["case"]) for r in rows))
    head = "| system | case | " + " | ".join(f"{d} b{b}" for d, b in keys) + " |"
    lines = [head, "|" + "---|" * (2 + len(keys))]
    for s, c in cases:
        vals = [_rate(rows, d, b, s, c) for d, b in keys]
        lines.append(f"| {s} | {c} | " + " | ".join(f"{v:.0f}" if v else "–" for v in vals) + " |")
    return "decode tokens/s\n" + "\n".join(lines)


def targets(rows: list[dict]) -> str:
    lines = ["targets (batch 8):"]
    for dt in sorted({r["dtype"] for r in rows}):
        ours_b = _rate(rows, dt, 8, "trtllm-peft (ours)", "base")
        mixed = _rate(rows, dt, 8, "trtllm-peft (ours)", f"{N_ADAPTERS} distinct adapters")
        hf_b = _rate(rows, dt, 8, "transformers+peft", "base")
        hf_mixed = _rate(rows, dt, 8, "transformers+peft", f"{N_ADAPTERS} distinct adapters")
        floor = _rate(rows, dt, 8, "floor", "base")
        if None in (ours_b, mixed, hf_b, hf_mixed, floor):
            continue
        checks = [
            ("base ≥ 2× transformers base", ours_b / hf_b, 2.0),
            ("base ≥ 60% of floor", ours_b / floor, 0.6),
            ("8 adapters ≥ 0.75× our base", mixed / ours_b, 0.75),
            ("8 adapters ≥ 3× peft mixed", mixed / hf_mixed, 3.0),
        ]
        dora = _rate(rows, dt, 8, "trtllm-peft (ours)", DORA_CASE)
        if dora is not None:
            checks.append(("8 DoRA ≥ 0.9× 8 plain adapters", dora / mixed, 0.9))
        for name, value, want in checks:
            lines.append(f"  {dt:<9} {name:<30} {value:5.2f}  {'met' if value >= want else 'MISSED'}")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["dtype"], r["batch"]) for r in rows})
    cases = list(dict.fromkeys((r["system"], r["case"]) for r in rows))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(cases)
    for i, (s, c) in enumerate(cases):
        vals = [_rate(rows, d, b, s, c) or 0 for d, b in keys]
        ax.bar([k + i * width for k in range(len(keys))], vals, width, label=f"{s}: {c}")
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(keys))], [f"{d}, batch {b}" for d, b in keys])
    ax.set_ylabel("decode tokens/s")
    ax.set_title("SmolLM2-135M decode throughput, CPU (higher is better)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
