"""Checks for bench/load.py: greedy tokens against the reference model, 429s against the lease rule, metrics.

Token check (why it is sound). A greedy request sent alone produces r with r[k] = argmax p(· | prompt + r[:k]).
For each distinct answer s the load produced, the reference engine's own model is run teacher-forced on
prompt + s (prefill, then one decode step per token, the engine's code path) and gives, at every step k,
the log-probs on exactly the prefix prompt + s[:k]. If s[k] is the argmax at every step then, by induction,
s == r. At the first k where it is not, s[:k] == r[:k], so that step's prefix is the alone request's prefix
and its top-2 gap is the quantity to judge: a tie when < TIE_GAP and s[k] is the runner-up. Distinct
answers are checked in batches (mixed adapters, as the engine batches them); a divergence is re-run alone
(batch of one, the executor's path for a single request) so the verdict is against the request sent alone.

The server's streams carry token *texts* (logprobs entries), not ids: the fed id is the reference's choice
when its text equals the server's; two ids with the same text cannot be told apart (the raw executor's
answers carry ids and are compared exactly).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import torch

from trtllm_peft.executor.torch.kv_cache import KVCache
from trtllm_peft.executor.torch.lora_ops import LoraBatch, prepare
from trtllm_peft.executor.torch.model import LlamaModel
from trtllm_peft.lora import ModelSpec, PackedLora, unpack

TIE_GAP = 1e-3  # top-2 log-prob gap below which two tokens are a numerical tie
BATCH = 16


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


# ---- Prometheus text --------------------------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of every sample of a Prometheus text exposition."""
    out = []
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and not line.startswith("#"):
            out.append((m.group(1), dict(_LABEL.findall(m.group(2) or "")), float(m.group(3))))
    return out


def metric_sum(samples, name: str, **labels: str) -> float:
    """Sum of the samples named `name` whose labels include `labels`."""
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items()))


# ---- 429s -------------------------------------------------------------------------------------------------


_LEASED = re.compile(r"\((\d+)/(\d+) rank-units leased")


def unexplained_429s(records, capacity_units: int, units: int) -> list[tuple[object, str]]:
    """429s that the lease rule cannot explain, each with the reason.

    Two independent tests. (1) The client's view: a request R can hold a lease when X is refused only if R
    was sent before X's answer came back and R ended after X was sent (the server leases after receiving R
    and releases before R's stream ends). Refusing X is legitimate only if those adapters (other than X's)
    fill the budget so that X's does not fit: n_holders * units + units > capacity. (2) The server's own
    account: its message states the leased rank-units, which must leave less than one adapter of room.
    """
    ok = [r for r in records if r.status == 200]
    bad = []
    for x in (r for r in records if r.status == 429):
        holders = {
            r.adapter for r in ok if r.adapter != x.adapter and r.t_send < x.t_end and r.t_end > x.t_send
        }
        if len(holders) * units + units <= capacity_units:
            bad.append((x, f"at most {len(holders)} other adapters can have been leased"))
        m = _LEASED.search(x.error)
        if m and int(m.group(1)) + units <= int(m.group(2)):
            bad.append((x, f"the server says {m.group(1)}/{m.group(2)} rank-units were leased"))
    return bad


# ---- greedy tokens ----------------------------------------------------------------------------------------


@dataclass
class Answer:
    """One distinct answer (adapter, prompt, token texts) and the records that gave it."""

    adapter: int
    prompt: int
    texts: tuple[str, ...]
    ids: list[int] | None  # known exactly for the raw executor's answers
    logprobs: list[float]
    text: str | None  # the server's streamed text, checked against the decoded ids
    phases: dict[str, int] = field(default_factory=dict)  # phase -> how many records gave this answer


@dataclass
class Divergence:
    step: int
    gap: float  # top-1 minus top-2 log-prob on the alone request's prefix
    runner_up: bool  # the answer's token is the reference's second choice
    got: str
    want: str

    @property
    def tie(self) -> bool:
        return self.runner_up and self.gap < TIE_GAP


@dataclass
class Verdict:
    answer: Answer
    divergence: Divergence | None = None
    fed: list[int] = field(default_factory=list)  # the ids the reference was fed (= the answer's ids)
    max_logprob_error: float = 0.0  # |answer log-prob - reference log-prob| over the matching steps


