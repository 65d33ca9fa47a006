"""Where one decode step of our engine spends its time, per op, with AMX on and off (same process, cases
alternating): each projection shape, the LM head, attention, norms, SiLU·up, LoRA, sampling, and the rest of
the step (embedding, Python, scheduling), with each projection's weight read rate (GB/s) beside it.

    .venv/bin/python bench/amx_profile.py --batch 32            # bfloat16, base model, 16 new tokens
    .venv/bin/python bench/amx_profile.py --batch 32 --adapters 8

Per-step figures are (time of an N-token generation − time of a 1-token one) / (N − 1), per op, so the
prompt's prefill cancels out, as in bench/engine.py's decode rate. The ops are timed by wrapping the Python
entry points of the engine thread (perf_counter around each call): a few µs of the wrapper per call are
counted in the ops, not in "rest".
"""

from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from engine import ENGINES, MAX_SEQ, ensure_engines, machine
from engine_cases import PREFILL_LEN, make_adapters, ours_prefill, ours_runner

from trtllm_peft import formats
from trtllm_peft.executor.torch import TorchExecutor, cpu_kernels
from trtllm_peft.executor.torch import executor as executor_mod
from trtllm_peft.executor.torch import step as step_mod
from trtllm_peft.executor.torch.kv import PagedKVCache
from trtllm_peft.executor.torch.linear import KernelLinear
from trtllm_peft.executor.torch.lora_grouped import GroupedLoraBatch
from trtllm_peft.executor.torch.model import LlamaModel
from trtllm_peft.executor.torch.ops import KernelOps
from trtllm_peft.lora import load_spec, pack

NAMES = {
    (576, 960): "qkv",
    (576, 576): "o",
    (576, 3072): "gate_up",
    (1536, 576): "down",
    (576, 49152): "lm_head",
}
TOTAL, STEP = "whole iteration", "run_step"
NESTED = "↳ "  # keys timed inside another key: not added to the ops' sum


class Timer:
    """Seconds and calls per key, while `on`."""

    def __init__(self) -> None:
        self.on = False
        self.t: dict[str, float] = defaultdict(float)
        self.n: dict[str, int] = defaultdict(int)
        self.bytes: dict[str, int] = {}

    def wrap(self, owner, attr: str, key) -> None:
        """owner.attr timed under key(*args) (a callable of the call's arguments) or the string key."""
        orig = getattr(owner, attr)

        def timed(*a, **kw):
            if not self.on:
                return orig(*a, **kw)
            s = time.perf_counter()
            try:
                return orig(*a, **kw)
            finally:
                k = key(*a) if callable(key) else key
                self.t[k] += time.perf_counter() - s
                self.n[k] += 1

        setattr(owner, attr, timed)

    def snapshot(self) -> tuple[dict, dict]:
        return dict(self.t), dict(self.n)

    def reset(self) -> None:
        self.t.clear()
        self.n.clear()


def switched(kernels, run, on: bool, prefetch: bool):
    """run with the AMX path on/off and its weight prefetch on/off, restored to the defaults after."""

    def go(tokens: int) -> None:
        kernels.set_amx(on, 16, prefetch)
        try:
            run(tokens)
        finally:
            kernels.set_amx(True)

    return go


def linear_key(timer: Timer):
    def key(lin, *_):
        name = NAMES.get((lin.in_features, lin.out_features), f"linear {lin.in_features}→{lin.out_features}")
        timer.bytes[name] = lin.packed.numel() * lin.packed.element_size()
        return name

    return key


def instrument(timer: Timer) -> None:
    key = linear_key(timer)
    timer.wrap(KernelLinear, "__call__", key)
    timer.wrap(KernelLinear, "add_to", lambda lin, *_: key(lin))
    for op in ("rms_norm", "silu_mul", "attend_decode", "attend_chunk"):
        timer.wrap(KernelOps, op, op)
    timer.wrap(GroupedLoraBatch, "apply_group", "lora")
    # a prefill's fresh chunks attend through torch ops (model.py), not KernelOps; "↳": inside the line above
    timer.wrap(LlamaModel, "_attend_fresh", "attend_fresh")
    timer.wrap(LlamaModel, "_split_rope", f"{NESTED}split_rope")
    timer.wrap(PagedKVCache, "put", f"{NESTED}kv put")
    timer.wrap(F, "scaled_dot_product_attention", f"{NESTED}sdpa")
    timer.wrap(step_mod, "take", "sampling")
    timer.wrap(executor_mod, "run_step", STEP)
    timer.wrap(executor_mod.TorchExecutor, "_iteration", TOTAL)


