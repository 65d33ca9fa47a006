"""NGC: a model version's files, fetched with NVIDIA's `ngcsdk` (`registry.model.download_version`).

The SDK lays a version out as `<dest>/<model>_v<version>/...`, the directory `ngc registry model
download-version` makes; the adapter is that directory, or the one directory inside it that holds adapter
files. The SDK does not resume (it truncates a file before fetching its ranges), so resuming is done one
level up: files already complete in the staging directory, checked against the SHA-256 that NGC lists
for them, are left out of the next run with `file_patterns`.

The SDK reads some NGC_CLI_* variables and ~/.ngc/config by itself; what we know we set explicitly:
the key (Settings.ngc_api_key), org and team (from the spec), and a quiet output format.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from trtllm_peft.pull.capped import ngcsdk_capped
from trtllm_peft.pull.errors import PullError
from trtllm_peft.pull.progress import Progress
from trtllm_peft.pull.result import Fetched
from trtllm_peft.pull.source import Source
from trtllm_peft.serving.catalog import detect_by_names

log = logging.getLogger(__name__)


def download_ngc(source: Source, dest: Path, *, api_key: str | None, progress: Progress) -> Fetched:
    """Fetch the model version `source` into `dest` (the staging directory); return the adapter in it."""
    models = make_client(source, api_key).registry.model
    with _ngc_errors(source, api_key):
        listed = {f.path: f for f in models.list_files(source.ngc_target)}
        version_dir = dest / f"{source.repo.rsplit('/', 1)[-1]}_v{source.revision}"
        todo = sorted(p for p, f in listed.items() if not _complete(version_dir / p, f))
        if todo:
            _download(models, source, dest, {version_dir / p: listed[p] for p in todo}, len(listed), progress)
    bad = [p for p, f in listed.items() if _complete(version_dir / p, f) is False]
    if bad:
        _discard(dest, [version_dir / p for p in bad])
        raise PullError("corrupt", f"{source.text}: {', '.join(bad)} do not match NGC's checksums; run again")
    adapter = find_adapter(source, version_dir)
    files = sorted(str(p.relative_to(adapter)) for p in adapter.rglob("*") if p.is_file())
    size = sum((adapter / f).stat().st_size for f in files)
    return Fetched(adapter_dir=adapter, files=files, size_bytes=size, revision=source.revision)


def _download(models, source: Source, dest: Path, todo: dict[Path, Any], n_listed: int, progress) -> None:
    """ngcsdk's download of the `todo` files (local path → NGC's listing of it), each cut at its listed size."""
    patterns = None if len(todo) == n_listed else sorted(f.path for f in todo.values())  # None: one listing
    with ngcsdk_capped({path: f.sizeInBytes or 0 for path, f in todo.items()}) as oversized:
        result = models.download_version(
            source.ngc_target,
            destination=str(dest),
            file_patterns=patterns,
            progress_callback_func=progress.ngc_callback,
        )
    if oversized:
        _discard(dest, oversized)
        first = min(oversized)
        raise PullError(
            "registry",
            f"{source.text}: {first.name}: NGC sent more than the {todo[first].sizeInBytes or 0} bytes its "
            "listing announced; refused",
        )
    _check_result(source, result, len(todo))


def _discard(dest: Path, paths) -> None:
    """A wrong (say, oversized) file is no prefix to resume from: never keep it in staging."""
    for p in paths:
        path = p.resolve()
        if path.is_relative_to(dest.resolve()):  # a listed path never reaches outside staging
            path.unlink(missing_ok=True)


def make_client(source: Source, api_key: str | None):
    """An ngcsdk client for the org and team of `source`. Without a key it is a guest (public models)."""
    import ngcsdk

    client = ngcsdk.Client()
    client.config.format_type = "json"  # the SDK's own ascii printing would interleave with our bars
    if api_key:
        org, *rest = source.repo.split("/")
        client.config.app_key = api_key
        client.config.org_name = org
        client.config.team_name = rest[0] if len(rest) == 2 else "no-team"
    return client


def find_adapter(source: Source, version_dir: Path) -> Path:
    """The directory the catalog will take for an adapter: the version itself, or the one sub-directory
    with adapter files."""

    def is_adapter(d: Path) -> bool:
        return detect_by_names({p.name for p in d.iterdir() if p.is_file()}) is not None

    if version_dir.is_dir() and is_adapter(version_dir):
        return version_dir
    found = [d for d in sorted(version_dir.rglob("*")) if d.is_dir() and is_adapter(d)]
    if len(found) == 1:
        return found[0]
    files = sorted(str(p.relative_to(version_dir)) for p in version_dir.rglob("*") if p.is_file())
    what = (
        f"{len(found)} adapters ({', '.join(d.name for d in found)})"
        if found
        else f"files {', '.join(files[:8])}"
    )
    raise PullError(
        "not_lora",
        f"{source.text} is not one LoRA adapter: it holds {what}; an adapter is adapter_config.json + "
        "adapter_model.safetensors|bin, one .nemo file, or model.lora_config.npy + model.lora_weights.npy",
    )


def _complete(path: Path, listed) -> bool | None:
    """True: `path` has the listed size and SHA-256. False: it does not. None: NGC lists no checksum."""
    if not path.is_file() or path.stat().st_size != (listed.sizeInBytes or 0):
        return False
    if not listed.sha256_base64:
        return None
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return base64.b64encode(digest.digest()).decode() == listed.sha256_base64


def _check_result(source: Source, result, expected: int) -> None:
    status = result.get("status")
    if status == "Completed":
        return
    if status == "Terminated":
        raise PullError("interrupted", f"{source.text}: interrupted; run again to resume")
    done = f"{result.get('completed_count', 0)} of {expected} files"
    raise PullError(
        "network", f"{source.text}: download {str(status).lower()} after {done}; run again to resume"
    )


@contextlib.contextmanager
def _ngc_errors(source: Source, api_key: str | None) -> Iterator[None]:
    """ngcsdk's exceptions → PullError with a sentence a user can act on."""
    from ngcbase.errors import (
        AccessDeniedException,
        AuthenticationException,
        NgcAPIError,
        NgcException,
        ResourceNotFoundException,
    )

    where = f"{source.text} (NGC)"
    try:
        yield
    except ResourceNotFoundException:
        why = "or NGC_API_KEY has no access to it" if api_key else "set NGC_API_KEY if it is not public"
        raise PullError("not_found", f"{where}: no such model version ({why})") from None
    except (AuthenticationException, AccessDeniedException) as e:
        what = "NGC_API_KEY was rejected" if api_key else "this needs NGC_API_KEY"
        raise PullError("auth", f"{where}: {what} ({_status(e)})") from None
    except NgcAPIError as e:
        status = getattr(e.response, "status_code", None) or 0
        kind = "network" if status == 429 or status >= 500 else "registry"
        raise PullError(kind, f"{where}: NGC answered HTTP {status}") from None
    except NgcException as e:
        text = str(e)
        unreachable = any(w in text for w in ("reachable", "connection", "timed out"))
        raise PullError("network" if unreachable else "registry", f"{where}: {text.strip()}") from None
    except ValueError as e:  # the SDK's configuration checks (a key without an org, ...)
        raise PullError("auth", f"{where}: {e}") from None


def _status(e: Exception) -> str:
    status = getattr(getattr(e, "response", None), "status_code", None)
    return f"HTTP {status}" if status else str(e).strip() or type(e).__name__
