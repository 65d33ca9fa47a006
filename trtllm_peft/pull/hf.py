"""Hugging Face Hub: the adapter files of a repo (adapter_config.json + adapter_model.safetensors|bin),
fetched with huggingface_hub, resumable byte by byte across runs, verified against the Hub's checksums.

Why not `hf_hub_download(local_dir=...)`: since huggingface_hub 1.x it downloads into a process-unique
temporary file that it deletes on any failure ("it could not be reused anyway since the temporary name is
unique to this download", file_download._download_to_tmp_and_move), so a second run starts every file
over. We use the same library one level down: `model_info` resolves the revision to a commit and lists the
files, `get_hf_file_metadata` does the HEAD (ETag, size, CDN redirect), and `http_get` streams the bytes,
resuming from `resume_size` with a Range request. The partial file lives in the staging directory under a
name that includes the ETag, so a file whose content changed upstream is never resumed onto. http_get
writes in chunks of 10 MiB (constants.DOWNLOAD_CHUNK_SIZE), so that is what a broken transfer keeps.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from trtllm_peft.pull.capped import CappedFile, Oversized
from trtllm_peft.pull.errors import PullError
from trtllm_peft.pull.progress import Progress
from trtllm_peft.pull.result import Fetched
from trtllm_peft.pull.source import Source

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
WEIGHTS = (
    "adapter_model.safetensors",
    "adapter_model.bin",
)  # in order of preference: safetensors runs no code
PARTIAL = ".partial"  # inside the staging directory; removed before the adapter is put in place


def download_hf(
    source: Source, dest: Path, *, token: str | None, endpoint: str, progress: Progress
) -> Fetched:
    """Fetch the adapter files of `source` into `dest` (the staging directory) and return them.

    `token=None` lets huggingface_hub use the login stored by `hf auth login`, if any.
    """
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token)
    with _hub_errors(source, endpoint, token):
        info = api.model_info(source.repo, revision=source.revision, files_metadata=True)
        names = pick_files(source, [s.rfilename for s in info.siblings or []])
        commit = info.sha or source.revision or "main"  # the Hub always sends sha; a bare mirror might not
        for name in names:
            _download_file(source.repo, name, commit, dest, endpoint=endpoint, token=token, progress=progress)
    shutil.rmtree(dest / PARTIAL, ignore_errors=True)
    size = sum((dest / n).stat().st_size for n in names)
    return Fetched(adapter_dir=dest, files=names, size_bytes=size, revision=commit)


def pick_files(source: Source, files: list[str]) -> list[str]:
    """adapter_config.json and one weights file at the repo's root; a clear error for anything else."""
    present = set(files)
    weights = next((w for w in WEIGHTS if w in present), None)
    if ADAPTER_CONFIG in present and weights:
        return [ADAPTER_CONFIG, weights]
    nested = sorted({f.rsplit("/", 1)[0] for f in files if f.endswith("/" + ADAPTER_CONFIG)})
    wanted = ((ADAPTER_CONFIG, ADAPTER_CONFIG in present), ("adapter_model.safetensors|bin", weights))
    missing = " + ".join(f for f, ok in wanted if not ok)
    shown = ", ".join(sorted(files)[:8]) + (", ..." if len(files) > 8 else "") if files else "no files"
    hint = f"; adapters in sub-folders ({', '.join(nested[:4])}) are not pulled" if nested else ""
    raise PullError(
        "not_lora",
        f"{source.text} is not a LoRA adapter repo: no {missing} at its root (it has {shown}){hint}",
    )


