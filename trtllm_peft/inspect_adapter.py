"""`trtllm-peft inspect`: what an adapter is, how big, and whether it fits an engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trtllm_peft import formats
from trtllm_peft.errors import AdapterError
from trtllm_peft.lora import LoraAdapter, ModelSpec, fit_to_spec
from trtllm_peft.lora.modules import TRTLLM_TO_HF


@dataclass
class Report:
    """Everything `inspect` prints; `as_dict()` is the `--json` form."""

    path: str
    format: str | None = None
    base_model: str | None = None
    layers: list[int] = field(default_factory=list)
    modules: dict[str, list[int]] = field(default_factory=dict)  # module -> distinct ranks
    max_rank: int = 0
    dora: str | None = (
        None  # None: plain LoRA; "trained" (PEFT's magnitudes) or "normalized" (TensorRT-LLM's)
    )
    num_params: int = 0
    size_bytes: int = 0
    nim_formula_elements: int | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "ok": self.ok}


def nim_formula_elements(adapter: LoraAdapter, spec: ModelSpec) -> int:
    """NIM's size estimate low_rank × inner_dim × num_modules × num_layers, with the hidden size as
    inner_dim and the adapter's max rank (NIM doc, "PEFT Cache memory requirements")."""
    return adapter.max_rank * spec.hidden_size * len(adapter.modules) * len(adapter.layers)


def inspect(path: str | Path, spec: ModelSpec | None = None) -> Report:
    """Read the adapter at `path` and report on it; problems are collected, never raised."""
    report = Report(path=str(path))
    try:
        report.format = formats.detect(path)
        adapter = formats.load(path, spec)
    except AdapterError as e:
        report.problems = e.problems
        return report
    report.base_model = adapter.base_model
    report.layers = adapter.layers
    report.modules = adapter.ranks
    report.max_rank = adapter.max_rank
    if adapter.is_dora:
        forms = {"normalized" if w.normalized else "trained" for _, w in adapter if w.is_dora}
        report.dora = " + ".join(sorted(forms))
    report.num_params = adapter.num_params
    report.size_bytes = adapter.num_bytes
    if spec is not None:
        report.nim_formula_elements = nim_formula_elements(adapter, spec)
        try:
            fit_to_spec(adapter, spec)
        except AdapterError as e:
            report.problems = e.problems
    return report


def render(report: Report) -> str:
    """Human-readable form of a report."""
    lines = [f"adapter   {report.path}", f"format    {report.format or '?'}"]
    if report.format and report.layers:
        if report.base_model:
            lines.append(f"base      {report.base_model}")
        span = f"{report.layers[0]}-{report.layers[-1]}" if len(report.layers) > 1 else str(report.layers[0])
        lines.append(f"layers    {len(report.layers)} ({span})")
        for module, ranks in report.modules.items():
            hf = TRTLLM_TO_HF.get(module, "")
            lines.append(f"module    {module:<12} {hf:<13} rank {', '.join(map(str, ranks))}")
        lines.append(f"max rank  {report.max_rank}")
        if report.dora:
            lines.append(f"DoRA      magnitudes {report.dora} (use_dora)")
        lines.append(f"size      {report.size_bytes:,} bytes ({report.num_params:,} parameters)")
        if report.nim_formula_elements is not None:
            lines.append(
                f"NIM size  {report.nim_formula_elements:,} elements (rank × hidden × modules × layers)"
            )
    if report.problems:
        lines.append(f"problems  {len(report.problems)}")
        lines += [f"  - {p}" for p in report.problems]
    else:
        lines.append(
            "status    ok"
            + (
                ""
                if report.nim_formula_elements is not None
                else " (no --base: not checked against an engine)"
            )
        )
    return "\n".join(lines)
