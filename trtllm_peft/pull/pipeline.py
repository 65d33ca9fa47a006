"""One pull, start to end: stage → download → check with `inspect` → rename into NIM_PEFT_SOURCE/NAME.

Nothing is visible under its name until every file is there, verified, and readable as a LoRA that fits
the engine (when one is given), so the refresh loop of a running server never picks up half an adapter.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from trtllm_peft.pull.errors import PullError
from trtllm_peft.pull.progress import Progress
from trtllm_peft.pull.result import Fetched, PullResult
from trtllm_peft.pull.source import PullRequest, Source
from trtllm_peft.pull.staging import Staging, check_free

if TYPE_CHECKING:  # torch comes with it: `trtllm-peft --help` should not pay for that
    from trtllm_peft.lora import ModelSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Credentials:
    """What the registries need, from Settings (never from the environment here)."""

    hf_token: str | None = None
    hf_endpoint: str = "https://huggingface.co"
    ngc_api_key: str | None = None


@dataclass(frozen=True)
class Check:
    """What pulled adapters are checked against: an engine's or base model's spec (None = readable only)."""

    spec: ModelSpec | None = None
    against: str | None = None  # the --base / engine directory, for messages


def pull_one(
    request: PullRequest,
    root: Path,
    credentials: Credentials,
    check: Check,
    *,
    force: bool = False,
    progress: Progress | None = None,
) -> PullResult:
    """Pull `request` into `root`/NAME. Raises PullError; the staging directory is kept when the error is
    retryable (run again to resume) and deleted otherwise."""
    progress = progress or Progress(request.name, enabled=False)
    start = time.monotonic()
    check_free(root, request.name, force)
    try:
        with Staging(root, request, force=force) as stage:
            fetched = download(request.source, stage.dir, credentials, progress)
            fmt = validate(request.source, fetched, check)
            target = stage.commit(fetched.adapter_dir)
    finally:
        progress.close()
    log.debug("pulled %s into %s", request.source.text, target)
    return PullResult(
        request,
        time.monotonic() - start,
        path=target,
        format=fmt,
        size_bytes=fetched.size_bytes,
        files=fetched.files,
    )


def download(source: Source, dest: Path, credentials: Credentials, progress: Progress) -> Fetched:
    """The registry's part: its files into `dest`, verified; the adapter directory returned."""
    if source.scheme == "hf":
        from trtllm_peft.pull.hf import download_hf

        return download_hf(
            source, dest, token=credentials.hf_token, endpoint=credentials.hf_endpoint, progress=progress
        )
    from trtllm_peft.pull.ngc import download_ngc

    return download_ngc(source, dest, api_key=credentials.ngc_api_key, progress=progress)


def validate(source: Source, fetched: Fetched, check: Check) -> str:
    """`inspect` the staged adapter; PullError("not_lora") with every problem when it is not servable."""
    from trtllm_peft.inspect_adapter import inspect

    report = inspect(fetched.adapter_dir, check.spec)
    if report.ok:
        return report.format or "?"
    if not report.layers:  # nothing could be read (format unknown, or its files are corrupt)
        what = "is not a readable LoRA adapter"
    else:
        what = f"does not fit {check.against}" if check.spec is not None else "is not a usable LoRA adapter"
    problems = "\n".join(f"  - {p}" for p in report.problems)
    raise PullError("not_lora", f"{source.text} {what}:\n{problems}")
