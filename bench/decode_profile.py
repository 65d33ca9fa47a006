"""Where a decode step of our engine goes: per op, per step, on the base model (no adapters).

    .venv/bin/python bench/decode_profile.py --dtype float32 --batch 8
    .venv/bin/python bench/decode_profile.py --dtype float32 --batch 32 --tokens 48
    .venv/bin/python bench/decode_profile.py --dtype bfloat16 --ab 8 16 32   # streaming knobs on vs off

Runs `--batch` requests through a real `TorchExecutor` (bench/engine.py's engines, the CPU kernels, the
engine thread) and times, on the engine thread, every op of the decode-only iterations: the four projection
groups summed over the layers, the LM head, RMSNorm, SiLU·up, attention, the rest of the forward
(embedding, residual bookkeeping, Python between the ops), sampling, the step's input building and the
executor's own iteration work (responses, stats). Projections are reported as achieved GB/s (packed weight
bytes read per second) beside the machine's read bandwidth measured the way bench/engine.py measures it,
and as GFLOP/s beside its float32/bfloat16 matmul rate. The timers cost ~0.3 µs a call (a few % of a step).

`--ab B..`: decode tokens/s (bench/engine.py's formula) of the weight-streaming kernel's variants (VARIANTS:
`set_streaming` settings, "before" = no prefetch, as the kernel was), alternating within each round.
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections import defaultdict

import torch
from engine import ENGINES, MAX_SEQ, ensure_engines, floor_ms, interleaved_rates, machine
from engine_cases import ours_runner
from step_clock import Clock, TimedLinear, time_iterations

from trtllm_peft.executor.torch import TorchExecutor

PROJECTIONS = ("qkv", "o", "gate_up", "down")


def instrument(ex: TorchExecutor, clock: Clock) -> dict[str, int]:
    """Wrap the engine's ops in timers; returns the packed weight bytes each projection group reads a step."""
    model, nbytes = ex.model, defaultdict(int)
    # op by op, each op timed (fused, a decode step is one call: bench/decode_ab.py compares them)
    model.fuse = False
    for ly in model.layers:
        for name in PROJECTIONS:
            lin = getattr(ly, name)
            nbytes[name] += lin.packed.numel() * lin.packed.element_size()
            setattr(ly, name, TimedLinear(lin, name, clock))
    nbytes["lm_head"] = model.lm_head.packed.numel() * model.lm_head.packed.element_size()
    model.lm_head = TimedLinear(model.lm_head, "lm_head", clock)
    for name in ("rms_norm", "silu_mul", "attend_decode"):
        setattr(ex.ops, name, clock.timed(name, getattr(ex.ops, name)))
    time_iterations(ex, clock)
    return dict(nbytes)


def report(steps: list[dict[str, float]], nbytes: dict[str, int], batch: int, m: dict, dt: str) -> None:
    mean = {k: statistics.fmean(s.get(k, 0.0) for s in steps) * 1e3 for k in steps[0]}  # ms a step
    ops = [*PROJECTIONS, "lm_head", "rms_norm", "silu_mul", "attend_decode"]
    rows = [(k, mean.get(k, 0.0)) for k in ops]
    rows.append(("rest of the forward (Python, embedding)", mean["forward"] - sum(v for _, v in rows)))
    rows.append(("sampling", mean["sampling"]))
    rows.append(("step inputs / bookkeeping", mean["run_step"] - mean["forward"] - mean["sampling"]))
    rows.append(("executor iteration (responses, stats)", mean["iteration"] - mean["run_step"]))
    total = mean["iteration"]
    print(f"{dt} batch {batch}: {len(steps)} decode steps, {total:.2f} ms a step = {batch / total * 1e3:.0f} tok/s "
          f"(best step {min(s['iteration'] for s in steps) * 1e3:.2f} ms)")  # fmt: skip
    print(f"machine: read {m['read_gbs']:.1f} GB/s, matmul {m['mm_' + dt]:.0f} GFLOP/s ({dt})")
    print("| op | ms a step | share | GB/s | GFLOP/s |\n|---|---|---|---|---|")
    size = 4 if dt == "float32" else 2
    for name, ms in rows:
        gbs = gfl = ""
        if name in nbytes:
            gbs = f"{nbytes[name] / ms / 1e6:.1f}"
            gfl = f"{2 * batch * nbytes[name] / size / ms / 1e6:.0f}"
        print(f"| {name} | {ms:.3f} | {ms / total:.0%} | {gbs} | {gfl} |")
    mm = sum(mean[k] for k in (*PROJECTIONS, "lm_head"))
    all_bytes = sum(nbytes.values())
    print(f"all matmuls: {mm:.2f} ms, {all_bytes / mm / 1e6:.1f} GB/s, "
          f"{2 * batch * all_bytes / size / mm / 1e6:.0f} GFLOP/s; outside them {total - mm:.2f} ms")  # fmt: skip


