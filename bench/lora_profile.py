"""Where a LoRA decode step's extra time goes: per op, per step, base / 1 adapter / 8 distinct (issue #15).

    .venv/bin/python bench/lora_profile.py --dtype float32 --batch 8

Runs each case through a real `TorchExecutor` (bench/engine.py's engines and adapters) and times, on the
engine thread, the base projections (`<group>`), each group's projection with its LoRA (`lora <group>`:
`project`, base product included, summed over the layers), the step's `mask` (grouping tokens by adapter)
and the whole iteration. The LoRA products' cost is `lora <group>` of a case minus `<group>` of base.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import torch
from engine import ENGINES, MAX_SEQ, ensure_engines
from engine_cases import N_ADAPTERS, make_adapters, ours_runner
from step_clock import Clock, time_iterations

from trtllm_peft import formats
from trtllm_peft.executor.torch import TorchExecutor
from trtllm_peft.executor.torch.lora_grouped import GroupedLoraBatch
from trtllm_peft.lora import load_spec, pack

PROJECTIONS = ("qkv", "o", "gate_up", "down")


class TimedProjection:
    """A KernelLinear whose own calls are timed under `name`; `project` reads its packed weights directly."""

    def __init__(self, inner, name: str, clock: Clock) -> None:
        self.bias, self.packed, self.out_features = inner.bias, inner.packed, inner.out_features
        self.call = clock.timed(name, inner.__call__)
        self.add_to = clock.timed(name, inner.add_to)

    def __call__(self, x):
        return self.call(x)


def instrument(ex: TorchExecutor, clock: Clock) -> None:
    """Time the projections, each group's projection with LoRA and the step's mask under their own names (op by
    op: a step in one kernel call has no Python between its ops to time)."""
    ex.model.fuse = False
    for ly in ex.model.layers:
        for name in PROJECTIONS:
            setattr(ly, name, TimedProjection(getattr(ly, name), name, clock))
    project, mask = GroupedLoraBatch.project, GroupedLoraBatch.mask

    def timed_project(self, layer, group, *a, **kw):
        return clock.timed("lora " + group, project)(self, layer, group, *a, **kw)

    GroupedLoraBatch.project = timed_project
    GroupedLoraBatch.mask = lambda self, ta: clock.timed("lora mask", mask)(self, ta)
    time_iterations(ex, clock)


def profile(ex, clock: Clock, run, tokens: int, rounds: int) -> dict[str, float]:
    """Mean ms a decode step per timed name."""
    for i in range(rounds):
        if i == 1:
            clock.steps.clear()
        run(tokens)
    steps = clock.steps
    names = sorted({k for s in steps for k in s})
    return {k: statistics.fmean(s.get(k, 0.0) for s in steps) * 1e3 for k in names}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=list(ENGINES), default="float32")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average {os.getloadavg()}")
    ensure_engines([args.dtype])
    engine = ENGINES[args.dtype]
    sizes = dict(max_batch_size=args.batch, max_seq_len=MAX_SEQ, memory_budget_bytes=4 * 2**30)
    spec = load_spec(engine)
    with tempfile.TemporaryDirectory() as tmp, TorchExecutor(engine, **sizes) as ex:
        dirs = make_adapters(engine, Path(tmp))
        packed = [pack(formats.load_for_engine(d, spec), getattr(torch, args.dtype)) for d in dirs]
        adapter_bytes = sum(w.a.numel() + w.b.numel() for _, w in formats.load_for_engine(dirs[0], spec))
        adapter_bytes *= torch.tensor([], dtype=getattr(torch, args.dtype)).element_size()
        clock = Clock(prefill=False)
        instrument(ex, clock)
        cases = {"base": 0, "1 adapter": 1, "8 distinct": N_ADAPTERS}
        runs = {c: ours_runner(ex, packed, args.batch, n) for c, n in cases.items()}
        res = {c: profile(ex, clock, r, args.tokens, args.rounds) for c, r in runs.items()}
    names = sorted({k for r in res.values() for k in r}, key=lambda k: (k.startswith("lora"), k))
    print(f"{args.dtype} batch {args.batch}, ms a decode step; one adapter = {adapter_bytes / 1e6:.1f} MB")
    print("| op | " + " | ".join(res) + " |\n|---|" + "---|" * len(res))
    for k in names:
        print(f"| {k} | " + " | ".join(f"{r.get(k, 0.0):.3f}" for r in res.values()) + " |")
    base = res["base"]["iteration"]
    base_proj = sum(res["base"].get(g, 0.0) for g in PROJECTIONS)
    for c, n in cases.items():
        r = res[c]
        lora = sum(v for k, v in r.items() if k.startswith("lora ")) + sum(r.get(g, 0.0) for g in PROJECTIONS)
        extra = lora - base_proj
        gbs = f", {n * adapter_bytes / extra / 1e6:.1f} GB/s of adapter bytes" if n and extra > 0 else ""
        print(f"{c}: {r['iteration']:.2f} ms ({r['iteration'] - base:+.2f}); projections + LoRA {lora:.2f} ms "
              f"({extra:+.2f}{gbs})")  # fmt: skip
    print(f"load average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
