"""The load test's workload (bench/load.py): its adapters, prompts and clients, and what a client records of
each request; the same for the server phase and the raw executor's."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.integration.conftest import random_adapter, write_adapter

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ROOT / "engines" / "smollm2-135m"
ALL7 = ("attn_q", "attn_k", "attn_v", "attn_dense", "mlp_h_to_4h", "mlp_4h_to_h", "mlp_gate")
FORMATS = ("hf", "nemo", "trtllm")
PROMPTS = (
    "John buys 10 packs of magic cards. Each pack has 20 cards, so in total he",
    "Write a short poem about the sea:",
    "The three primary colors are",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "Translate to French: The weather is nice today, so we will",
)
BASE = "smollm2"
RETRY_S = 1.0  # the raw executor's "cache full" waits as long as the server's Retry-After
HANG_S = 120.0  # a request silent this long is reported as a hang
# Client c sends its first request c × this after the window opens, in both phases. Started together, the raw
# executor's clients (answered with no transport delay) stay in lock-step: the whole batch finishes in one
# step and the next 30 prompts prefill in one ~390-token step every ~33 steps, while the server's arrivals
# spread out (1-2 prompts in 70% of its steps): the two sides ran different batch regimes (s10 serve.md).
STAGGER_S = 0.05
SETTINGS = {"NIM_MAX_CPU_LORAS": "16", "NIM_MAX_GPU_LORAS": "8"}  # of the server and of the raw executor


@dataclass
class Record:
    """One attempt of one request, as its client saw it."""

    client: int
    adapter: int
    prompt: int
    want: int  # max_tokens
    t_send: float = 0.0
    t_first: float | None = None
    t_end: float = 0.0
    status: int = 0  # HTTP status; the raw executor's are mapped: 200 ok, 429 cache full, 500 other error
    error: str = ""
    cold: bool = False
    retry_after: str | None = None
    texts: list[str] = field(default_factory=list)  # token texts (the server's logprobs entries)
    ids: list[int] = field(default_factory=list)  # token ids (raw executor only)
    logprobs: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # arrival time of each token
    text: str | None = None  # streamed text (server only)
    finish: str | None = None
    usage: int | None = None

    @property
    def complete(self) -> bool:
        return (
            self.status == 200
            and not self.error
            and len(self.texts) == self.want
            and self.finish == "length"
            and self.usage in (None, self.want)
        )

    @property
    def ttft(self) -> float | None:
        return None if self.t_first is None else self.t_first - self.t_send


# ---- workload ---------------------------------------------------------------------------------------------


@dataclass
class Workload:
    names: list[str]
    prompt_ids: list[list[int]]
    max_tokens: int
    zipf: float
    seed: int
    units: int  # rank-units of one adapter
    capacity_units: int  # of the host cache

    def draws(self, client: int):
        """The endless (adapter, prompt) sequence of one client: the same in both phases."""
        rng = random.Random(self.seed * 1_000_003 + client)
        weights = [1.0 / (i + 1) ** self.zipf for i in range(len(self.names))]
        while True:
            yield rng.choices(range(len(self.names)), weights)[0], rng.randrange(len(PROMPTS))


def make_adapters(root: Path, spec, n: int, rank: int, seed: int) -> list[str]:
    """n random adapters of `rank` on all seven modules, formats in turn; names lora-00…"""
    names = []
    for i in range(n):
        name = f"lora-{i:02d}"
        adapter = random_adapter(spec, rank=rank, modules=ALL7, seed=seed + i, std=0.05)
        write_adapter(adapter, root / name, FORMATS[i % len(FORMATS)], spec)
        names.append(name)
    return names


async def run_clients(send, wl: Workload, clients: int, duration: float):
    """`clients` loops sending their draws until `duration` s have passed; (start time, records)."""
    records: list[Record] = []
    t0 = time.perf_counter()
    deadline = t0 + duration

    async def client(c: int) -> None:
        await asyncio.sleep(c * STAGGER_S)
        for adapter, prompt in wl.draws(c):
            while time.perf_counter() < deadline:
                rec = Record(c, adapter, prompt, wl.max_tokens, t_send=time.perf_counter())
                await send(rec)
                rec.t_end = time.perf_counter()
                records.append(rec)
                if rec.status != 429:
                    break
                await asyncio.sleep(float(rec.retry_after or RETRY_S))
            if time.perf_counter() >= deadline:
                return

    await asyncio.gather(*(client(c) for c in range(clients)))
    return t0, records
