"""Scan time of the adapter catalog for many adapter directories, next to a bare `os.walk` of the same tree.

python bench/catalog.py --adapters 10000
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from trtllm_peft.serving.catalog import Catalog


def make_tree(root: Path, n: int) -> None:
    for i in range(n):
        d = root / f"adapter-{i:05d}"
        d.mkdir()
        (d / "adapter_config.json").write_bytes(b"{}")
        (d / "adapter_model.safetensors").write_bytes(b"\0" * 1024)


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--adapters", type=int, default=10_000, help="adapter directories to create (default 10000)"
    )
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_tree(root, args.adapters)
        walk = best(lambda: [os.stat(Path(d) / f) for d, _, fs in os.walk(root) for f in fs], args.repeats)
        first = best(lambda: Catalog(root).scan(), args.repeats)
        cat = Catalog(root)
        cat.scan()
        rescan = best(cat.scan, args.repeats)
    print("| adapters | os.walk+stat | first scan | rescan | rescan / walk |")
    print("|---|---|---|---|---|")
    print(f"| {args.adapters} | {walk:.3f} s | {first:.3f} s | {rescan:.3f} s | {rescan / walk:.2f}x |")
    print(f"target: rescan of {args.adapters} adapters < 2 s: {'met' if rescan < 2 else 'MISSED'}")


if __name__ == "__main__":
    main()
