"""Server under load: 64 streaming clients over 40 LoRA adapters, then the raw executor on the same workload.

    .venv/bin/python bench/load.py             # 2 minutes per side (--duration to change)
    .venv/bin/python bench/load.py --quick     # ~20 s per side: a smoke run

1. Writes 40 random rank-16 adapters (all seven modules; a third each HF PEFT, NeMo, TensorRT-LLM) in a
   temp dir and starts `trtllm-peft serve` on them with NIM_MAX_CPU_LORAS=16, NIM_MAX_GPU_LORAS=8: the host
   budget holds 32 rank-16 adapters, the device budget 16, so 40 adapters mean evictions and possible 429s.
2. 64 clients stream /v1/completions (greedy, ignore_eos, max_tokens fixed, logprobs=1) for --duration s,
   then let their last requests finish; client c starts c × 50 ms into the window (load_workload.STAGGER_S:
   both sides then run the same batch regime). Client c draws (adapter, prompt) from its own seeded generator:
   adapters uniform (or Zipf(--zipf) by popularity), prompts uniform. A 429 waits Retry-After and resends.
3. Stops the server, starts the raw TorchExecutor in this process (the two never share the CPU) and runs
   the same clients (same draws, concurrency, adapters as packed tensors, prompts, max_tokens) for as long,
   twice: with every adapter packed before the window (in memory, unbounded), then (unless
   --no-raw-from-disk) with a client that reads, validates and packs an adapter from disk on a miss within
   the server's host-cache budget, as the server must (load_client_adapters.py): like with like.
4. Checks every complete answer of both against the reference model teacher-forced (load_check.py), every
   429 against the lease rule and the server's metrics, and prints one table.

Throughput = tokens that arrived within the window / its length. Cold = the request waited for a load of
its adapter into the host cache (first use, or after an eviction; it triggered the load or shared it): a
load of its adapter ended between its send and its first token. Loads are the server's own ("adapter 'x'
loaded" in its JSON log, counted against trtllm_peft_adapter_load_seconds_count) and the executor's (its
host tier's stores, recorded by a hook).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from contextlib import aclosing
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from load_check import Reference, distinct_answers, load_events, parse_metrics  # noqa: E402
from load_client_adapters import ClientAdapters  # noqa: E402
from load_report import Phase, cpu_seconds, loadavg, machine_busy_s, peak_rss_gb, report  # noqa: E402
from load_workload import (  # noqa: E402
    ALL7,
    BASE,
    ENGINE,
    HANG_S,
    PROMPTS,
    SETTINGS,
    Record,
    Workload,
    make_adapters,
    run_clients,
)

from tests.integration.conftest import Server  # noqa: E402
from trtllm_peft import formats  # noqa: E402
from trtllm_peft.executor.api import FinishReason, LoraConfig, OutputConfig, Request, SamplingConfig  # noqa: E402
from trtllm_peft.executor.errors import ErrorKind, classify  # noqa: E402
from trtllm_peft.lora import load_spec, pack  # noqa: E402
from trtllm_peft.serving.engine_client import EngineClient  # noqa: E402
from trtllm_peft.serving.tokenizer import Tokenizer  # noqa: E402

# ---- the server -------------------------------------------------------------------------------------------


def _take_chunk(rec: Record, chunk: dict) -> None:
    if chunk.get("usage"):
        rec.usage = chunk["usage"]["completion_tokens"]
    for c in chunk.get("choices") or []:
        lp = c.get("logprobs") or {}
        if rec.t_first is None and lp.get("tokens"):
            rec.t_first = time.perf_counter()
        rec.texts += lp.get("tokens") or []
        rec.times += [time.perf_counter()] * len(lp.get("tokens") or [])
        rec.logprobs += lp.get("token_logprobs") or []
        rec.text = (rec.text or "") + (c.get("text") or "")
        rec.finish = c.get("finish_reason") or rec.finish


def http_sender(http: httpx.AsyncClient, wl: Workload):
    async def send(rec: Record) -> None:
        body = {
            "model": wl.names[rec.adapter],
            "prompt": PROMPTS[rec.prompt],
            "max_tokens": wl.max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "logprobs": 1,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        try:
            async with http.stream("POST", "/v1/completions", json=body) as r:
                rec.status = r.status_code
                if r.status_code != 200:
                    rec.error = (await r.aread()).decode(errors="replace")[:300]
                    rec.retry_after = r.headers.get("retry-after")
                    return
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        _take_chunk(rec, json.loads(line[6:]))
        except (httpx.HTTPError, json.JSONDecodeError) as e:
            rec.error = f"{type(e).__name__}: {e}"

    return send


async def server_phase(args, wl: Workload, loras: Path, log: Path, name="server", env=None) -> Phase:
    """Start the server (`env`: more variables), warm it (one base request), run the clients, scrape
    /v1/metrics, stop it."""
    server = Server(
        ENGINE,
        loras,
        log,
        **SETTINGS,
        **(env or {}),
        NIM_SERVED_MODEL_NAME=BASE,
        NIM_LOG_LEVEL="INFO",  # "adapter 'x' loaded" lines, with millisecond times in JSON
        NIM_JSONL_LOGGING="1",
    )
    clock = time.time() - time.perf_counter()  # log times (epoch) -> this process's perf_counter
    try:
        limits = httpx.Limits(max_connections=args.clients + 8, max_keepalive_connections=args.clients + 8)
        timeout = httpx.Timeout(HANG_S, connect=30.0)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=timeout) as http:
            warm = await http.post("/v1/completions", json={"model": BASE, "prompt": "Hi", "max_tokens": 2})
            warm.raise_for_status()
            cpu, clients_cpu, busy = cpu_seconds(server.proc.pid), time.process_time(), machine_busy_s()
            t0, records = await run_clients(http_sender(http, wl), wl, args.clients, args.duration)
            clients_cpu = time.process_time() - clients_cpu
            cpu = cpu_seconds(server.proc.pid) - cpu + clients_cpu
            others = machine_busy_s() - busy - cpu
            metrics = parse_metrics((await http.get("/v1/metrics")).text)
            rss = peak_rss_gb(server.proc.pid)
    finally:
        server.stop()
    text = log.read_text()
    loads = [(wl.names.index(name), t - clock) for name, t in load_events(text) if name in wl.names]
    wall = max(r.t_end for r in records) - t0
    phase = Phase(name, t0, wall, rss, args.duration, records, cpu, loads, metrics, text, clients_cpu)
    phase.others_cpu_s = others
    return phase


# ---- the raw executor -------------------------------------------------------------------------------------


def raw_sender(client: EngineClient, wl: Workload, adapter_of):
    greedy = SamplingConfig(top_k=1, temperature=0.0)

    async def send(rec: Record) -> None:
        p = await adapter_of(rec.adapter)
        request = Request(
            wl.prompt_ids[rec.prompt],
            wl.max_tokens,
            streaming=True,
            sampling_config=greedy,
            output_config=OutputConfig(return_log_probs=True, exclude_input_from_output=True),
            lora_config=LoraConfig(rec.adapter + 1, p.weights, p.config),
        )
        rec.status = 200
        try:
            async with asyncio.timeout(HANG_S), aclosing(client.generate(request)) as responses:
                async for resp in responses:
                    if resp.has_error():
                        rec.status = 429 if classify(resp.error_msg) is ErrorKind.CACHE_FULL else 500
                        rec.error = resp.error_msg
                        return
                    res = resp.result
                    if rec.t_first is None and res.output_token_ids[0]:
                        rec.t_first = time.perf_counter()
                    rec.ids += res.output_token_ids[0]
                    rec.times += [time.perf_counter()] * len(res.output_token_ids[0])
                    rec.logprobs += res.log_probs[0] if res.log_probs else []
                    if res.is_final:
                        rec.finish = (
                            "length" if res.finish_reason == FinishReason.LENGTH else res.finish_reason.name
                        )
        except TimeoutError:
            rec.error = f"no final response after {HANG_S:.0f} s"

    return send


async def raw_phase(args, wl: Workload, adapters, token_text, name: str = "raw") -> tuple[Phase, object]:
    """The same clients straight on a TorchExecutor (through the server's async bridge, nothing else), their
    adapters `adapters(i)`: packed before the window, or from disk (load_client_adapters.py)."""
    executor = await asyncio.to_thread(raw_executor)
    client = EngineClient(executor, asyncio.get_running_loop())
    loads = _record_loads(executor.cache.host)
    try:
        async with aclosing(
            client.generate(Request(wl.prompt_ids[0], 2))
        ) as warm:  # base model, as the server's
            async for _ in warm:
                pass
        cpu, busy = time.process_time(), machine_busy_s()
        t0, records = await run_clients(raw_sender(client, wl, adapters), wl, args.clients, args.duration)
        cpu = time.process_time() - cpu
        others = machine_busy_s() - busy - cpu
    finally:
        await asyncio.to_thread(client.close)
    for r in records:
        r.texts = [token_text(t) for t in r.ids]
    wall = max(r.t_end for r in records) - t0
    loads = [(task - 1, t) for task, t in loads if task > 0]
    phase = Phase(name, t0, wall, peak_rss_gb(), args.duration, records, cpu, loads, others_cpu_s=others)
    return phase, executor.model


def _record_loads(tier) -> list[tuple[int, float]]:
    """(task id, time) of every adapter the executor's host tier stores (wraps its `put`: a measuring hook)."""
    events, put = [], tier.put

    def recording_put(task_id, units, value):
        evicted = put(task_id, units, value)
        events.append((task_id, time.perf_counter()))
        return evicted

    tier.put = recording_put
    return events


def raw_executor():
    """The executor the server builds (executor/factory.py) from the same settings: same caches, KV cache
    config (NIM's default: no block reuse; TensorRT-LLM's KvCacheConfig default would reuse prompt blocks),
    chunked context, token budgets. Built otherwise, the raw side would run a differently configured engine.
    This process takes `serve`'s malloc settings too (engine/host_malloc.py): glibc's defaults would give
    the raw side other costs for a step's logits."""
    from trtllm_peft.engine.engine_dir import EngineDir
    from trtllm_peft.engine.host_malloc import tune_for_server
    from trtllm_peft.executor.factory import create_executor
    from trtllm_peft.settings import Settings

    env = {**os.environ, **SETTINGS, "TRTLLM_PEFT_ENGINE_DIR": str(ENGINE)}
    env.pop("NIM_PEFT_SOURCE", None)
    tune_for_server()
    return create_executor(Settings.from_env(env), EngineDir.open(ENGINE))


# ---- main -------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=120.0, help="seconds of load per phase (default 120)")
    p.add_argument("--quick", action="store_true", help="20 s per phase: a smoke run")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--adapters", type=int, default=40)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--zipf", type=float, default=0.0, help="adapter popularity: Zipf exponent (0 = uniform)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-raw-from-disk",
        dest="raw_from_disk",
        action="store_false",
        help="skip the third phase (raw executor, its client loading adapters from disk like the server)",
    )
    p.add_argument(
        "--server-b",
        metavar="NAME=VALUE",
        action="append",
        default=[],
        help="also run the server with these variables set (an A/B of server settings in one run; repeatable)",
    )
    args = p.parse_args(argv)
    args.server_b = dict(kv.split("=", 1) for kv in args.server_b)
    if args.quick:
        args.duration = 20.0
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not (ENGINE / "trtllm_peft.json").is_file():
        from trtllm_peft.engine.build import build_engine

        build_engine(None, ENGINE, quiet=True)
    spec, tok = load_spec(ENGINE), Tokenizer(ENGINE)
    start, load = time.perf_counter(), {"start": loadavg()}

    def say(what: str) -> None:
        print(f"[{time.perf_counter() - start:5.0f} s] {what}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="trtllm-peft-load-") as tmp:
        wl, server, packed, loras, server_b = run_server(args, spec, tok, say, Path(tmp))
        load["after server"] = loadavg()
        say(f"raw executor, adapters packed before the window: the same clients for {args.duration:.0f} s")
        raw, model = asyncio.run(raw_phase(args, wl, _preloaded(packed), tok.token_text))
        load["after raw"] = loadavg()
        disk = None
        if args.raw_from_disk:
            say(f"raw executor, adapters from disk within the host budget: {args.duration:.0f} s")
            disk = asyncio.run(_disk_phase(args, wl, spec, loras, tok.token_text))
            load["after raw from disk"] = loadavg()
    say("checking every answer against the reference model")
    phases = {"server": server.records, "raw": raw.records} | ({"raw-disk": disk.records} if disk else {})
    phases |= {"server-b": server_b.records} if server_b else {}
    verdicts = Reference(model, spec, packed, wl.prompt_ids, tok.token_text, args.max_tokens).check(
        distinct_answers(phases)
    )
    say("done")
    print(
        f"\nload test: {args.clients} streaming clients, {args.adapters} rank-{args.rank} adapters (Zipf "
        f"{args.zipf}), max_tokens {args.max_tokens} greedy ignore_eos, {args.duration:.0f} s per phase, "
        f"NIM_MAX_CPU_LORAS=16 NIM_MAX_GPU_LORAS=8, torch threads {torch.get_num_threads()}\n"
    )
    ok = report(server, raw, verdicts, tok, wl, disk, server_b)
    print(f"load average (1/5/15 min): {'; '.join(f'{k} {v}' for k, v in load.items())}")
    return 0 if ok else 1


def _preloaded(packed: list):
    async def adapter_of(i: int):
        return packed[i]

    return adapter_of


async def _disk_phase(args, wl: Workload, spec, loras: list[Path], token_text) -> Phase:
    """The raw phase with a client that loads adapters as the server does (load_client_adapters.py)."""
    adapters = ClientAdapters(loras, spec, wl.capacity_units)
    try:
        phase, _ = await raw_phase(args, wl, adapters.get, token_text, name="raw-disk")
    finally:
        adapters.close()
    phase.client_loads = len(adapters.loads)
    return phase


def run_server(args, spec, tok, say, tmp: Path) -> tuple[Workload, Phase, list, list[Path], Phase | None]:
    """Adapters in `tmp`, the server phase on them (and the B server's, --server-b), then the adapters
    packed for the raw executor."""
    loras = tmp / "loras"
    loras.mkdir()
    say(f"writing {args.adapters} adapters")
    names = make_adapters(loras, spec, args.adapters, args.rank, seed=1000 + args.seed)
    units = args.rank * len(ALL7) * spec.num_layers
    prompts = [tok.encode(p) for p in PROMPTS]
    wl = Workload(names, prompts, args.max_tokens, args.zipf, args.seed, units, spec.cache_units(16))
    say(f"server: {args.clients} clients for {args.duration:.0f} s")
    server = asyncio.run(server_phase(args, wl, loras, tmp / "server.log"))
    server_b = None
    if args.server_b:
        say(f"server with {args.server_b}: {args.clients} clients for {args.duration:.0f} s")
        server_b = asyncio.run(server_phase(args, wl, loras, tmp / "server-b.log", "server-b", args.server_b))
    say("packing the adapters for the raw executor")
    packed = [pack(formats.load_for_engine(loras / n, spec), spec.dtype) for n in names]
    return wl, server, packed, [loras / n for n in names], server_b


if __name__ == "__main__":
    sys.exit(main())
