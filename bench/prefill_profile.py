"""Where a prefill of our engine goes: per op, one PREFILL_LEN-token prompt (bench/engine.py's prefill column).

    .venv/bin/python bench/prefill_profile.py --dtype float32
    .venv/bin/python bench/prefill_profile.py --dtype bfloat16 --rounds 5
    .venv/bin/python bench/prefill_profile.py --dtype bfloat16 --ab      # fresh-chunk attention variants

Runs one new PREFILL_LEN-token prompt at a time (a new random prompt each round, so the KV cache's block reuse
cannot serve it) through a real `TorchExecutor` (bench/engine.py's engines, the CPU kernels, the engine thread)
and times, on the engine thread, every op of the prefill iteration: the four projection groups summed over the
layers (GFLOP/s beside the machine's torch matmul rate of the dtype), the LM head (last token only), RMSNorm,
SiLU·up, the fresh chunk's attention with its parts (RoPE, KV put, SDPA) nested under it, the rest of the
forward (embedding, residual bookkeeping, Python), sampling, the step's inputs and the executor's own work.
The whole prefill is reported as bench/engine.py does: tokens/s and its FLOPs / second as a share of the
matmul peak (`prefill_flops`). Per op: the mean over the rounds after the first (a warm-up).

`--ab`: prefill tokens/s (and % of peak) of each fresh-attention variant (FRESH), alternating within each
round, best round of each.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from engine import ENGINES, MAX_SEQ, ensure_engines, machine
from engine_cases import PREFILL_LEN, ours_prefill, prefill_flops
from step_clock import Clock, TimedLinear, time_iterations

from trtllm_peft.engine.engine_dir import EngineDir
from trtllm_peft.executor.torch import TorchExecutor
from trtllm_peft.executor.torch import model as model_mod

PROJECTIONS = ("qkv", "o", "gate_up", "down")
NESTED = "  ↳ "  # timed inside the line above it: not added to the ops' sum
# LlamaModel.fresh_kernel: RoPE + KV put in one kernel call (fresh_qkv) before torch's SDPA, or torch ops;
# "attend_chunk": fresh chunks like the others through the chunk-attention kernel (LlamaModel.fresh_sdpa off);
# "sdpa 1 thread": fresh_qkv, then torch's SDPA on one OpenMP thread (no OpenMP team beside the kernels' pool)
FRESH = ("kernel", "torch", "attend_chunk", "sdpa 1 thread")


def one_thread(fn):
    def run(*a, **kw):
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*a, **kw)
        finally:
            torch.set_num_threads(n)

    return run


def instrument(ex: TorchExecutor, clock: Clock) -> None:
    """Wrap the engine's ops (this executor's model and ops; module functions for the nested parts)."""
    model = ex.model
    model.fuse = False  # op by op, each op timed (fused, norms and SiLU run inside the projections' calls)
    for ly in model.layers:
        for name in PROJECTIONS:
            setattr(ly, name, TimedLinear(getattr(ly, name), name, clock))
    model.lm_head = TimedLinear(model.lm_head, "lm_head", clock)
    for name in ("rms_norm", "silu_mul", "attend_chunk", "attend_decode"):
        setattr(ex.ops, name, clock.timed(name, getattr(ex.ops, name)))
    model._attend_fresh = clock.timed("attend_fresh", model._attend_fresh)
    model._split_rope = clock.timed(NESTED + "RoPE (torch ops)", model._split_rope)
    if model.fresh_kernel is not None:
        model.fresh_kernel = clock.timed(NESTED + "RoPE + KV put (kernel)", model.fresh_kernel)
    model_mod.F.scaled_dot_product_attention = clock.timed(
        NESTED + "SDPA", torch.nn.functional.scaled_dot_product_attention
    )
    ex.kv.put = clock.timed(NESTED + "KV put (torch)", ex.kv.put)
    time_iterations(ex, clock)


def report(steps: list[dict[str, float]], flops: dict[str, float], m: dict, dt: str) -> None:
    mean = {k: statistics.fmean(s.get(k, 0.0) for s in steps) * 1e3 for k in steps[0]}  # ms a prefill
    total, peak = mean["iteration"], m["mm_" + dt]
    print(f"{dt}: {len(steps)} prefills of {PREFILL_LEN} tokens, {total:.1f} ms = {PREFILL_LEN / total * 1e3:.0f} "
          f"tok/s = {flops['all'] / total / 1e6:.0f} GFLOP/s = {flops['all'] / total / 1e6 / peak:.0%} of the "
          f"matmul peak {peak:.0f} (best {min(s['iteration'] for s in steps) * 1e3:.1f} ms)")  # fmt: skip
    print("| op | ms | share | GFLOP/s | % of peak |\n|---|---|---|---|---|")
    ops = [*PROJECTIONS, "lm_head", "rms_norm", "silu_mul", "attend_fresh", "attend_chunk"]
    rows = [(k, mean.get(k, 0.0)) for k in ops]
    nested = [(k, v) for k, v in mean.items() if k.startswith(NESTED)]
    rows.append(("rest of the forward (Python, embedding)", mean["forward"] - sum(v for _, v in rows)))
    rows.append(("sampling", mean.get("sampling", 0.0)))
    rows.append(("step inputs / bookkeeping", mean["run_step"] - mean["forward"] - mean.get("sampling", 0.0)))
    rows.append(("executor iteration (responses, stats)", total - mean["run_step"]))
    for name, ms in rows:
        gfl = (
            f"{flops[name] / ms / 1e6:.0f} | {flops[name] / ms / 1e6 / peak:.0%}"
            if name in flops and ms
            else " | "
        )
        print(f"| {name} | {ms:.2f} | {ms / total:.0%} | {gfl} |")
        if name == "attend_fresh":
            for k, v in nested:
                print(f"| {k} | {v:.2f} | {v / total:.0%} | | |")


def op_flops(ex: TorchExecutor) -> dict[str, float]:
    """FLOPs per op of one PREFILL_LEN-token prefill, and of all of it as bench/engine.py counts them."""
    n, model = PREFILL_LEN, ex.model
    out = {name: 2.0 * n * sum(getattr(ly, name).in_features * getattr(ly, name).out_features
                               for ly in model.layers) for name in PROJECTIONS}  # fmt: skip
    out["lm_head"] = 2.0 * model.lm_head.in_features * model.lm_head.out_features
    out["attend_fresh"] = 2 * 2 * (n * (n + 1) / 2) * model.q_dim * len(model.layers)
    return out


def ab(ex: TorchExecutor, flops: float, m: dict, dt: str, rounds: int, timer=time.perf_counter) -> None:
    """Prefill tokens/s of each FRESH variant, alternating within each round; best round of each (timer:
    wall seconds, or with --cpu-time the process's CPU seconds, every thread's)."""
    run, best = ours_prefill(ex), dict.fromkeys(FRESH, float("inf"))
    model = ex.model
    kernel, sdpa, default = model.fresh_kernel, model._attend_fresh, model.fresh_sdpa
    assert kernel is not None, "the kernels module has no fresh_qkv"
    for _ in range(rounds):
        for name in FRESH:
            model.fresh_kernel = None if name == "torch" else kernel
            model._attend_fresh = one_thread(sdpa) if name == "sdpa 1 thread" else sdpa
            model.fresh_sdpa = name != "attend_chunk"
            t = timer()
            run(1)
            best[name] = min(best[name], timer() - t)
    model.fresh_kernel, model._attend_fresh, model.fresh_sdpa = kernel, sdpa, default
    for name, t in best.items():
        print(f"  {dt:<8} fresh attention {name:<12} {PREFILL_LEN / t:7.0f} tok/s  {flops / t / 1e9:6.0f} GFLOP/s "
              f"({flops / t / 1e9 / m['mm_' + dt]:.0%})  {t / best['torch']:.2f}x the time of torch")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=list(ENGINES), default="float32")
    ap.add_argument("--rounds", type=int, default=4, help="prefills run; the first is a warm-up")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ab", action="store_true", help="fresh-attention variants instead (FRESH)")
    ap.add_argument(
        "--cpu-time",
        action="store_true",
        help="CPU seconds (the engine thread's per op; --ab: the process's), robust under load",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("load average {:.1f} / {:.1f} / {:.1f}".format(*os.getloadavg()))
    ensure_engines([args.dtype])
    m = machine()
    print(
        f"machine: read {m['read_gbs']:.1f} GB/s, matmul {m['mm_' + args.dtype]:.0f} GFLOP/s ({args.dtype})"
    )
    e = EngineDir.open(ENGINES[args.dtype])
    sizes = dict(max_batch_size=8, max_seq_len=MAX_SEQ, memory_budget_bytes=4 * 2**30)
    with TorchExecutor(ENGINES[args.dtype], **sizes) as ex:
        total = prefill_flops(e.load_weights(), e.hf_config)
        if args.ab:
            timer = time.process_time if args.cpu_time else time.perf_counter
            ab(ex, total, m, args.dtype, args.rounds, timer)
        else:
            flops = {**op_flops(ex), "all": total}  # before the projections are wrapped
            clock = Clock(prefill=True, timer=time.thread_time if args.cpu_time else time.perf_counter)
            instrument(ex, clock)
            run = ours_prefill(ex)  # one warm-up prefill inside
            clock.steps.clear()
            for _ in range(args.rounds):
                run(1)
            report(clock.steps, flops, m, args.dtype)
    print("load average at the end {:.1f} / {:.1f} / {:.1f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()
