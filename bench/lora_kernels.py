"""LoRA group kernels alone: the projections of a decode step, base alone and with 1 / 8 distinct adapters.

    .venv/bin/python bench/lora_kernels.py --batches 8 32                # this tree's module
    .venv/bin/python bench/lora_kernels.py --so OLD.so NEW.so            # two builds, alternating
    .venv/bin/python bench/lora_kernels.py --modes fused --pages 4k 2m   # adapters on 4 KiB / 2 MiB pages

SmolLM2-135M's shapes (qkv 576 -> 576+192+192, o 576 -> 576, gate_up 576 -> 2x1536, down 1536 -> 576), 30
layers, random weights in the kernels' packed layout (each case its own copy, so a case's weights come from
memory as in a step; the base weights on 2 MiB pages as the engine's, the adapters on 4 KiB pages or each in
its own 2 MiB-page mapping as the device tier's, `--pages`); adapters rank 16 on all seven modules (bench/engine.py's). A step: every layer's four
groups, each either the base projection alone (`linear_into`), the projection then the delta as two calls
(`linear_into` + `LoraGroup.apply`), or one fused call (`LoraGroup.project`). Cases alternate within each
round; a case's time is its best step. Prints ms a step and base / case.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trtllm_peft.executor.torch import cpu_kernels, huge_pages  # noqa: E402
from trtllm_peft.executor.torch.lora_grouped import PackedGroup, on_huge_pages  # noqa: E402

H, INTER, KV, LAYERS, RANK = 576, 1536, 192, 30, 16
GROUPS = {"qkv": (H, [H, KV, KV]), "o": (H, [H]), "gate_up": (H, [INTER, INTER]), "down": (INTER, [H])}


def load(path: str | None):
    if path is None:
        return cpu_kernels.load()
    spec = importlib.util.spec_from_file_location(Path(path).name.split(".")[0], path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build(k, dt, n_adapters: int, pages: str = "2m") -> list[dict]:
    """30 layers: per group (packed W, out, in, LoraGroup of n_adapters)."""
    base = huge_pages.Arena()
    adapters = [{} for _ in range(n_adapters)]  # per adapter: (layer, group) -> PackedGroup
    for layer in range(LAYERS):
        for g, (fin, widths) in GROUPS.items():
            for ad in adapters:
                a = k.pack(torch.randn(len(widths) * RANK, fin).mul(0.05).to(dt))
                ad[(layer, g)] = PackedGroup(
                    a=a, b=[k.pack(torch.randn(c, RANK).mul(0.05).to(dt)) for c in widths]
                )
    if pages == "2m":
        adapters = [on_huge_pages(ad) for ad in adapters]
    layers = []
    for layer in range(LAYERS):
        ly = {}
        for g, (fin, widths) in GROUPS.items():
            w = base.place(k.pack(torch.randn(sum(widths), fin).mul(0.05).to(dt)))
            found = [ad[(layer, g)] for ad in adapters]
            starts = [sum(widths[:p]) for p in range(len(widths))]
            grp = k.LoraGroup(a=[f.a for f in found], b=[f.b for f in found], ranks=[RANK] * n_adapters,
                              starts=starts, widths=widths, mag=[None] * n_adapters)  # fmt: skip
            ly[g] = (w, sum(widths), fin, grp)
        layers.append(ly)
    return layers


def step_fn(k, layers: list[dict], n: int, batch: int, dt, mode: str):
    """mode: base | two calls | fused."""
    xs = {fin: torch.randn(batch, fin).to(dt) for fin in (H, INTER)}
    ys = {g: torch.zeros(batch, sum(w)).to(dt) for g, (_, w) in GROUPS.items()}
    rows = k.LoraRows(torch.arange(batch) % n, n) if n > 1 else None

    def step() -> None:
        for ly in layers:
            for g, (w, out, fin, grp) in ly.items():
                if mode == "fused":
                    grp.project(xs[fin], w, out, None, ys[g], True, rows)
                    continue
                k.linear_into(xs[fin], w, out, None, ys[g], True)
                if mode == "two calls":
                    grp.apply(xs[fin], ys[g], rows, None)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--so", nargs="*", default=[None])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--modes", nargs="+", default=["two calls", "fused"])
    ap.add_argument("--pages", nargs="+", default=["2m"], choices=["4k", "2m"], help="the adapters' pages")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    mods = [load(p) for p in args.so]
    for m in mods:
        m.set_num_threads(args.threads)
    k = mods[0]
    print(f"load average {os.getloadavg()}, threads {args.threads}")
    for dt_name in args.dtypes:
        dt = getattr(torch, dt_name)
        for b in args.batches:
            fns = {"base": step_fn(k, build(k, dt, 1), 1, b, dt, "base")}
            for n in (1, 8):
                for i, m in enumerate(mods):
                    for pages in args.pages:
                        layers = build(m, dt, n, pages)  # each build its own LoraGroups
                        for mode in args.modes:
                            fns[f"so{i} {n} adapter(s) {pages}, {mode}"] = step_fn(m, layers, n, b, dt, mode)
            best = dict.fromkeys(fns, float("inf"))
            for _ in range(args.repeats):
                for c, fn in fns.items():
                    t = time.perf_counter()
                    fn()
                    best[c] = min(best[c], time.perf_counter() - t)
            base = best["base"]
            print(
                f"{dt_name:<9} b{b:<3} base {base * 1e3:6.2f} ms  load {os.getloadavg()[0]:.1f}", flush=True
            )
            for c, t in best.items():
                if c != "base":
                    print(
                        f"    {c:<38} {t * 1e3:6.2f} ms  +{(t - base) * 1e3:5.2f}  base/case {base / t:.3f}"
                    )


if __name__ == "__main__":
    main()
