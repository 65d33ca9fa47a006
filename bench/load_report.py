"""The report of bench/load.py: one table, then the checks that explain it (429s, loads, resources)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from load_check import LEASED, Verdict, metric_sum, unexplained_429s


@dataclass
class Phase:
    """One side of the comparison: what its clients saw, and what the system under test said."""

    name: str
    t0: float
    wall_s: float  # from the first request to the last answer (the drain after the window included)
    peak_rss_gb: float  # of the system under test
    duration: float
    records: list  # load.Record
    cpu_s: float  # CPU seconds of the system under test and the clients, from t0 to the last answer
    loads: list[tuple[int, float]]  # (adapter, time) of every load into the host cache, as it reports them
    metrics: list = field(default_factory=list)  # the server's /v1/metrics samples
    log: str = ""  # the server's log
    client_cpu_s: float | None = None  # of the clients alone, where they run apart (the server phase)
    client_loads: int | None = None  # adapters its client read from disk (the raw phase from disk)
    others_cpu_s: float | None = None  # CPU-seconds other processes of the machine took meanwhile

    def shared(self) -> float:
        """The share of the machine's CPU time that other processes took during the phase (0 when unknown)."""
        if self.others_cpu_s is None:
            return 0.0
        return max(self.others_cpu_s, 0.0) / (self.wall_s * (os.cpu_count() or 1))


def failures(records) -> dict[str, list]:
    """Every attempt that is neither a complete answer nor a 429, by kind."""
    kinds: dict[str, list] = {"5xx": [], "no answer": [], "other status": [], "incomplete 200": []}
    for r in records:
        if r.status >= 500:
            kinds["5xx"].append(r)
        elif r.status == 0:
            kinds["no answer"].append(r)  # transport error or timeout: nothing came back
        elif r.status not in (200, 429):
            kinds["other status"].append(r)
        elif r.status == 200 and not r.complete:
            kinds["incomplete 200"].append(r)
    return kinds


def mark_cold(p: Phase) -> int:
    """Mark an attempt cold when a load of its adapter ended between its send and its first token (it
    triggered or shared that load); returns how many loads no answer waited for (refused requests' loads)."""
    ends: dict[int, list[float]] = {}
    for adapter, t in p.loads:
        ends.setdefault(adapter, []).append(t)
    waited_for = set()
    for r in p.records:
        if r.t_first is not None:
            mine = [(r.adapter, t) for t in ends.get(r.adapter, ()) if r.t_send < t <= r.t_first]
            r.cold = bool(mine)
            waited_for.update(mine)
    return len(p.loads) - len(waited_for)


def _pct(values: list[float]) -> str:
    if not values:
        return "–"
    p50, p99 = np.percentile(values, [50, 99])
    return f"{p50:.2f} / {p99:.2f} s ({len(values)})"


def throughput(p: Phase) -> float:
    """Tokens that arrived within the load window, per second of window (the drain after it is not counted)."""
    end = p.t0 + p.duration
    return sum(p.t0 <= t < end for r in p.records if r.status == 200 for t in r.times) / p.duration


def summarize(p: Phase, judged: dict[str, int]) -> dict[str, str]:
    ok = [r for r in p.records if r.complete]
    return {
        "answers (200)": str(len(ok)),
        "429": str(sum(r.status == 429 for r in p.records)),
        "5xx / failed": str(sum(len(v) for v in failures(p.records).values())),
        "tokens/s": f"{throughput(p):.1f}",
        "tokens per CPU-s": f"{_per_cpu(p):.1f}",
        "TTFT warm p50 / p99 (n)": _pct([r.ttft for r in ok if not r.cold]),
        "TTFT cold p50 / p99 (n)": _pct([r.ttft for r in ok if r.cold]),
        "vs alone: same / tie / differ": f"{judged['same']} / {judged['tie']} / {judged['differ']}",
    }