def _download_file(
    repo: str, name: str, commit: str, dest: Path, *, endpoint: str, token: str | None, progress: Progress
) -> None:
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    url = hf_hub_url(repo, name, revision=commit, endpoint=endpoint)
    meta = get_hf_file_metadata(url, token=token, endpoint=endpoint)  # HEAD: ETag, size, CDN location
    final = dest / name
    if final.is_file() and matches_etag(final, meta.etag):
        log.info("%s: already complete in %s", name, dest)
        return
    part = dest / PARTIAL / f"{name}.{_safe(meta.etag)}.part"
    part.parent.mkdir(exist_ok=True)
    if meta.size is not None and part.is_file() and part.stat().st_size > meta.size:
        part.unlink()  # longer than the file: not a prefix of it
    headers = build_hf_headers(token=token)
    if urlsplit(meta.location).netloc != urlsplit(url).netloc:
        headers.pop("authorization", None)  # a signed CDN URL: the token stays with the Hub
    try:
        with part.open("ab") as fh:
            if fh.tell():
                log.info("%s: resuming at byte %d", name, fh.tell())
            http_get(
                meta.location,
                CappedFile(fh, meta.size),
                resume_size=fh.tell(),
                headers=headers,
                expected_size=meta.size,
                displayed_filename=name,
                tqdm_class=progress.file_bar,
            )
    except Oversized:
        part.unlink(missing_ok=True)  # never leave the oversized stream in staging
        raise PullError(
            "registry", f"{name}: the server sent more than the {meta.size} bytes it announced; refused"
        ) from None
    if matches_etag(part, meta.etag) is False:
        part.unlink()
        raise PullError("corrupt", f"{name}: the downloaded bytes do not match the Hub's checksum; run again")
    os.replace(part, final)


def matches_etag(path: Path, etag: str | None) -> bool | None:
    """Whether `path` has the content the Hub's ETag names: sha256 for LFS files, the git blob sha1 for
    the others. None when the ETag is neither (a mirror that computes its own), so nothing can be said."""
    etag = (etag or "").lower()
    if re.fullmatch(r"[0-9a-f]{64}", etag):
        digest = hashlib.sha256()
    elif re.fullmatch(r"[0-9a-f]{40}", etag):
        digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    else:
        return None
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest() == etag


def _safe(etag: str | None) -> str:
    etag = etag or "no-etag"
    return etag if re.fullmatch(r"[\w.-]{1,80}", etag) else hashlib.sha256(etag.encode()).hexdigest()[:40]


@contextlib.contextmanager
def _hub_errors(source: Source, endpoint: str, token: str | None) -> Iterator[None]:
    """huggingface_hub's exceptions → PullError with a sentence a user can act on."""
    import httpx2
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{source.text} ({endpoint})"
    try:
        yield
    except GatedRepoError:
        raise PullError("auth", f"{where} is gated: accept its terms on the Hub, then set HF_TOKEN") from None
    except RepositoryNotFoundError:
        why = "HF_TOKEN has no access to it" if token else "set HF_TOKEN if it is private"
        raise PullError("not_found", f"{where}: no such repository ({why})") from None
    except RevisionNotFoundError:
        raise PullError("not_found", f"{where}: no revision {source.revision!r} in this repository") from None
    except RemoteEntryNotFoundError as e:
        raise PullError(
            "not_found", f"{where}: a listed file is gone ({e.response.url}); run again"
        ) from None
    except HfHubHTTPError as e:
        raise _http_error(where, e.response.status_code, token) from None
    except (httpx2.TransportError, OfflineModeIsEnabled) as e:
        raise PullError(
            "network", f"cannot reach {where}: {e or type(e).__name__}; run again to resume"
        ) from None
    except OSError as e:
        if e.errno is not None:  # the local disk (full, read-only, ...), not the Hub
            raise PullError("disk", f"{where}: {e}; fix it and run again to resume") from None
        raise PullError("network", f"{where}: {e}; run again to resume") from None  # a short stream


def _http_error(where: str, status: int, token: str | None) -> PullError:
    if status in (401, 403):
        what = "HF_TOKEN was rejected" if token else "this needs a token: set HF_TOKEN"
        return PullError("auth", f"{where}: {what} (HTTP {status})")
    if status == 429 or status >= 500:
        return PullError("network", f"{where}: the Hub answered HTTP {status}; run again to resume")
    return PullError("not_found", f"{where}: HTTP {status}")
