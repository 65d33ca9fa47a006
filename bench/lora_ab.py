"""LoRA decode cost against our own base, one process, cases alternating per round (issue #15).

    .venv/bin/python bench/lora_ab.py --dtypes bfloat16 float32 --batches 8 32
    .venv/bin/python bench/lora_ab.py --skip      # + 8 distinct with the LoRA products skipped (what is left)
    .venv/bin/python bench/lora_ab.py --no-amx    # + every case again with set_amx(False)
    .venv/bin/python bench/lora_ab.py --two-calls # + the adapter cases with projection and LoRA as two calls
    .venv/bin/python bench/lora_ab.py --no-trail    # + the adapter cases without the adapters' prefetch
    .venv/bin/python bench/lora_ab.py --layered     # + the adapter cases layer by layer (not one call a step)

Cases: base, 1 adapter, 8 distinct adapters (bench/engine.py's adapters: rank 16, all seven modules), and
with --skip the 8-distinct batch with `GroupedLoraBatch.project` the base projection alone: the step's cost
apart from the LoRA products (grouping, the executor's per-adapter work); with --two-calls the adapter cases again with the
base projection and the LoRA delta as two kernel calls (`lora_ops.project_then_apply`, as before the fused
`LoraGroup.project`); with --no-trail the adapter cases again with `set_lora_trail(False)` (the adapters' weights
not prefetched during the base projection); with --layered the adapter cases again with `model.fuse_lora = False`
(a decode step with adapters through model.py's `_forward`, ~8 kernel calls a layer, instead of one call a step).
Decode tokens/s as bench/engine.py computes them; ratios to base printed per batch.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine import ENGINES, MAX_SEQ, ensure_engines, interleaved_rates  # noqa: E402
from engine_cases import N_ADAPTERS, make_adapters, ours_runner  # noqa: E402

from trtllm_peft import formats  # noqa: E402
from trtllm_peft.executor.torch import TorchExecutor  # noqa: E402
from trtllm_peft.executor.torch.cpu_kernels import load as load_kernels  # noqa: E402
from trtllm_peft.executor.torch.lora_grouped import GroupedLoraBatch  # noqa: E402
from trtllm_peft.executor.torch.lora_ops import project_then_apply  # noqa: E402
from trtllm_peft.lora import load_spec, pack  # noqa: E402

_project = GroupedLoraBatch.project
ADAPTER_CASES = (("1 adapter", 1), ("8 distinct", N_ADAPTERS))


def _base_only(self, layer, group, linear, x, mask, out=None):
    """GroupedLoraBatch.project without the LoRA products."""
    if out is None:
        return linear(x)
    linear.add_to(out, x)
    return out


def _with(ex, run, skip: bool = False, amx: bool = True, two_calls: bool = False, trail: bool = True):
    """run with the LoRA products skipped, AMX off, projection and LoRA as two calls and/or no prefetch of the
    adapters during the base projection, for its duration (skip and two calls: layer by layer, where
    `GroupedLoraBatch.project` is what the step calls)."""
    k = load_kernels()

    def go(n: int) -> None:
        ex.model.fuse_lora = not (skip or two_calls)
        if skip:
            GroupedLoraBatch.project = _base_only
        if two_calls:
            GroupedLoraBatch.project = project_then_apply
        if not amx:
            k.set_amx(False)
        k.set_lora_trail(trail)
        try:
            run(n)
        finally:
            ex.model.fuse_lora = True
            GroupedLoraBatch.project = _project
            k.set_amx(True)
            k.set_lora_trail(True)

    return go


def _layered(ex, run):
    """run with decode steps with adapters layer by layer (`_forward`), not one kernel call, for its duration."""

    def go(n: int) -> None:
        ex.model.fuse_lora = False
        try:
            run(n)
        finally:
            ex.model.fuse_lora = True

    return go


def bench(dt: str, dirs: list[Path], args) -> None:
    engine = ENGINES[dt]
    spec = load_spec(engine)
    packed = [pack(formats.load_for_engine(d, spec), getattr(torch, dt)) for d in dirs]
    sizes = dict(max_batch_size=max(args.batches), max_seq_len=MAX_SEQ, memory_budget_bytes=6 * 2**30)
    with TorchExecutor(engine, **sizes) as ex:
        for b in args.batches:
            runs = {
                "base": ours_runner(ex, packed, b, 0),
                "1 adapter": ours_runner(ex, packed, b, 1),
                "8 distinct": ours_runner(ex, packed, b, N_ADAPTERS),
            }
            if args.two_calls:
                runs.update(
                    {
                        f"{c}, two calls": _with(ex, runs[c], two_calls=True)
                        for c in ("1 adapter", "8 distinct")
                    }
                )
            if args.no_trail:
                runs.update({f"{c}, no trail": _with(ex, runs[c], trail=False) for c, _ in ADAPTER_CASES})
            if args.layered:
                runs.update({f"{c}, layered": _layered(ex, runs[c]) for c, _ in ADAPTER_CASES})
            if args.skip:
                runs["8 distinct, LoRA skipped"] = _with(ex, runs["8 distinct"], skip=True)
            if args.no_amx:
                runs.update({f"{k}, no AMX": _with(ex, r, amx=False) for k, r in list(runs.items())})
            rates = interleaved_rates(runs, b, args.tokens, args.repeats)
            load = os.getloadavg()[0]
            for case, r in rates.items():
                base = rates["base, no AMX" if case.endswith("no AMX") else "base"]
                print(f"{dt:<9} b{b:<3} {case:<32} {r:8.1f} tok/s  {r / base:5.3f}x base  load {load:.1f}",
                      flush=True)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=list(ENGINES))
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip", action="store_true")
    ap.add_argument("--no-amx", action="store_true")
    ap.add_argument("--two-calls", action="store_true")
    ap.add_argument("--no-trail", action="store_true")
    ap.add_argument("--layered", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average {os.getloadavg()}")
    ensure_engines(args.dtypes)
    with tempfile.TemporaryDirectory() as tmp:
        dirs = make_adapters(ENGINES[args.dtypes[0]], Path(tmp))
        for dt in args.dtypes:
            bench(dt, dirs, args)


if __name__ == "__main__":
    main()