def judge(verdicts: list[Verdict], tokenizer) -> tuple[dict[str, dict[str, int]], list[str]]:
    """Per phase, how many answers equal the alone request's, differ at a tie, or differ; and notes."""
    counts = {p: {"same": 0, "tie": 0, "differ": 0} for p in ("server", "server-b", "raw", "raw-disk")}
    notes, lp_err, text_diff = [], 0.0, 0
    for v in verdicts:
        a, d = v.answer, v.divergence
        kind = "same" if d is None else "tie" if d.tie else "differ"
        for phase, n in a.phases.items():
            counts[phase][kind] += n
        lp_err = max(lp_err, v.max_logprob_error)
        if d is not None:
            notes.append(
                f"{kind}: adapter {a.adapter} prompt {a.prompt} {a.phases} step {d.step}: got {d.got!r}, "
                f"alone {d.want!r}, top-2 gap {d.gap:.1e}, got = runner-up: {d.runner_up}"
            )
        elif a.text is not None and a.text != tokenizer.decode(v.fed):
            text_diff += 1
            notes.append(
                f"text: adapter {a.adapter} prompt {a.prompt}: streamed {a.text!r} != decoded tokens"
            )
    outputs: dict[int, dict[tuple, set[int]]] = {}
    for v in verdicts:
        outputs.setdefault(v.answer.prompt, {}).setdefault(v.answer.texts, set()).add(v.answer.adapter)
    spread = ", ".join(f"{len(o)}/{len(set().union(*o.values()))}" for _, o in sorted(outputs.items()))
    notes.insert(
        0,
        f"{len(verdicts)} distinct answers checked; max |log-prob - reference| where equal: {lp_err:.1e}; "
        f"streamed text != decoded tokens: {text_diff}; distinct answers / adapters per prompt: {spread}",
    )
    return counts, notes