def distinct_answers(phase_records: dict[str, list]) -> list[Answer]:
    """Group complete answers by (adapter, prompt, token texts); ids and streamed text kept when known."""
    by_key: dict[tuple, Answer] = {}
    for phase, records in phase_records.items():
        for r in records:
            if not r.complete:
                continue
            key = (r.adapter, r.prompt, tuple(r.texts))
            a = by_key.setdefault(key, Answer(r.adapter, r.prompt, key[2], None, r.logprobs, None))
            a.ids = a.ids or (list(r.ids) if r.ids else None)
            a.text = a.text if a.text is not None else r.text
            a.phases[phase] = a.phases.get(phase, 0) + 1
    return sorted(by_key.values(), key=lambda a: (a.adapter, a.prompt))


class Reference:
    """The reference engine's model, teacher-forced on answers, with the adapters as the executor holds them."""

    def __init__(
        self,
        model: LlamaModel,
        spec: ModelSpec,
        packed: list[PackedLora],
        prompt_ids: list[list[int]],
        token_text,
        max_tokens: int,
    ):
        self.model, self.spec, self.packed, self.prompt_ids = model, spec, packed, prompt_ids
        self.token_text, self.n = token_text, max_tokens
        self.max_len = max(len(p) for p in prompt_ids) + max_tokens + 1
        self.kv = KVCache(
            spec.num_layers,
            BATCH,
            model.arch.num_kv_heads,
            self.max_len,
            model.arch.head_dim,
            model.dtype,
            model.device,
        )

    def check(self, answers: list[Answer]) -> list[Verdict]:
        """A verdict per answer; divergences found in a batch are re-judged alone.

        One intra-op thread: on a CPU shared with other work, OpenMP's spinning threads made a step ~8x
        slower with two threads than with one (measured here); the numerics only move within a tie.
        """
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._check(answers)
        finally:
            torch.set_num_threads(threads)

    def _check(self, answers: list[Answer]) -> list[Verdict]:
        verdicts = []
        for i in range(0, len(answers), BATCH):
            verdicts += self._run(answers[i : i + BATCH])
        for j, v in enumerate(verdicts):
            if v.divergence is not None:
                verdicts[j] = self._run([v.answer])[0]
        return verdicts

    def _run(self, answers: list[Answer]) -> list[Verdict]:
        adapters = list(dict.fromkeys(a.adapter for a in answers))
        tensors = [
            prepare(
                unpack(self.packed[x].weights, self.packed[x].config, self.spec),
                self.spec,
                self.model.dtype,
                self.model.device,
            )
            for x in adapters
        ]
        lora = LoraBatch(tensors, self.spec, self.model.dtype, self.model.device)
        index = [adapters.index(a.adapter) for a in answers]
        logits = torch.stack(
            [
                self.model.prefill(torch.tensor(self.prompt_ids[a.prompt]), row, self.kv, lora, index[row])
                for row, a in enumerate(answers)
            ]
        )  # [B, V]
        verdicts = [Verdict(a) for a in answers]
        positions = torch.tensor([len(self.prompt_ids[a.prompt]) for a in answers])
        for k in range(self.n):
            feed = [
                self._step(v, k, lp) for v, lp in zip(verdicts, torch.log_softmax(logits, -1), strict=True)
            ]
            if k + 1 < self.n:
                logits = self.model.decode(
                    torch.tensor(feed), positions + k, self.kv, lora, torch.tensor(index)
                )
        return verdicts

    def _step(self, v: Verdict, k: int, lp: torch.Tensor) -> int:
        """Judge step k of one answer against log-probs `lp` [V]; returns the id to feed next."""
        top = torch.topk(lp, 2)
        best, second = (int(i) for i in top.indices)
        a = v.answer
        if v.divergence is None:
            same = a.ids[k] == best if a.ids else self.token_text(best) == a.texts[k]
            if same:
                if k < len(a.logprobs) and a.logprobs[k] is not None:
                    v.max_logprob_error = max(v.max_logprob_error, abs(a.logprobs[k] - float(lp[best])))
            else:
                got = a.ids[k] == second if a.ids else self.token_text(second) == a.texts[k]
                v.divergence = Divergence(
                    k, float(top.values[0] - top.values[1]), got, a.texts[k], self.token_text(best)
                )
        fed = best if v.divergence is None else (a.ids[k] if a.ids else best)
        v.fed.append(fed)
        return fed


# ---- report -----------------------------------------------------------------------------------------------


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
    all_tokens = sum(len(r.times) for r in p.records if r.status == 200)
    return {
        "answers (200)": str(len(ok)),
        "429": str(sum(r.status == 429 for r in p.records)),
        "5xx / failed": str(sum(len(v) for v in failures(p.records).values())),
        "tokens/s": f"{throughput(p):.1f}",
        "tokens per CPU-s": f"{all_tokens / p.cpu_s:.1f}" if p.cpu_s else "–",
        "TTFT warm p50 / p99 (n)": _pct([r.ttft for r in ok if not r.cold]),
        "TTFT cold p50 / p99 (n)": _pct([r.ttft for r in ok if r.cold]),
        "vs alone: same / tie / differ": f"{judged['same']} / {judged['tie']} / {judged['differ']}",
    }


