"""Checks for bench/load.py: greedy tokens against the reference model, 429s against the lease rule.

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

import datetime
import json
import re
import sys
import time
from dataclasses import dataclass, field

import torch

from trtllm_peft.executor.torch.kv import PagedKVCache
from trtllm_peft.executor.torch.lora_ops import LoraBatch, prepare
from trtllm_peft.executor.torch.model import Chunk, LlamaModel
from trtllm_peft.lora import ModelSpec, PackedLora, unpack

TIE_GAP = 1e-3  # top-2 log-prob gap below which two tokens are a numerical tie
BATCH = 16


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


_LOADED = re.compile(r"adapter '([^']+)' loaded")


def load_events(log: str) -> list[tuple[str, float]]:
    """(adapter name, epoch time) of every "adapter 'x' loaded" line of the server's JSON log."""
    events = []
    for line in log.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        m = _LOADED.match(str(entry.get("message", ""))) if isinstance(entry, dict) else None
        if m:
            when = datetime.datetime.strptime(entry["time"], "%Y-%m-%dT%H:%M:%S.%fZ")
            events.append((m.group(1), when.replace(tzinfo=datetime.UTC).timestamp()))
    return events


# ---- 429s -------------------------------------------------------------------------------------------------


LEASED = re.compile(r"\((\d+)/(\d+) rank-units leased")


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
        m = LEASED.search(x.error)
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
        # the torch reference batch (LoraBatch) below has no one-call decode plan: layer by layer, op by op
        model.fuse_lora = False
        self.token_text, self.n = token_text, max_tokens
        self.max_len = max(len(p) for p in prompt_ids) + max_tokens + 1
        tpb = 32
        width = -(-self.max_len // tpb)  # row i owns blocks i·width .. (i+1)·width - 1
        self.kv = PagedKVCache(
            spec.num_layers,
            BATCH * width,
            tpb,
            model.arch.num_kv_heads,
            model.arch.head_dim,
            model.dtype,
            model.device,
        )
        self.tables = self.kv.tables([list(range(i * width, (i + 1) * width)) for i in range(BATCH)])

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
        verdicts, start = [], time.perf_counter()
        for i in range(0, len(answers), BATCH):
            verdicts += self._run(answers[i : i + BATCH])
            print(
                f"  {len(verdicts)}/{len(answers)} checked, {time.perf_counter() - start:.0f} s",
                file=sys.stderr,
            )
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
        prompts = [self.prompt_ids[a.prompt] for a in answers]
        chunks = [Chunk(self.tables[i], 0, len(p)) for i, p in enumerate(prompts)]
        ids = torch.tensor([t for p in prompts for t in p])
        owner = torch.tensor([index[i] for i, p in enumerate(prompts) for _ in p])
        positions0 = torch.cat([torch.arange(len(p)) for p in prompts])
        logits = self.model.step(ids, positions0, chunks, None, self.kv, lora, owner)  # [B, V]
        verdicts = [Verdict(a) for a in answers]
        positions = torch.tensor([len(self.prompt_ids[a.prompt]) for a in answers])
        for k in range(self.n):
            feed = [
                self._step(v, k, lp) for v, lp in zip(verdicts, torch.log_softmax(logits, -1), strict=True)
            ]
            if k + 1 < self.n:
                logits = self.model.step(
                    torch.tensor(feed),
                    positions + k,
                    [],
                    self.tables[: len(answers)],
                    self.kv,
                    lora,
                    torch.tensor(index),
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