def measure(timer: Timer, run, tokens: int, repeats: int) -> tuple[dict, dict, float]:
    """Per decode step: seconds per key, calls per key, and wall seconds (best round of each)."""
    best: dict[int, tuple] = {}
    for _ in range(repeats):
        for n in (1, tokens):
            timer.reset()
            timer.on = True
            s = time.perf_counter()
            run(n)
            wall = time.perf_counter() - s
            timer.on = False
            if n not in best or wall < best[n][2]:
                best[n] = (*timer.snapshot(), wall)
    (t1, n1, w1), (tn, nn, wn) = best[1], best[tokens]
    steps = tokens - 1
    per = {k: (v - t1.get(k, 0.0)) / steps for k, v in tn.items()}
    calls = {k: (v - n1.get(k, 0)) / steps for k, v in nn.items()}
    return per, calls, (wn - w1) / steps


def measure_prefill(timer: Timer, run, repeats: int) -> tuple[dict, dict, float]:
    """One PREFILL_LEN-token prompt (a fresh one each call): seconds per key, calls, wall (best round)."""
    best = None
    for _ in range(repeats):
        timer.reset()
        timer.on = True
        s = time.perf_counter()
        run(1)
        wall = time.perf_counter() - s
        timer.on = False
        if best is None or wall < best[2]:
            best = (*timer.snapshot(), wall)
    return best


def table(results: dict, timer: Timer, batch: int) -> None:
    cols = list(results)
    print(f"{'per step (ms)':<22}" + "".join(f"{c:>24}" for c in cols))
    keys = sorted(
        {k for per, _, _ in results.values() for k in per}, key=lambda k: -results[cols[0]][0].get(k, 0)
    )
    for k in [TOTAL, STEP] + [k for k in keys if k not in (TOTAL, STEP)]:
        cells = []
        for per, calls, _ in results.values():
            ms = per.get(k, 0.0) * 1e3
            extra = ""
            if k in timer.bytes and ms > 0:
                extra = f" {timer.bytes[k] * calls.get(k, 0) / (ms / 1e3) / 1e9:5.1f}GB/s"
            cells.append(f"{ms:8.2f}{extra:>11}  x{calls.get(k, 0):<3.0f}")
        print(f"{k:<22}" + "".join(f"{c:>24}" for c in cells))
    for col, (per, _, wall) in results.items():
        ops = sum(v for k, v in per.items() if k not in (TOTAL, STEP) and not k.startswith(NESTED))
        print(
            f"{col}: wall {wall * 1e3:.2f} ms/step ({batch / wall:.0f} tok/s); in run_step but no op above "
            f"{(per.get(STEP, 0) - ops) * 1e3:.2f} ms; outside run_step {(per.get(TOTAL, 0) - per.get(STEP, 0)) * 1e3:.2f} "
            f"ms; outside the engine iteration {(wall - per.get(TOTAL, 0)) * 1e3:.2f} ms"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16", choices=list(ENGINES))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--adapters", type=int, default=0, help="distinct adapters in the batch (0: base)")
    ap.add_argument("--prefill", action="store_true", help=f"profile one {PREFILL_LEN}-token prefill instead")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kernels = cpu_kernels.load()
    assert kernels is not None, cpu_kernels.why_unavailable()
    print(f"AMX available: {kernels.amx_available()}; load average {os.getloadavg()[0]:.1f}")
    ensure_engines([args.dtype])
    m = machine()
    print(f"machine: read {m['read_gbs']:.1f} GB/s, matmul bf16 {m['mm_bfloat16']:.0f} GFLOP/s")
    timer = Timer()
    instrument(timer)
    engine, dt = ENGINES[args.dtype], getattr(torch, args.dtype)
    packed = []
    if args.adapters:
        import tempfile
        from pathlib import Path

        spec = load_spec(engine)
        dirs = make_adapters(engine, Path(tempfile.mkdtemp()))[: args.adapters]
        packed = [pack(formats.load_for_engine(d, spec), dt) for d in dirs]
    sizes = dict(max_batch_size=max(args.batch, 8), max_seq_len=MAX_SEQ, memory_budget_bytes=4 * 2**30)
    with TorchExecutor(engine, **sizes) as ex:
        ex.model.fuse = False  # op by op: each op timed
        run = ours_prefill(ex) if args.prefill else ours_runner(ex, packed, args.batch, args.adapters)
        cases = {"AMX": (True, True), "AMX, no prefetch": (True, False), "streaming": (False, True)}
        if args.dtype != "bfloat16":
            cases = {"streaming": (False, True)}
        results: dict[str, tuple] = {}
        for _ in range(args.repeats):  # the cases alternate round by round: load hits both alike
            for name, (on, prefetch) in cases.items():
                go = switched(kernels, run, on, prefetch)
                got = measure_prefill(timer, go, 1) if args.prefill else measure(timer, go, args.tokens, 1)
                if name not in results or got[2] < results[name][2]:
                    results[name] = got
    table(results, timer, PREFILL_LEN if args.prefill else args.batch)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
