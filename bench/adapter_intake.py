"""An adapter made device-ready (ops.prepare_lora: the device tier's packed copy), old vs new in one process.

    flock /tmp/bench.lock .venv/bin/python bench/adapter_intake.py --rounds 30

The adapter as the engine thread gets it: a rank-16 PEFT adapter on all seven modules of SmolLM2-135M, read
and fitted (formats.load_for_engine), packed into TensorRT-LLM's [N, W] rows in the engine's dtype and
unpacked again (executor intake.read_lora: A and B are views of the rows). Cases, in a new random order every
round: `old` (session 11's prepare_packed: lora_ops.prepare, kernels.pack per array, a copy onto pooled pages),
`new` (lora_grouped.prepare_packed: one kernel call, csrc/lora_pack.cpp) and the peer `safetensors` (a plain
read of the same adapter's adapter_model.safetensors, the least a server does with a new adapter). Prints per
dtype each case's median ms per adapter, wall and thread CPU, and the median of new / old per round. Checks
first that old and new give the same bytes.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.load_workload import ALL7  # noqa: E402
from tests.integration.conftest import random_adapter, write_adapter  # noqa: E402
from trtllm_peft import formats  # noqa: E402
from trtllm_peft.executor.torch import cpu_kernels, lora_grouped  # noqa: E402
from trtllm_peft.executor.torch.lora_ops import prepare  # noqa: E402
from trtllm_peft.lora import load_spec, pack, unpack  # noqa: E402

ENGINES = {
    torch.float32: Path("engines/bench-smollm2-135m-float32"),
    torch.bfloat16: Path("engines/bench-smollm2-135m-bfloat16"),
}


def old_prepare_packed(kernels, adapter, spec, dtype, device):
    """Session 11's lora_grouped.prepare_packed (main 8391cc5), the reference the new one is held to."""
    dense = prepare(adapter, spec, dtype, device)
    groups = {
        key: lora_grouped.PackedGroup(
            a=kernels.pack(g.a.reshape(-1, g.a.shape[2])),
            b=[kernels.pack(bt.t().contiguous()) for bt in g.bt],
            mag=None if g.mag is None else g.mag.float().contiguous(),
        )
        for key, g in dense.groups.items()
    }
    return replace(dense, groups=lora_grouped.on_huge_pages(groups))


def same_bytes(x, y) -> bool:
    def flat(t):
        return [t.a, *t.b, *([] if t.mag is None else [t.mag])]

    return x.groups.keys() == y.groups.keys() and all(
        len(flat(x.groups[k])) == len(flat(y.groups[k]))
        and all(torch.equal(p, q) for p, q in zip(flat(x.groups[k]), flat(y.groups[k]), strict=True))
        for k in x.groups
    )


def timed(fn, reps: int) -> tuple[float, float]:
    """ms per call, wall and this thread's CPU."""
    t, c = time.perf_counter(), time.thread_time()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) * 1e3 / reps, (time.thread_time() - c) * 1e3 / reps


def bench(dtype, kernels, file: Path, rounds: int, reps: int) -> None:
    spec = load_spec(ENGINES[dtype])
    rows = pack(formats.load_for_engine(file.parent, spec), dtype)
    adapter = unpack(rows.weights, rows.config, spec)  # as the executor's intake reads a request's tensors
    old = old_prepare_packed(kernels, adapter, spec, dtype, "cpu")
    new = lora_grouped.prepare_packed(kernels, adapter, spec, dtype, "cpu")
    print(f"{dtype}: {len(new.groups)} groups, {rows.weights.numel() * dtype.itemsize / 1e6:.1f} MB of rows; "
          f"old and new bytes equal: {same_bytes(old, new)}")  # fmt: skip
    del old, new
    cases = {
        "old": lambda: old_prepare_packed(kernels, adapter, spec, dtype, "cpu"),
        "new": lambda: lora_grouped.prepare_packed(kernels, adapter, spec, dtype, "cpu"),
        "safetensors": lambda: load_file(file),
    }
    times = {k: [] for k in cases}
    for _ in range(rounds):
        for k in random.sample(list(cases), len(cases)):
            times[k].append(timed(cases[k], reps))
    for k, ts in times.items():
        wall, cpu = statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts)
        print(f"  {k:12s} {wall:7.2f} ms wall  {cpu:7.2f} ms CPU per adapter")
    ratio = statistics.median(n[1] / o[1] for n, o in zip(times["new"], times["old"], strict=True))
    print(f"  new / old CPU per round, median: {ratio:.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--reps", type=int, default=5, help="calls per case per round")
    p.add_argument("--rank", type=int, default=16)
    args = p.parse_args()
    kernels = cpu_kernels.load()
    assert kernels is not None, cpu_kernels.why_unavailable()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        spec = load_spec(ENGINES[torch.float32])
        adapter = random_adapter(spec, rank=args.rank, modules=ALL7, seed=7, std=0.05)
        file = write_adapter(adapter, Path(tmp) / "lora", "hf", spec) / "adapter_model.safetensors"
        for dtype in ENGINES:
            bench(dtype, kernels, file, args.rounds, args.reps)


if __name__ == "__main__":
    main()
