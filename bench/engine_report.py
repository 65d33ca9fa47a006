"""bench/engine.py's output: the JSON, the Markdown tables, the targets (met/missed, ratios within the run)
and the plot."""

from __future__ import annotations

import json
import os
from pathlib import Path

from engine_cases import N_ADAPTERS, PREFILL_LEN

OURS, HF, OV = "trtllm-peft (ours)", "transformers+peft", "OpenVINO GenAI"
MIXED = f"{N_ADAPTERS} distinct adapters"
DORA_CASE = f"{N_ADAPTERS} distinct DoRA adapters"


def report(result: dict, root: Path) -> None:
    """Write bench/results/engine.json and bench/engine.png; print the tables and the targets."""
    out = root / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    result["meta"]["load_average_end"] = os.getloadavg()
    (out / "engine.json").write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result["rows"]))
    print(prefill_table(result["prefill"]))
    for dt, a in result.get("openvino", {}).get("agreement", {}).items():
        print(f"OpenVINO greedy tokens vs ours, base, {dt}: {a['sequences']:.0%} of sequences identical, "
              f"{a['tokens_before_divergence']:.0%} of tokens before the first divergence")  # fmt: skip
    for case, how in result.get("openvino", {}).get("how", {}).items():
        print(f"OpenVINO {case}: {how}")
    print(targets(result["rows"], result["prefill"]))
    plot(result["rows"], root / "bench" / "engine.png")


def rate(rows, dt, b, system, case):
    return next(
        (
            r["tok_s"]
            for r in rows
            if (r["dtype"], r["batch"], r["system"], r["case"]) == (dt, b, system, case)
        ),
        None,
    )


def markdown(rows: list[dict]) -> str:
    keys = sorted({(r["dtype"], r["batch"]) for r in rows})
    cases = list(dict.fromkeys((r["system"], r["case"]) for r in rows))
    head = "| system | case | " + " | ".join(f"{d} b{b}" for d, b in keys) + " |"
    lines = [head, "|" + "---|" * (2 + len(keys))]
    for s, c in cases:
        vals = [rate(rows, d, b, s, c) for d, b in keys]
        lines.append(f"| {s} | {c} | " + " | ".join(f"{v:.0f}" if v else "–" for v in vals) + " |")
    return "decode tokens/s\n" + "\n".join(lines)


def prefill_table(prefill: list[dict]) -> str:
    dts = sorted({p["dtype"] for p in prefill})
    lines = [f"prefill of a {PREFILL_LEN}-token prompt (batch 1, time to first token): tokens/s (% of the "
             "measured matmul peak of the dtype)", "| system | " + " | ".join(dts) + " |",
             "|" + "---|" * (1 + len(dts))]  # fmt: skip
    for s in dict.fromkeys(p["system"] for p in prefill):
        cells = []
        for dt in dts:
            p = next((p for p in prefill if (p["system"], p["dtype"]) == (s, dt)), None)
            cells.append(f"{p['tok_s']:.0f} ({p['pct_peak']:.0%})" if p else "–")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _check(lines: list[str], name: str, num, den, want: float, unit: str = "×") -> None:
    if num is None or den is None:
        lines.append(f"  {name:<58}    –   not measured")
        return
    v = num / den
    shown = f"{v:5.0%}" if unit == "%" else f"{v:5.2f}×"
    lines.append(f"  {name:<58} {shown}  {'met' if v >= want else 'MISSED'}")


def targets(rows: list[dict], prefill: list[dict]) -> str:
    """Every target of issue #15 (and the earlier ones that still hold), one line each."""
    lines = ["targets (ratios within this run):"]
    dts = sorted({r["dtype"] for r in rows})
    batches = sorted({r["batch"] for r in rows})
    for dt in dts:
        for b in batches:
            _check(lines, f"{dt} b{b}: our base ≥ 70% of the floor", rate(rows, dt, b, OURS, "base"),
                   rate(rows, dt, b, "floor", "base"), 0.70, "%")  # fmt: skip
    if {"float32", "bfloat16"} <= set(dts):
        for b in batches:
            _check(lines, f"b{b}: bfloat16 base faster than float32 base",
                   rate(rows, "bfloat16", b, OURS, "base"), rate(rows, "float32", b, OURS, "base"), 1.0)  # fmt: skip
    for dt in dts:
        p = {q["system"]: q for q in prefill if q["dtype"] == dt}
        got = p.get(OURS)
        _check(lines, f"{dt}: our prefill ≥ 60% of the matmul peak", got and got["pct_peak"], 1.0, 0.6, "%")
    for dt in dts:
        for b in (8, 32):
            for case in ("base", "1 adapter", MIXED):
                _check(lines, f"{dt} b{b} {case}: ours ≥ 1.5× OpenVINO GenAI",
                       rate(rows, dt, b, OURS, case), rate(rows, dt, b, OV, case), 1.5)  # fmt: skip
    for dt in dts:
        _check(lines, f"{dt} b8: our base ≥ 3× transformers base",
               rate(rows, dt, 8, OURS, "base"), rate(rows, dt, 8, HF, "base"), 3.0)  # fmt: skip
        _check(lines, f"{dt} b8: {MIXED} ≥ 3× peft mixed batch",
               rate(rows, dt, 8, OURS, MIXED), rate(rows, dt, 8, HF, MIXED), 3.0)  # fmt: skip
        if rate(rows, dt, 8, OURS, DORA_CASE) is not None:
            _check(lines, f"{dt} b8: 8 DoRA ≥ 0.9× 8 plain adapters",
                   rate(rows, dt, 8, OURS, DORA_CASE), rate(rows, dt, 8, OURS, MIXED), 0.9)  # fmt: skip
        for b in batches:
            _check(lines, f"{dt} b{b}: {MIXED} ≥ 0.85× our base",
                   rate(rows, dt, b, OURS, MIXED), rate(rows, dt, b, OURS, "base"), 0.85)  # fmt: skip
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["dtype"], r["batch"]) for r in rows})
    cases = list(dict.fromkeys((r["system"], r["case"]) for r in rows))
    fig, ax = plt.subplots(figsize=(13, 5))
    width = 0.8 / len(cases)
    for i, (s, c) in enumerate(cases):
        vals = [rate(rows, d, b, s, c) or 0 for d, b in keys]
        ax.bar([k + i * width for k in range(len(keys))], vals, width, label=f"{s}: {c}")
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(keys))], [f"{d}\nbatch {b}" for d, b in keys])
    ax.set_ylabel("decode tokens/s")
    ax.set_title("SmolLM2-135M decode throughput, CPU (higher is better)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
