"""A decode step with adapters, variants alternating step by step in one process (issue #15).

    .venv/bin/python bench/lora_step_ab.py --dtype bfloat16 --batch 8 --rounds 200

`model.step` called directly (no executor loop, no sampling), on the calling thread with the engine's threading
(`ops.use_threads`): a decode-only step of `batch` rows at ~40 cached positions each, bench/engine.py's 8 adapters
(rank 16, all modules) one per row in turn. Variants, in a new random order every round: base (no adapters);
8 distinct and 1 adapter as one call (`fuse_lora`), the same without the adapters' prefetch during the base
projection (`set_lora_trail(False)`), and layer by layer (`_forward`). Prints each variant's median step time
and the median over rounds of its ratio to that round's base step: finer than bench/lora_ab.py's best-of-N
tokens/s, whose runs swing by more than these effects on a shared 2-core box.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine import ENGINES, MAX_SEQ  # noqa: E402
from engine_cases import N_ADAPTERS, make_adapters  # noqa: E402

from trtllm_peft import formats  # noqa: E402
from trtllm_peft.executor.torch import TorchExecutor  # noqa: E402
from trtllm_peft.lora import load_spec  # noqa: E402

CONTEXT = 40  # cached positions a row


def variants(lora8, lora1, b: int) -> dict:
    """name -> (lora batch, token_adapter, fuse_lora, trail)."""
    distinct, single = torch.arange(b) % N_ADAPTERS, torch.zeros(b, dtype=torch.long)
    return {
        "base": (None, None, True, True),
        "8 distinct": (lora8, distinct, True, True),
        "8 distinct, no trail": (lora8, distinct, True, False),
        "8 distinct, layered": (lora8, distinct, False, True),
        "1 adapter": (lora1, single, True, True),
        "1 adapter, layered": (lora1, single, False, True),
    }


def adapter_dirs(engine: Path, where: Path) -> list[Path]:
    """bench/engine.py's adapters, made in `where` unless an earlier run left them there."""
    dirs = [where / f"a{i}" for i in range(N_ADAPTERS)]
    if all((d / "adapter_config.json").is_file() for d in dirs):
        return dirs
    return make_adapters(engine, where)


def time_rounds(ex, cases: dict, step_args: tuple, rounds: int, warm: int = 3) -> dict[str, list[float]]:
    """Seconds of each case's step, every round's cases in a new random order (`warm` rounds first, not kept)."""
    times: dict[str, list[float]] = {c: [] for c in cases}
    for r in range(rounds + warm):
        order = list(cases)
        random.shuffle(order)
        for c in order:
            lora, owner, fuse, trail = cases[c]
            ex.model.fuse_lora = fuse
            ex.ops.k.set_lora_trail(trail)
            t0 = time.perf_counter()
            ex.model.step(*step_args, lora, owner)
            if r >= warm:
                times[c].append(time.perf_counter() - t0)
    ex.model.fuse_lora = True
    ex.ops.k.set_lora_trail(True)
    return times


def run(ex, args) -> None:
    kv, spec, dt, b = ex.kv, ex.spec, ex.dtype, args.batch
    with tempfile.TemporaryDirectory() as tmp:
        dirs = adapter_dirs(ENGINES[args.dtype], Path(args.adapters or tmp))
        adapters = [ex.ops.prepare_lora(formats.load_for_engine(d, spec), spec, dt, "cpu") for d in dirs]
    lora8 = ex.ops.lora_batch(adapters, spec, dt, "cpu")
    lora1 = ex.ops.lora_batch(adapters[:1], spec, dt, "cpu")
    width = -(-(CONTEXT + 1) // ex.tokens_per_block)
    tables = torch.randperm(b * width).view(b, width).to(torch.int32)  # shuffled blocks, as after churn
    positions = torch.full((b,), CONTEXT, dtype=torch.long)
    ids = torch.randint(100, 40000, (b,))
    ex.ops.use_threads(args.threads)
    times = time_rounds(ex, variants(lora8, lora1, b), (ids, positions, [], tables, kv), args.rounds)
    base = times["base"]
    for c, ts in times.items():
        ratio = statistics.median(t0 / t for t0, t in zip(base, ts, strict=True))
        print(f"{args.dtype:<9} b{b:<3} {c:<22} {statistics.median(ts) * 1e3:7.2f} ms  {ratio:5.3f}x base "
              f"(base / step, median of rounds)  load {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16", choices=list(ENGINES))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--adapters", help="a folder to keep the adapters in between runs (default: made each run)"
    )
    args = ap.parse_args()
    print(f"load average {os.getloadavg()}")
    engine = ENGINES[args.dtype]
    sizes = dict(max_batch_size=args.batch, max_seq_len=MAX_SEQ, memory_budget_bytes=6 * 2**30)
    load_spec(engine)
    with TorchExecutor(engine, **sizes) as ex:
        run(ex, args)


if __name__ == "__main__":
    main()