def judge(verdicts: list[Verdict], tokenizer) -> tuple[dict[str, dict[str, int]], list[str]]:
    """Per phase, how many answers equal the alone request's, differ at a tie, or differ; and notes."""
    counts = {p: {"same": 0, "tie": 0, "differ": 0} for p in ("server", "raw")}
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
    host = sum(r.status == 429 and bool(_LEASED.search(r.error)) for r in server.records)
    print(
        f"429s: server {n429} ({host} from its host cache, {n429 - host} from the engine; its request_failure_total"
        f'{{status="429"}}: {counted:.0f}; without Retry-After: {no_header}); raw executor "PEFT Cache is full" '
        f"{sum(r.status == 429 for r in raw.records)}; not explained by leases: {len(lone)}; time to the "
        f"refusal p50: server {_median_429(server):.2f} s, raw {_median_429(raw):.2f} s"
    )
    for x, why in lone[:5]:
        print(f"  unexplained 429: adapter {x.adapter}, {why}: {x.error[:160]}")
    return not lone and counted == n429 and not no_header


def _mean_load(p: Phase) -> float:
    n = metric_sum(p.metrics, "trtllm_peft_adapter_load_seconds_count")
    return metric_sum(p.metrics, "trtllm_peft_adapter_load_seconds_sum") / n if n else float("nan")


def _median_429(p: Phase) -> float:
    return float(np.median([r.t_end - r.t_send for r in p.records if r.status == 429] or [np.nan]))


def report(server: Phase, raw: Phase, verdicts: list[Verdict], tokenizer, wl) -> bool:
    """Print the table and the checks; True when every check passed."""
    counts, notes = judge(verdicts, tokenizer)
    unused = {p.name: mark_cold(p) for p in (server, raw)}
    print_table(
        {
            "server (HTTP, streaming)": summarize(server, counts["server"]),
            "raw TorchExecutor": summarize(raw, counts["raw"]),
        }
    )
    ratio, cpu_ratio = throughput(server) / throughput(raw), _per_cpu(server) / _per_cpu(raw)
    print(
        f"\nserver / raw tokens/s = {ratio:.2f} (target >= 0.9: {'met' if ratio >= 0.9 else 'NOT met'}); "
        f"per CPU-second {cpu_ratio:.2f}"
    )
    ok = check_429s(server, raw, wl.capacity_units, wl.units)
    print(
        f"adapter loads into the host cache: server {len(server.loads)} (its trtllm_peft_adapter_load_seconds_count "
        f"{metric_sum(server.metrics, 'trtllm_peft_adapter_load_seconds_count'):.0f}), {unused['server']} of them "
        f"waited for by no answer (their requests got 429), mean {_mean_load(server):.2f} s each; raw executor "
        f"{len(raw.loads)}, {unused['raw']} unused"
    )
    print(
        f"wall time from first request to last answer: server {server.wall_s:.0f} s, raw {raw.wall_s:.0f} s; "
        f"CPU: server + clients {server.cpu_s:.0f} s, raw + clients {raw.cpu_s:.0f} s; peak RSS: server "
        f"{server.peak_rss_gb:.2f} GB, this process (clients, raw executor) {raw.peak_rss_gb:.2f} GB"
    )
    gen = metric_sum(server.metrics, "generation_tokens_total") - 2  # minus the warm-up request's
    got = sum(len(r.times) for r in server.records if r.status == 200)
    print(f"server generation_tokens_total {gen:.0f}, tokens its clients received {got}")
    for note in notes[:25]:
        print("  " + note)
    failed = 0
    for p in (server, raw):
        for kind, recs in failures(p.records).items():
            failed += len(recs)
            for r in recs[:5]:
                print(
                    f"  {p.name} {kind}: adapter {r.adapter} status {r.status}, {len(r.texts)} tokens, finish "
                    f"{r.finish}, usage {r.usage}: {r.error[:200]}"
                )
    errors = [ln for ln in server.log.splitlines() if "Traceback" in ln or "ERROR" in ln]
    print(f"server log: {len(errors)} error lines" + "".join(f"\n  {ln[:200]}" for ln in errors[:10]))
    differ = counts["server"]["differ"] + counts["raw"]["differ"]
    return ok and not (differ or failed or errors or gen != got)


def _per_cpu(p: Phase) -> float:
    return sum(len(r.times) for r in p.records if r.status == 200) / p.cpu_s
