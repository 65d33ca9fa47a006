"""Atomic placement: a pull writes into a hidden directory beside the adapters and renames it into place.

The catalog ignores hidden directories, and a rename within one filesystem is atomic, so the refresh loop
of a running server sees either no adapter or a complete, checked one, never half of one. The staging
directory's name depends only on the adapter name and the source spec, so running an interrupted pull
again finds its partial files and resumes. A lock (flock on the directory itself: no lock file to leave
behind) keeps two processes from writing one staging directory at once.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import shutil
import uuid
from pathlib import Path

from trtllm_peft.pull.errors import PullError
from trtllm_peft.pull.source import PullRequest

log = logging.getLogger(__name__)

STAGING_PREFIX = ".pull-"


def check_free(root: Path, name: str, force: bool) -> None:
    """Refuse early (before any download) when NAME is taken and --force was not given."""
    target = root / name
    if not force and os.path.lexists(target) and not _is_empty_dir(target):
        raise PullError(
            "exists", f"{target} exists: pass --force to replace it, or --name to pick another name"
        )


class Staging:
    """`with Staging(root, request) as stage:` download into `stage.dir`, then `stage.commit(adapter_dir)`.

    Leaving the block by a retryable error, Ctrl-C or a crash keeps the directory for the next run (if it
    holds any bytes); any other PullError deletes it.
    """

    def __init__(self, root: Path, request: PullRequest, *, force: bool = False):
        self.root, self.request, self.force = root, request, force
        self.dir = root / f"{STAGING_PREFIX}{request.name}-{request.source.key}"
        self.committed: Path | None = None
        self._fd: int | None = None

    def __enter__(self) -> Staging:
        self.root.mkdir(parents=True, exist_ok=True)
        resumed = self.dir.is_dir()
        self.dir.mkdir(exist_ok=True)
        self._fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = None
            raise PullError("busy", f"another pull is writing {self.dir}; wait for it to finish") from None
        if resumed:
            log.info("resuming %s from %s", self.request.source.text, self.dir)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            useless = isinstance(exc, PullError) and not exc.retryable
            empty = self.dir.is_dir() and not any(p.is_file() for p in self.dir.rglob("*"))
            if self.committed is None and (useless or empty):  # nothing a rerun could resume from
                shutil.rmtree(self.dir, ignore_errors=True)
        finally:
            if self._fd is not None:
                os.close(self._fd)  # releases the lock

    def commit(self, adapter_dir: Path) -> Path:
        """Move `adapter_dir` (the staging directory or a directory inside it) to NIM_PEFT_SOURCE/NAME."""
        target = self.root / self.request.name
        if os.path.lexists(target):
            if not (self.force or _is_empty_dir(target)):
                raise PullError("exists", f"{target} appeared while pulling: pass --force to replace it")
            _replace(adapter_dir, target)
        else:
            try:
                os.rename(adapter_dir, target)
            except OSError as e:  # created meanwhile by someone else (non-empty: ENOTEMPTY / EEXIST)
                raise PullError("exists", f"{target} appeared while pulling: {e.strerror}") from None
        self.committed = target
        if self.dir.exists():  # NGC: what is left around the adapter directory
            shutil.rmtree(self.dir, ignore_errors=True)
        return target


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def _replace(new: Path, target: Path) -> None:
    """Put `new` at `target`, which exists. Where the kernel can (Linux renameat2 RENAME_EXCHANGE) the two
    are swapped in one step, so the name never disappears for a concurrent scan; elsewhere the old one is
    renamed away first."""
    if _exchange(new, target):
        shutil.rmtree(new) if new.is_dir() and not new.is_symlink() else new.unlink()
        return
    old = target.parent / f"{STAGING_PREFIX}old-{target.name}-{uuid.uuid4().hex[:8]}"
    os.rename(target, old)
    os.rename(new, target)
    shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()


def _exchange(a: Path, b: Path) -> bool:
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False  # this filesystem or kernel cannot exchange: fall back
    raise OSError(err, os.strerror(err), str(b))


def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