# set_streaming(prefetch, split_min) per variant (csrc/linear.cpp): "before" is the kernel before the knobs
# (no prefetch); the default prefetches the next unit into L2 (products of more than 4 rows).
VARIANTS = {
    "before": (False, 32768),
    "default": (True, 16384),
    "no prefetch": (False, 16384),
    "o on one thread": (True, 32768),
}


def ab(ex: TorchExecutor, dt: str, batches: list[int], tokens: int, repeats: int, m: dict, names) -> None:
    """Decode tokens/s of each streaming variant, the variants alternating in each round."""
    k = ex.ops.k
    layers = ex.model.layers  # the floor's parameters: the embedding (= LM head) and every projection
    params = ex.model.embed.numel() + sum(
        lin.packed.numel() for ly in layers for lin in (ly.qkv, ly.o, ly.gate_up, ly.down)
    )

    def knobs(run, knob: tuple[bool, int]):
        def go(n: int) -> None:
            k.set_streaming(*knob)
            try:
                run(n)
            finally:
                k.set_streaming()

        return go

    for b in batches:
        run = ours_runner(ex, [], b, 0)
        chosen = {v: knobs(run, VARIANTS[v]) for v in ["before", *[n for n in names if n != "before"]]}
        rates = interleaved_rates(chosen, b, tokens, repeats)
        floor = b / floor_ms(params, dt, b, m) * 1e3
        cells = "  ".join(f"{v} {r:6.1f} ({r / rates['before']:.2f}x)" for v, r in rates.items())
        print(f"  {dt:<8} batch {b:<3} floor {floor:6.0f}  {cells} tok/s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=list(ENGINES), default="float32")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=40, help="new tokens per request (decode steps)")
    ap.add_argument("--rounds", type=int, default=3, help="batches run; the first is a warm-up")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ab", type=int, nargs="+", default=None, help="batches: knobs on vs off instead")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), help="for --ab")
    ap.add_argument("--before", action="store_true", help="profile the kernel as it was (no prefetch)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    print(f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
    ensure_engines([args.dtype])
    m = machine()
    sizes = dict(
        max_batch_size=max(args.batch, *(args.ab or [8])), max_seq_len=MAX_SEQ, memory_budget_bytes=4 * 2**30
    )
    print(
        f"machine: read {m['read_gbs']:.1f} GB/s, matmul {m['mm_' + args.dtype]:.0f} GFLOP/s ({args.dtype})"
    )
    with TorchExecutor(ENGINES[args.dtype], **sizes) as ex:
        if args.ab:
            ab(ex, args.dtype, args.ab, args.tokens, args.rounds, m, args.variants)
            return
        if args.before:
            ex.ops.k.set_streaming(*VARIANTS["before"])
        clock = Clock(prefill=False)
        nbytes = instrument(ex, clock)
        run = ours_runner(ex, [], args.batch, 0)
        for i in range(args.rounds):
            if i == 1:
                clock.steps.clear()
            run(args.tokens)
        steps = clock.steps
    report(steps, nbytes, args.batch, m, args.dtype)
    load = os.getloadavg()
    print(f"load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")


if __name__ == "__main__":
    main()
