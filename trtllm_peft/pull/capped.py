"""Downloads that stop at the size the registry announced, checked on every write while the bytes stream.

Neither client checks while it streams: huggingface_hub's http_get compares sizes once the whole stream is
written (file_download.py, the consistency check), and ngcsdk once a whole range is written
(ngcbase/transfer/async_download.py request_s3_download: DownloadFileSizeMismatch, then up to
NGC_CLI_DOWNLOAD_RETRIES more tries). A lying or broken server could fill the disk before either noticed.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path


class Oversized(Exception):
    """More bytes arrived than the registry announced."""


class CappedFile:
    """A writable file that refuses to grow past `limit` bytes (None: no limit); `on_oversized` is called
    before Oversized is raised (for a caller whose client swallows the exception, as ngcsdk's retries do)."""

    def __init__(self, fh, limit: int | None, on_oversized: Callable[[], None] | None = None):
        self._fh, self._limit, self._on_oversized = fh, limit, on_oversized

    def write(self, data: bytes) -> int:
        if self._limit is not None and self._fh.tell() + len(data) > self._limit:
            if self._on_oversized is not None:
                self._on_oversized()
            raise Oversized
        return self._fh.write(data)

    def __enter__(self) -> CappedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._fh.close()

    def __getattr__(self, name: str):
        return getattr(self._fh, name)


# ngcsdk writes every file through the builtin `open` looked up in its own module: `_enqueue_ranged_tasks`
# ("wb", truncate(size)) and `request_s3_download` ("r+b", seek(range_start), write per chunk). While a
# pull runs, that name is a wrapper that caps the files the pull registered; any other file opens as usual.
_lock = threading.Lock()
_limits: dict[str, int] = {}  # normalized absolute path → announced size
_oversized: set[str] = set()
_pulls = 0


def _key(path: str | os.PathLike) -> str:
    return os.path.normpath(os.path.abspath(os.fspath(path)))  # as ngcsdk builds its paths


def _open(file, mode="r", *args, **kwargs):
    fh = builtins.open(file, mode, *args, **kwargs)  # noqa: SIM115 (stands in for open: ngcsdk closes it)
    key = _key(file) if isinstance(file, str | os.PathLike) else None
    limit = _limits.get(key) if key is not None else None
    return fh if limit is None else CappedFile(fh, limit, lambda: _oversized.add(key))


@contextlib.contextmanager
def ngcsdk_capped(limits: dict[Path, int]) -> Iterator[set[Path]]:
    """While it runs, ngcsdk's writes to each file of `limits` stop at its announced size. Yields a set that,
    once the block ends, holds the files that tried to grow past it (ngcsdk swallows Oversized: it retries
    the range, then reports the download failed)."""
    from ngcbase.transfer import async_download

    global _pulls
    keys = {_key(p): p for p in limits}
    with _lock:
        _limits.update({_key(p): size for p, size in limits.items()})
        _pulls += 1
        async_download.open = _open  # module global: shadows the builtin for ngcsdk's download code only
    hit: set[Path] = set()
    try:
        yield hit
    finally:
        with _lock:
            hit.update(p for k, p in keys.items() if k in _oversized)
            for k in keys:
                _limits.pop(k, None)
                _oversized.discard(k)
            _pulls -= 1
            if _pulls == 0:
                del async_download.open
