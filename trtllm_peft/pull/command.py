"""Download LoRA adapters from Hugging Face or NGC into NIM_PEFT_SOURCE, safely.

  trtllm-peft pull hf:OWNER/REPO[@REVISION] [--name NAME]
  trtllm-peft pull ngc:ORG/[TEAM/]MODEL:VERSION [--name NAME]
  trtllm-peft pull --from-file adapters.txt      (one `SOURCE [NAME]` per line, pulled in parallel)

Only the adapter is fetched: from Hugging Face adapter_config.json and adapter_model.safetensors (or
.bin); from NGC the model version's files. The default NAME is the repo's name (HF) or MODEL_vVERSION
(NGC, the directory `ngc registry model download-version` makes). NAME is the adapter's id in /v1/models.

Safe for a running server: files are written to a hidden NIM_PEFT_SOURCE/.pull-NAME-<id>/ (the server
ignores hidden directories), checksummed, checked with `inspect` against --base (default: the engine in
TRTLLM_PEFT_ENGINE_DIR, when it exists), and only then renamed to NIM_PEFT_SOURCE/NAME in one atomic step.
An existing NAME is kept unless --force (then it is swapped atomically).

Resumable: after a broken connection or Ctrl-C, run the same command again; it continues from the bytes
already downloaded (Hugging Face) or the files already complete (NGC).

Credentials: HF_TOKEN (private or gated repos; else the login of `hf auth login`), HF_ENDPOINT (a Hub
mirror), NGC_API_KEY (or NGC_CLI_API_KEY; without one, NGC public models only).

Exit code: 0 when every adapter is in place; 1 when some of a --from-file list failed (see the table);
2 for a single pull that failed, with the reason.
"""

from __future__ import annotations

import argparse
import logging
import queue
import sys
import threading
import time
from pathlib import Path

from trtllm_peft.pull.errors import PullError
from trtllm_peft.pull.pipeline import Check, Credentials, pull_one
from trtllm_peft.pull.progress import Progress
from trtllm_peft.pull.result import PullResult, human_size, render_table
from trtllm_peft.pull.source import USAGE, PullRequest, read_requests
from trtllm_peft.settings import Settings


def add_pull_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `pull` (the module docstring is its description)."""
    p.description = p.description or (__doc__ or "").strip()
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("source", nargs="?", help=USAGE)
    p.add_argument("--name", help="adapter name (directory under NIM_PEFT_SOURCE); default from the source")
    p.add_argument("--from-file", type=Path, metavar="FILE", help="pull every `SOURCE [NAME]` line of FILE")
    p.add_argument("--peft-source", type=Path, default=None, help="adapter root (default NIM_PEFT_SOURCE)")
    p.add_argument(
        "--base",
        default=None,
        help="check adapters against this engine or HF model directory (default TRTLLM_PEFT_ENGINE_DIR)",
    )
    p.add_argument(
        "--max-lora-rank", type=int, default=None, help="for a HF --base (default NIM_MAX_LORA_RANK)"
    )
    p.add_argument("--force", action="store_true", help="replace an adapter of the same name (atomically)")
    p.add_argument("-j", "--jobs", type=int, default=4, help="parallel pulls for --from-file (default 4)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_pull(args: argparse.Namespace, settings: Settings) -> int:
    """`trtllm-peft pull`. A single pull raises PullError (the CLI prints it, exit 2); a list prints a table."""
    requests = _requests(args)
    root = args.peft_source or settings.peft_source
    if root is None:
        raise PullError("usage", "no adapter root: set NIM_PEFT_SOURCE or pass --peft-source")
    credentials = Credentials(settings.hf_token, settings.hf_endpoint, settings.ngc_api_key)
    check = _check(args, settings)
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        logging.getLogger("httpx2").setLevel(logging.WARNING)  # huggingface_hub's client logs every request
    if args.from_file is None:
        result = pull_one(
            requests[0],
            root,
            credentials,
            check,
            force=args.force,
            progress=Progress(requests[0].name, enabled=not args.no_progress),
        )
        print(_done_line(result, check))
        return 0
    results = pull_many(
        requests, root, credentials, check, force=args.force, jobs=args.jobs, progress=not args.no_progress
    )
    print(render_table(results))
    return 0 if all(r.ok for r in results) else 1


def pull_many(
    requests: list[PullRequest],
    root: Path,
    credentials: Credentials,
    check: Check,
    *,
    force: bool = False,
    jobs: int = 4,
    progress: bool = False,
) -> list[PullResult]:
    """Pull all `requests`, `jobs` at a time; one result per request, in order, failures included.

    Daemon threads, not a ThreadPoolExecutor: on Ctrl-C the process exits at once instead of waiting for
    running downloads (whose partial files stay in staging, ready to resume)."""
    todo: queue.SimpleQueue[int] = queue.SimpleQueue()
    for i in range(len(requests)):
        todo.put(i)
    results: list[PullResult | None] = [None] * len(requests)

    def worker(position: int) -> None:
        while True:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            request, start = requests[i], time.monotonic()
            bar = Progress(request.name, position=position, enabled=progress)
            try:
                results[i] = pull_one(request, root, credentials, check, force=force, progress=bar)
            except PullError as e:
                results[i] = PullResult(request, time.monotonic() - start, kind=e.kind, problem=str(e))
            except Exception as e:  # a bug or an unmapped library error: report it in its row, go on
                results[i] = PullResult(request, time.monotonic() - start, kind="error", problem=repr(e))

    threads = [
        threading.Thread(target=worker, args=(p,), daemon=True)
        for p in range(max(1, min(jobs, len(requests))))
    ]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(timeout=0.2)  # short joins keep Ctrl-C responsive
    return [r for r in results if r is not None]


def _requests(args: argparse.Namespace) -> list[PullRequest]:
    if args.from_file is not None:
        if args.source or args.name:
            raise PullError("usage", "give either SOURCE [--name NAME] or --from-file FILE, not both")
        return read_requests(args.from_file)
    if not args.source:
        raise PullError("usage", f"nothing to pull: {USAGE}, or --from-file FILE")
    return [PullRequest.of(args.source, args.name)]


def _check(args: argparse.Namespace, settings: Settings) -> Check:
    """--base, else the configured engine when it is built, else no engine check (readability only)."""
    from trtllm_peft.lora.spec import spec_for_base

    base = Path(args.base) if args.base else settings.engine_dir
    if not args.base and not (base / "config.json").is_file():
        return Check()
    spec = spec_for_base(base, default_max_lora_rank=settings.max_lora_rank, max_lora_rank=args.max_lora_rank)
    return Check(spec, str(base))


def _done_line(result: PullResult, check: Check) -> str:
    checked = f"fits {check.against}" if check.spec is not None else "not checked against an engine"
    return (
        f"pulled {result.request.source.text} -> {result.path} ({result.format}, {len(result.files)} files, "
        f"{human_size(result.size_bytes)}, {result.seconds:.1f}s; {checked})"
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m trtllm_peft.pull`: the same command without the rest of the CLI."""
    from trtllm_peft.errors import TrtllmPeftError
    from trtllm_peft.log import setup_logging

    parser = argparse.ArgumentParser(prog="trtllm-peft pull")
    add_pull_arguments(parser)
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
        setup_logging(settings)
        return run_pull(args, settings)
    except TrtllmPeftError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (run the same command again to resume)", file=sys.stderr)
        return 130
