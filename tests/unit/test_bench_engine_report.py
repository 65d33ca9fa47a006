"""bench/engine.py's verdicts: each target line says met, MISSED or not measured from the run's own ratios, and
the OpenVINO greedy agreement counts what it says it counts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from engine_openvino import agreement  # noqa: E402
from engine_report import HF, MIXED, OURS, OV, markdown, prefill_table, targets  # noqa: E402


def _rows(ours_base: float, ours_mixed: float, ov_base: float | None) -> list[dict]:
    rows = [
        {"dtype": "float32", "batch": 8, "system": "floor", "case": "base", "tok_s": 200.0},
        {"dtype": "float32", "batch": 8, "system": OURS, "case": "base", "tok_s": ours_base},
        {"dtype": "float32", "batch": 8, "system": OURS, "case": MIXED, "tok_s": ours_mixed},
        {"dtype": "float32", "batch": 8, "system": HF, "case": "base", "tok_s": 50.0},
    ]
    if ov_base is not None:
        rows.append({"dtype": "float32", "batch": 8, "system": OV, "case": "base", "tok_s": ov_base})
    return rows


def _line(text: str, start: str) -> str:
    return next(line for line in text.splitlines() if line.strip().startswith(start))


@pytest.mark.parametrize(
    ("start", "ours_base", "ours_mixed", "ov_base", "verdict", "shown"),
    [
        ("float32 b8: our base ≥ 70% of the floor", 150.0, 140.0, None, "met", "75%"),
        ("float32 b8: our base ≥ 70% of the floor", 130.0, 120.0, None, "MISSED", "65%"),
        ("float32 b8 base: ours ≥ 1.5× OpenVINO", 150.0, 140.0, 100.0, "met", "1.50×"),
        ("float32 b8 base: ours ≥ 1.5× OpenVINO", 140.0, 130.0, 100.0, "MISSED", "1.40×"),
        ("float32 b8 base: ours ≥ 1.5× OpenVINO", 150.0, 140.0, None, "not measured", "–"),
        ("float32 b8 1 adapter: ours ≥ 1.5× OpenVINO", 150.0, 140.0, 100.0, "not measured", "–"),
        ("float32 b8: our base ≥ 3× transformers", 160.0, 140.0, None, "met", "3.20×"),
        (f"float32 b8: {MIXED} ≥ 0.85× our base", 100.0, 80.0, None, "MISSED", "0.80×"),
    ],
)
def test_target_verdicts(start, ours_base, ours_mixed, ov_base, verdict, shown) -> None:
    line = _line(targets(_rows(ours_base, ours_mixed, ov_base), []), start)
    assert line.rstrip().endswith(verdict)
    assert shown in line


def test_prefill_target_is_a_share_of_the_peak() -> None:
    prefill = [{"dtype": "float32", "system": OURS, "tok_s": 400.0, "pct_peak": 0.55}]
    assert _line(targets(_rows(1, 1, None), prefill), "float32: our prefill").rstrip().endswith("MISSED")
    assert "| trtllm-peft (ours) | 400 (55%) |" in prefill_table(prefill)


def test_markdown_marks_missing_cells() -> None:
    table = markdown(_rows(150.0, 140.0, None) + [
        {"dtype": "bfloat16", "batch": 8, "system": OV, "case": "base", "tok_s": 90.0}
    ])  # fmt: skip
    assert "| trtllm-peft (ours) | base | – | 150 |" in table  # no bfloat16 row of ours: a dash
    assert "| OpenVINO GenAI | base | 90 | – |" in table


@pytest.mark.parametrize(
    ("ours", "theirs", "sequences", "before"),
    [
        ([[1, 2, 3, 4]], [[1, 2, 3, 4]], 1.0, 1.0),
        ([[1, 2, 3, 4]], [[1, 2, 9, 4]], 0.0, 0.5),  # the 4th token agrees again, but after a divergence
        ([[1, 2], [5, 6]], [[1, 2], [7, 6]], 0.5, 0.5),
    ],
)
def test_agreement(ours, theirs, sequences, before) -> None:
    assert agreement(ours, theirs) == {"sequences": sequences, "tokens_before_divergence": before}
