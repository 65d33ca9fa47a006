"""The paged KV cache: memory, decode speed against the contiguous cache, prefix reuse, chunked prefill.

    .venv/bin/python bench/kv_cache.py                 # every section, short runs
    .venv/bin/python bench/kv_cache.py --only decode   # one section: memory | decode | reuse | chunked

memory   idle RSS of `trtllm-peft serve` (default engine, ./loras demo adapters), this tree vs the baseline
         commit (the contiguous, zero-filled KV cache), both started by this invocation, one after the other.
decode   decode tokens/s at batch 8 and 32 (16-token prompts, as bench/engine.py), this tree vs the baseline:
         two worker processes alive side by side, --decode-repeats rounds alternating between them, medians
         (and the median of the per-round ratios).
reuse    TTFT of a 1,000-token shared prefix + a distinct 16-token suffix, KvCacheConfig(enable_block_reuse)
         on vs off, one executor each, in this process; requests one at a time after one warm-up request.
chunked  8 streams decoding when a 2,000-token prompt arrives: their inter-token latencies (p50, p99) and the
         prompt's TTFT, with whole prefill, `enable_chunked_context` with max_num_tokens --chunk and no budget
         while decoding, and chunked context with the executor's defaults (the server's); with --budget N
         (repeatable) only chunked context with each budget while decoding (the sweep behind the default).
The baseline tree is `git archive <--baseline>` of trtllm_peft/ (default: the commit before the paged cache).
Writes bench/results/kv_cache.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ROOT / "engines" / "smollm2-135m"
BASELINE = "9f5580e"  # main before the paged KV cache (contiguous rows, zero-filled up front)
PROMPT_LEN = 16


def baseline_tree(rev: str, into: Path | None = None) -> Path:
    """trtllm_peft/ of `rev`, extracted to `into` (default: a temp dir), importable with PYTHONPATH. A fixed
    `into` keeps the baseline's kernel build across runs (the kernels' module name hashes their directory)."""
    out = into or Path(tempfile.mkdtemp(prefix="kv_baseline_"))
    out.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "trtllm_peft"], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
    return out


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    line = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith(field))
    return int(line.split()[1]) / 1024


# ---- memory -------------------------------------------------------------------------------------------


def bench_memory(trees: dict[str, Path], settle: float) -> dict[str, float]:
    """Idle RSS (MiB) of a ready server per tree, `settle` s after /v1/health/ready."""
    sys.path.insert(0, str(ROOT))
    from tests.integration.conftest import Server

    out, here = {}, Path.cwd()
    for name, tree in trees.items():
        log = Path(tempfile.mkdtemp()) / "serve.log"
        os.chdir(tree)  # `python -m` puts the working directory first on sys.path: run from the tree itself
        try:
            server = Server(ENGINE, ROOT / "loras", log, PYTHONPATH=str(tree))
        finally:
            os.chdir(here)
        try:
            time.sleep(settle)
            out[name] = rss_mb(server.proc.pid)
        finally:
            server.stop()
        print(f"  {name}: idle RSS {out[name]:.0f} MiB", flush=True)
    return out


# ---- decode (worker processes) ------------------------------------------------------------------------


def decode_worker() -> None:
    """Reads `batch tokens` lines, answers the seconds one batch of that many tokens took."""
    import torch

    from trtllm_peft.executor.api import Request
    from trtllm_peft.executor.torch import TorchExecutor

    ex = TorchExecutor(ENGINE, max_batch_size=32)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(100, 40000, (32, PROMPT_LEN), generator=g).tolist()
    print("ready", flush=True)
    for line in sys.stdin:
        batch, tokens = (int(x) for x in line.split())
        t = time.perf_counter()
        left = set(ex.enqueue_requests([Request(p, tokens) for p in prompts[:batch]]))
        while left:
            for r in ex.await_responses(timeout=600):
                assert not r.has_error(), r.error_msg
                if r.result.is_final:
                    left.discard(r.request_id)
        print(f"{time.perf_counter() - t:.6f}", flush=True)
    ex.shutdown()


def bench_decode(trees: dict[str, Path], batches: list[int], n: int, repeats: int) -> dict[str, dict]:
    """tokens/s = B·(n−1) / (time of n tokens − time of 1), per tree and batch: `repeats` rounds, each round
    running every tree back to back (so a burst of load hits both), medians over the rounds, and the median
    of the per-round ratios paged / contiguous."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", "")}
    workers = {}
    for name, tree in trees.items():
        p = subprocess.Popen(
            [sys.executable, __file__, "--worker"],
            env={**env, "PYTHONPATH": str(tree)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert p.stdout.readline().strip() == "ready"
        workers[name] = p

    def run(p, batch, tokens) -> float:
        p.stdin.write(f"{batch} {tokens}\n")
        p.stdin.flush()
        return float(p.stdout.readline())

    out: dict[str, dict] = {name: {} for name in trees}
    out["ratio"] = {}
    try:
        for batch in batches:
            for p in workers.values():
                run(p, batch, 2)  # warm-up
            rounds: dict[str, list[float]] = {name: [] for name in workers}
            for r in range(repeats):
                order = list(workers.items())[:: 1 if r % 2 == 0 else -1]  # who goes first alternates
                for name, p in order:
                    t1, tn = run(p, batch, 1), run(p, batch, n)
                    rounds[name].append(batch * (n - 1) / max(tn - t1, 1e-9))
            first, second = list(workers)
            for name in workers:
                out[name][batch] = statistics.median(rounds[name])
            out["ratio"][batch] = statistics.median(
                a / b for a, b in zip(rounds[first], rounds[second], strict=True)
            )
            print(
                "  batch",
                batch,
                {k: f"{out[k][batch]:.1f} tok/s" for k in workers},
                f"ratio (median of {repeats} rounds) {out['ratio'][batch]:.3f}",
                flush=True,
            )
        out["peak_rss_mb"] = {name: rss_mb(p.pid, "VmHWM") for name, p in workers.items()}
    finally:
        for p in workers.values():
            p.stdin.close()
            p.wait(timeout=60)
    return out


# ---- reuse and chunked prefill (this tree, in process) ------------------------------------------------


def _stream(ex, reqs, on_response=None, on_other=None) -> dict[int, list[float]]:
    """Arrival times of each request's responses (until all are final); `on_other`: responses to requests
    enqueued meanwhile."""
    ids = ex.enqueue_requests(reqs)
    times: dict[int, list[float]] = {i: [] for i in ids}
    left = set(ids)
    while left:
        for r in ex.await_responses(timeout=600):
            assert not r.has_error(), r.error_msg
            if r.request_id in times:
                times[r.request_id].append(time.perf_counter())
                if on_response:
                    on_response(r)
                if r.result.is_final:
                    left.discard(r.request_id)
            elif on_other:
                on_other(r)
    return times


def bench_reuse(prefix_len: int, repeats: int) -> dict[str, float]:
    from trtllm_peft.executor.api import KvCacheConfig, Request
    from trtllm_peft.executor.torch import TorchExecutor

    prefix = [(i * 7919) % 40000 + 100 for i in range(prefix_len)]
    out = {}
    for reuse in (False, True):
        with TorchExecutor(ENGINE, kv_cache_config=KvCacheConfig(enable_block_reuse=reuse)) as ex:
            _stream(ex, [Request(prefix + [1] * PROMPT_LEN, 1, streaming=True)])  # computes (and stores) it
            ttfts = []
            for k in range(repeats):
                suffix = [(k * 31 + j) % 40000 + 100 for j in range(PROMPT_LEN)]
                t = time.perf_counter()
                times = _stream(ex, [Request(prefix + suffix, 1, streaming=True)])
                ttfts.append(min(next(iter(times.values()))) - t)
            out["reuse" if reuse else "no_reuse"] = statistics.median(ttfts)
        print(f"  reuse={reuse}: TTFT median {out['reuse' if reuse else 'no_reuse']:.3f} s", flush=True)
    out["ratio"] = out["reuse"] / out["no_reuse"]
    return out


def chunked_variants(chunk: int, budgets: list[int] | None) -> list[tuple[str, dict]]:
    """Whole prefill, chunks of `chunk` tokens with no budget while decoding (the earlier setting) and the
    executor's defaults with chunked context on (the server's); or, with `budgets`, only chunked context
    with each of those budgets while decoding (the sweep behind the default)."""
    if budgets:
        return [
            (
                f"chunked, budget {b} while decoding",
                dict(enable_chunked_context=True, chunk_tokens_while_decoding=b),
            )
            for b in budgets
        ]
    return [
        ("whole prefill", {}),
        (
            f"chunked, max_num_tokens {chunk}, no budget while decoding",
            dict(enable_chunked_context=True, max_num_tokens=chunk, chunk_tokens_while_decoding=0),
        ),
        ("chunked, server defaults", dict(enable_chunked_context=True)),
    ]


def bench_chunked(variants: list[tuple[str, dict]], prompt_len: int, streams: int, n: int) -> dict[str, dict]:
    """ITL of `streams` decoding streams while a `prompt_len`-token prompt arrives (after 10 tokens each),
    and that prompt's own TTFT, for each of `variants` (chunked_variants)."""
    from trtllm_peft.executor.api import KvCacheConfig, Request
    from trtllm_peft.executor.torch import TorchExecutor

    out = {}
    for name, kw in variants:
        with TorchExecutor(ENGINE, kv_cache_config=KvCacheConfig(enable_block_reuse=False), **kw) as ex:
            long = [(i * 104729) % 40000 + 100 for i in range(prompt_len)]
            reqs = [Request([100 + s] * PROMPT_LEN, n, streaming=True) for s in range(streams)]
            seen = {"n": 0, "ttft": None}

            def arrive(r, ex=ex, seen=seen, long=long):
                seen["n"] += 1
                if seen["n"] == streams * 10:  # the streams are decoding: the long prompt arrives
                    seen["t"] = time.perf_counter()
                    seen["id"] = ex.enqueue_request(Request(long, 1))

            def other(r, seen=seen):
                if r.request_id == seen.get("id") and seen["ttft"] is None:
                    seen["ttft"] = time.perf_counter() - seen["t"]

            times = _stream(ex, reqs, arrive, other)
        itl = [b - a for t in times.values() for a, b in zip(t, t[1:], strict=False)]
        q = statistics.quantiles(itl, n=100)
        out[name] = {"p50_ms": 1e3 * statistics.median(itl), "p99_ms": 1e3 * q[98], "max_ms": 1e3 * max(itl)}
        out[name]["p99_over_p50"] = out[name]["p99_ms"] / out[name]["p50_ms"]
        out[name]["long_prompt_ttft_s"] = seen["ttft"]
        print(
            f"  {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in out[name].items() if v is not None),
            flush=True,
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["memory", "decode", "reuse", "chunked"], action="append")
    ap.add_argument("--baseline", default=BASELINE)
    ap.add_argument("--baseline-dir", type=Path, help="extract the baseline here (reused between runs)")
    ap.add_argument("--tokens", type=int, default=33, help="decode: tokens per timed run")
    ap.add_argument("--repeats", type=int, default=3, help="reuse: TTFT samples")
    ap.add_argument("--decode-repeats", type=int, default=7, help="decode: alternating rounds")
    ap.add_argument("--chunk", type=int, default=32, help="chunked: max_num_tokens per iteration")
    ap.add_argument(
        "--stream-tokens", type=int, default=400, help="chunked: tokens each of the 8 streams makes"
    )
    ap.add_argument(
        "--budget",
        type=int,
        action="append",
        help="chunked: only chunked context with this budget (repeatable)",
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return decode_worker()
    sections = args.only or ["memory", "decode", "reuse", "chunked"]
    trees = {"paged (this tree)": ROOT}
    if {"memory", "decode"} & set(sections):
        trees[f"contiguous ({args.baseline})"] = baseline_tree(args.baseline, args.baseline_dir)
    results: dict[str, object] = {"loadavg_start": Path("/proc/loadavg").read_text().split()[:3]}
    if "memory" in sections:
        print("memory: idle RSS of trtllm-peft serve", flush=True)
        results["memory"] = bench_memory(trees, settle=5.0)
    if "decode" in sections:
        print("decode: tokens/s, paged vs contiguous (alternating runs)", flush=True)
        results["decode"] = bench_decode(trees, [8, 32], args.tokens, args.decode_repeats)
    sys.path.insert(0, str(ROOT))
    if "reuse" in sections:
        print("reuse: TTFT of a 1,000-token shared prefix", flush=True)
        results["reuse"] = bench_reuse(1000, args.repeats)
    if "chunked" in sections:
        print("chunked: inter-token latency of 8 streams while a 2,000-token prompt arrives", flush=True)
        variants = chunked_variants(args.chunk, args.budget)
        results["chunked"] = bench_chunked(variants, 2000, 8, args.stream_tokens)
    results["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    out = ROOT / "bench" / "results" / "kv_cache.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    print(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