def print_table(rows: dict[str, dict[str, str]]) -> None:
    cols = list(next(iter(rows.values())))
    print("| | " + " | ".join(cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(row[c] for c in cols) + " |")


def check_429s(server: Phase, raw: Phase, capacity: int, units: int) -> bool:
    """Print the 429 accounting; True when it adds up."""
    n429 = sum(r.status == 429 for r in server.records)
    counted = metric_sum(server.metrics, "request_failure_total", status="429")
    no_header = sum(r.status == 429 and r.retry_after != "1" for r in server.records)
    lone = unexplained_429s(server.records, capacity, units) + unexplained_429s(raw.records, capacity, units)
    host = sum(r.status == 429 and bool(LEASED.search(r.error)) for r in server.records)
    print(
        f"429s: server {n429} ({host} from its host cache, {n429 - host} from the engine; its request_failure_total"
        f'{{status="429"}}: {counted:.0f}; without Retry-After: {no_header}); raw executor "PEFT Cache is full" '
        f"{sum(r.status == 429 for r in raw.records)}; not explained by leases: {len(lone)}; time to the "
        f"refusal p50: server {_median_429(server):.2f} s, raw {_median_429(raw):.2f} s"
    )
    for x, why in lone[:5]:
        print(f"  unexplained 429: adapter {x.adapter}, {why}: {x.error[:160]}")
    return not lone and counted == n429 and not no_header


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """CPU-seconds every CPU of the machine spent busy since boot (all processes; /proc/stat's first line
    less idle and iowait): a phase's own CPU subtracted from its difference is what others took."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


RATE_BUCKET_S = 10.0
SHARED_WARN = 0.05  # other processes took more than this share of the machine: the ratios are not a figure


def peak_rss_gb(pid: int | str = "self") -> float:
    """VmHWM (peak resident set) of a process, in GB."""
    line = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("VmHWM"))
    return int(line.split()[1]) / 1e6


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _median_429(p: Phase) -> float:
    return float(np.median([r.t_end - r.t_send for r in p.records if r.status == 429] or [np.nan]))


def report(
    server: Phase,
    raw: Phase,
    verdicts: list[Verdict],
    tokenizer,
    wl,
    disk: Phase | None = None,
    server_b: Phase | None = None,
) -> bool:
    """Print the table and the checks; True when every check passed. `disk`: the raw phase whose client
    loads adapters from disk within the server's host budget (like with like: see load_client_adapters.py);
    `server_b`: the server again with other settings (bench/load.py --server-b)."""
    counts, notes = judge(verdicts, tokenizer)
    raws = [raw] + ([disk] if disk else [])
    servers = [server] + ([server_b] if server_b else [])
    unused = {p.name: mark_cold(p) for p in (*servers, *raws)}
    rows = {"server (HTTP, streaming)": summarize(server, counts["server"])}
    if server_b:
        rows["server B (--server-b)"] = summarize(server_b, counts["server-b"])
    rows["raw TorchExecutor (adapters packed before)"] = summarize(raw, counts["raw"])
    if disk:
        rows["raw TorchExecutor (adapters from disk, host budget)"] = summarize(disk, counts["raw-disk"])
    print_table(rows)
    print()
    for s in servers:
        for p, what in ((raw, "raw"), (disk, "raw from disk")):
            if p is None:
                continue
            ratio, cpu_ratio = throughput(s) / throughput(p), _per_cpu(s) / _per_cpu(p)
            print(
                f"{s.name} / {what} tokens/s = {ratio:.2f} (target >= 0.95: "
                f"{'met' if ratio >= 0.95 else 'NOT met'}); per CPU-second {cpu_ratio:.2f}"
            )
    print_shared([*servers, *raws])
    ok = all([check_429s(s, raw, wl.capacity_units, wl.units) for s in servers])
    tokens_agree = all([print_resources(s, raw, unused) for s in servers])
    if disk:
        print(
            f"raw from disk: its client read {disk.client_loads} adapters, its executor's host tier stored "
            f"{len(disk.loads)}; wall {disk.wall_s:.0f} s, CPU {disk.cpu_s:.0f} s; "
            f'"PEFT Cache is full" {sum(r.status == 429 for r in disk.records)}'
        )
    for note in notes[:25]:
        print("  " + note)
    failed = sum(print_failures(p) for p in (*servers, *raws))
    errors = [ln for s in servers for ln in s.log.splitlines() if "Traceback" in ln or "ERROR" in ln]
    print(f"server log: {len(errors)} error lines" + "".join(f"\n  {ln[:200]}" for ln in errors[:10]))
    differ = sum(c["differ"] for c in counts.values())
    return ok and tokens_agree and not (differ or failed or errors)


def print_resources(server: Phase, raw: Phase, unused: dict[str, int]) -> bool:
    """Loads, time, CPU, memory; True when the server counted the tokens its clients received."""
    n = metric_sum(server.metrics, "trtllm_peft_adapter_load_seconds_count")
    mean = metric_sum(server.metrics, "trtllm_peft_adapter_load_seconds_sum") / n if n else float("nan")
    print(
        f"adapter loads into the host cache: {server.name} {len(server.loads)} (its "
        f"trtllm_peft_adapter_load_seconds_count {n:.0f}), {unused[server.name]} of them waited for by no answer (their requests got 429), mean {mean:.2f} s "
        f"each; raw executor {len(raw.loads)}, {unused['raw']} unused"
    )
    print(
        f"wall time from first request to last answer: {server.name} {server.wall_s:.0f} s, raw {raw.wall_s:.0f} s; "
        f"CPU: server + clients {server.cpu_s:.0f} s (the HTTP clients alone {server.client_cpu_s or 0:.1f} s), "
        f"raw + clients {raw.cpu_s:.0f} s; peak RSS: server "
        f"{server.peak_rss_gb:.2f} GB, this process (clients, raw executor) {raw.peak_rss_gb:.2f} GB"
    )
    gen = metric_sum(server.metrics, "generation_tokens_total") - 2  # minus the warm-up request's
    got = sum(len(r.times) for r in server.records if r.status == 200)
    print(f"{server.name} generation_tokens_total {gen:.0f}, tokens its clients received {got}")
    return gen == got


def print_shared(phases: list[Phase]) -> None:
    """What other processes took of the machine during each phase: on a shared box a phase that lost a core
    to a compile runs at half speed (same batch), and its ratio says nothing about the server."""
    for p in phases:
        rates = " ".join(f"{r:.0f}" for r in window_rates(p))
        print(f"{p.name} tokens/s per {RATE_BUCKET_S:.0f} s of its window: {rates}")
    shares = {p.name: p.shared() for p in phases if p.others_cpu_s is not None}
    if not shares:
        return
    text = ", ".join(f"{name} {100 * v:.0f}%" for name, v in shares.items())
    busy = [name for name, v in shares.items() if v > SHARED_WARN]
    verdict = f"NOT a figure: {', '.join(busy)} shared the machine" if busy else "the machine was ours"
    print(f"other processes' share of the CPU during each phase: {text} ({verdict})")


def window_rates(p: Phase) -> list[float]:
    """Tokens/s in each RATE_BUCKET_S of the window: a phase whose rate halves at an unchanged batch lost a
    core to another process."""
    n = max(int(p.duration // RATE_BUCKET_S), 1)
    counts = np.histogram(
        [t - p.t0 for r in p.records for t in r.times], bins=n, range=(0, n * RATE_BUCKET_S)
    )[0]
    return [c / RATE_BUCKET_S for c in counts]


def print_failures(p: Phase) -> int:
    """Print up to 5 failures of each kind; returns how many there were."""
    total = 0
    for kind, recs in failures(p.records).items():
        total += len(recs)
        for r in recs[:5]:
            print(
                f"  {p.name} {kind}: adapter {r.adapter} status {r.status}, {len(r.texts)} tokens, finish "
                f"{r.finish}, usage {r.usage}: {r.error[:200]}"
            )
    return total


def _per_cpu(p: Phase) -> float:
    """All tokens the clients received (the drain included) per CPU-second of the phase."""
    return sum(len(r.times) for r in p.records if r.status == 200) / p.cpu_s
