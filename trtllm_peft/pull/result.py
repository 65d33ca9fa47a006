"""What pulls produced: the downloaded files (`Fetched`), the outcome of each pull (`PullResult`), and the
summary table `--from-file` prints."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from trtllm_peft.pull.source import PullRequest


@dataclass
class Fetched:
    """What a download left in the staging directory: the adapter directory (inside it) and its files."""

    adapter_dir: Path
    files: list[str] = field(default_factory=list)
    size_bytes: int = 0
    revision: str | None = None  # the commit (HF) or version (NGC) actually fetched


@dataclass
class PullResult:
    """One row of the summary: a pull that put an adapter in place (`path`), or the reason it did not."""

    request: PullRequest
    seconds: float
    path: Path | None = None
    format: str | None = None
    size_bytes: int = 0
    files: list[str] = field(default_factory=list)
    kind: str | None = None  # PullError.kind when it failed
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None

    @property
    def status(self) -> str:
        return "ok" if self.ok else f"failed: {self.kind}"


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def render_table(results: list[PullResult], *, width: int = 72) -> str:
    """name | source | status | size | time | problem (first line, cut to `width`); full problems below."""
    header = ("NAME", "SOURCE", "STATUS", "SIZE", "TIME", "PROBLEM")
    rows = [header] + [
        (
            r.request.name,
            r.request.source.text,
            r.status,
            human_size(r.size_bytes) if r.ok else "-",
            f"{r.seconds:.1f}s",
            _first_line(r.problem, width) if r.problem else "",
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    failed = [r for r in results if not r.ok]
    lines.append(f"{len(results) - len(failed)} pulled, {len(failed)} failed")
    for r in failed:
        if "\n" in r.problem or len(r.problem) > width:
            lines.append(f"\n{r.request.name}: {r.problem}")
    return "\n".join(lines)


def _first_line(text: str, width: int) -> str:
    line = text.splitlines()[0]
    return line if len(line) <= width else line[: width - 3] + "..."
