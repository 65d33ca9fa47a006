"""Fairness of the host LoRA cache: 40 clients on 8 adapters with room for 4, both admission policies.

    .venv/bin/python bench/fairness.py                 # 60 s per policy
    .venv/bin/python bench/fairness.py --duration 20   # a smoke run

The scenario of issue #16 (finding 8): 8 random adapters of max rank on all seven modules (each takes
exactly one adapter's share of the host budget), NIM_MAX_CPU_LORAS=4, 40 clients, client c always asks
for adapter c % 8, greedy, --max-tokens tokens, one request after another for --duration seconds. A 429
waits Retry-After and resends the same request. Run twice, each on a fresh server:

* fifo: the lease queue (TRTLLM_PEFT_LORA_QUEUE_TIMEOUT=30, the default);
* 429:  the old policy, refused at once when the cache is full of adapters in use (TIMEOUT=0).

Wait = from the first send of a request to its answer (429 retries, queueing, adapter loads and
generation included). A request still unanswered when the run ends counts as starved.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.integration.conftest import Server, random_adapter, write_adapter  # noqa: E402
from trtllm_peft.lora import load_spec  # noqa: E402

ENGINE = ROOT / "engines" / "smollm2-135m"
ALL7 = ("attn_q", "attn_k", "attn_v", "attn_dense", "mlp_h_to_4h", "mlp_4h_to_h", "mlp_gate")
POLICIES = {"fifo": "30", "429": "0"}  # TRTLLM_PEFT_LORA_QUEUE_TIMEOUT


@dataclass
class Result:
    waits: list[float] = field(default_factory=list)  # answered requests
    answers: dict[int, int] = field(default_factory=dict)  # adapter -> answers
    refusals: int = 0  # 429 responses
    failures: list[str] = field(default_factory=list)
    starved: list[float] = field(default_factory=list)  # waits of requests unanswered at the end


async def client_loop(http: httpx.AsyncClient, c: int, args, end: float, res: Result) -> None:
    adapter = c % args.adapters
    body = {
        "model": f"a{adapter}",
        "prompt": "The capital of France is",
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    while time.monotonic() < end:
        start = time.monotonic()
        while True:
            try:
                r = await http.post(
                    "/v1/completions", json=body, timeout=max(end - time.monotonic(), 0.1) + 60
                )
            except httpx.HTTPError as e:
                res.failures.append(repr(e))
                return
            if r.status_code != 429:
                break
            res.refusals += 1
            if time.monotonic() >= end:
                res.starved.append(time.monotonic() - start)
                return
            await asyncio.sleep(float(r.headers.get("Retry-After", "1")))
        if r.status_code != 200:
            res.failures.append(f"{r.status_code} {r.text[:200]}")
            return
        res.waits.append(time.monotonic() - start)
        res.answers[adapter] = res.answers.get(adapter, 0) + 1


async def run_policy(url: str, args) -> Result:
    res = Result()
    limits = httpx.Limits(max_connections=args.clients + 8)
    async with httpx.AsyncClient(base_url=url, limits=limits) as http:
        await http.post("/v1/completions", json={"model": "smollm2", "prompt": "hi", "max_tokens": 1})  # warm
        end = time.monotonic() + args.duration
        await asyncio.gather(*(client_loop(http, c, args, end, res) for c in range(args.clients)))
    return res


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def row(name: str, res: Result, adapters: int) -> str:
    per = [res.answers.get(i, 0) for i in range(adapters)]
    return (
        f"| {name} | {len(res.waits)} | {min(per)} / {max(per)} | {sum(p == 0 for p in per)} | {res.refusals} | "
        f"{len(res.starved)} | {pct(res.waits, 50):.2f} / {pct(res.waits, 99):.2f} | {len(res.failures)} |"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--clients", type=int, default=40)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--budget", type=int, default=4, help="NIM_MAX_CPU_LORAS")
    p.add_argument("--max-tokens", type=int, default=8)
    args = p.parse_args(argv)
    spec = load_spec(ENGINE)
    results: dict[str, Result] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "loras"
        root.mkdir()
        for i in range(args.adapters):
            adapter = random_adapter(spec, rank=spec.max_lora_rank, modules=ALL7, seed=100 + i, std=0.02)
            write_adapter(adapter, root / f"a{i}", "hf", spec)
        for name, timeout in POLICIES.items():
            srv = Server(
                ENGINE,
                root,
                Path(tmp) / f"server-{name}.log",
                NIM_MAX_CPU_LORAS=str(args.budget),
                NIM_MAX_GPU_LORAS=str(args.budget),
                NIM_SERVED_MODEL_NAME="smollm2",
                TRTLLM_PEFT_LORA_QUEUE_TIMEOUT=timeout,
            )
            try:
                results[name] = asyncio.run(run_policy(srv.url, args))
            finally:
                srv.stop()
    print(
        f"{args.clients} clients, {args.adapters} adapters of max rank, room for {args.budget}, "
        f"{args.duration:g} s per policy, max_tokens {args.max_tokens}\n"
    )
    print(
        "| policy | answers | answers per adapter min / max | adapters never answered | 429 responses "
        "| starved at the end | wait p50 / p99 (s) | failures |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, res in results.items():
        print(row(name, res, args.adapters))
    fifo, old = results["fifo"], results["429"]
    print(
        f"\nfifo / 429: answers x{len(fifo.waits) / max(len(old.waits), 1):.2f}, "
        f"wait p99 x{pct(fifo.waits, 99) / pct(old.waits, 99):.2f}"
    )
    for name, res in results.items():
        for f in res.failures[:3]:
            print(f"{name} failure: {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
