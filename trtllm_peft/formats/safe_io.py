"""Reading untrusted weight files: safetensors, weights-only pickles, tar archives. Never runs their code.

Every failure becomes an AdapterFormatError that says what is wrong with which file, in words a user can
act on (a Git-LFS pointer, a truncated file, a pickle that wants to run code).
"""

from __future__ import annotations

import io
import json
import pickle
import re
import struct
import tarfile
import zipfile
from pathlib import Path

import torch

from trtllm_peft.errors import AdapterFormatError

LFS_MAGIC = b"version https://git-lfs"
MAX_HEADER = 100_000_000  # the safetensors reference reader refuses larger headers


def check_not_lfs_pointer(path: Path) -> None:
    """Raise if `path` is a Git-LFS pointer (a clone without `git lfs pull`) instead of the data."""
    with open(path, "rb") as f:
        head = f.read(len(LFS_MAGIC))
    if head == LFS_MAGIC:
        raise AdapterFormatError(
            path, "is a Git-LFS pointer file, not the weights: run `git lfs pull` in that repository"
        )


def safetensors_header(path: Path) -> dict:
    """Parse and check a safetensors header: size, JSON, offsets inside the file. Cheap: reads the header only."""
    check_not_lfs_pointer(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise AdapterFormatError(path, f"truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER or 8 + n > size:
            raise AdapterFormatError(
                path, f"corrupt or truncated safetensors file (header of {n} bytes, file of {size})"
            )
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise AdapterFormatError(path, "corrupt safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise AdapterFormatError(path, "corrupt safetensors file (header is not an object)")
    data_len = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and 0 <= offsets[0] <= offsets[1]):
            raise AdapterFormatError(path, f"corrupt safetensors file (bad entry for {name!r})")
        if offsets[1] > data_len:
            raise AdapterFormatError(
                path, f"truncated safetensors file: {name!r} ends past the end of the file"
            )
    return header


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, after checking its header."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    safetensors_header(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterFormatError(path, f"unreadable safetensors file ({e})") from None


def torch_load(path: Path) -> dict[str, torch.Tensor]:
    """A torch.save()d dict of tensors, loaded with weights_only=True: a pickle that would run code is refused."""
    check_not_lfs_pointer(path)
    return _torch_load(str(path), path)


def torch_load_bytes(data: bytes, source: str | Path) -> dict[str, torch.Tensor]:
    """`torch_load` of bytes already in memory (a tar member), with the same refusals; `source` names it."""
    if data.startswith(LFS_MAGIC):
        raise AdapterFormatError(source, "is a Git-LFS pointer file, not the weights: run `git lfs pull`")
    return _torch_load(io.BytesIO(data), source)


def _torch_load(f: str | io.BytesIO, path: str | Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(f, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as e:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # torch colours its message for terminals
        reason = text.splitlines()[0] if text else "disallowed content"
        raise AdapterFormatError(
            path,
            f"refused: the pickle holds more than tensors and would run code when loaded ({reason}); "
            "convert it to safetensors in a trusted environment",
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, struct.error) as e:
        raise AdapterFormatError(path, f"corrupt or truncated checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise AdapterFormatError(path, f"expected a dict of tensors, found {type(obj).__name__}")
    return obj


def open_tar(path: Path) -> tarfile.TarFile:
    """Open a tar archive, plain or gzip (NeMo < 1.7 compressed .nemo files)."""
    check_not_lfs_pointer(path)
    try:
        return tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise AdapterFormatError(path, f"not a readable tar archive ({e})") from None


def tar_member(tar: tarfile.TarFile, name: str) -> tarfile.TarInfo | None:
    """Find `name` or `./name`; only regular files count (no links, no absolute or `..` paths)."""
    for candidate in (name, f"./{name}"):
        try:
            info = tar.getmember(candidate)
        except KeyError:
            continue
        if info.isfile() and not Path(info.name).is_absolute() and ".." not in Path(info.name).parts:
            return info
    return None
