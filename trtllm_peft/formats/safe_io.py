"""Reading untrusted weight files: safetensors, weights-only pickles, tar archives. Never runs their code.

Every failure becomes an AdapterFormatError that says what is wrong with which file, in words a user can
act on (a Git-LFS pointer, a truncated file, a pickle that wants to run code). Nothing is read blindly:
sizes are checked against limits.ReadLimits first (from the headers), tar archives are indexed with a bound
on members and declared bytes (a gzip bomb is refused from its headers) and members are streamed with a
limit. Error texts never quote the files' bytes.

Tensors are deliberately not left memory-mapped: a tensor backed by a mapping of a file that is truncated
or rewritten in place (a user replacing an adapter) kills the whole server with SIGBUS on its next read
(measured: safetensors' safe_open().get_tensor() then os.truncate() -> "Bus error"). The bounded bytes are
read into memory instead, and parsed by the formats' own libraries.
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
from trtllm_peft.formats.limits import ReadLimits

LFS_MAGIC = b"version https://git-lfs"
MAX_HEADER = 16 << 20  # ~100 bytes per tensor: 160k tensors (the safetensors reader's own cap is 100 MB)
MAX_TAR_MEMBERS = 4096  # a .nemo of TP 8 x PP 64 holds 513 members
CHUNK = 1 << 20


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
        if n > MAX_HEADER or 8 + n > size:  # n itself is not shown: it is the file's first 8 bytes
            raise AdapterFormatError(
                path,
                f"corrupt or truncated safetensors file (its header length is more than the {size}-byte "
                f"file holds, or more than {MAX_HEADER} bytes)",
            )
        try:
            header = json.loads(f.read(n))
        except RecursionError:
            raise AdapterFormatError(path, "corrupt safetensors file (header nested too deeply)") from None
        except ValueError:
            raise AdapterFormatError(path, "corrupt safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise AdapterFormatError(path, "corrupt safetensors file (header is not an object)")
    data_len = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        ok = isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
        if not (ok and 0 <= offsets[0] <= offsets[1] and isinstance(info.get("shape"), list)):
            raise AdapterFormatError(path, f"corrupt safetensors file (bad entry for {name!r})")
        if offsets[1] > data_len:
            raise AdapterFormatError(
                path, f"truncated safetensors file: {name!r} ends past the end of the file"
            )
    return header


def read_safetensors(path: Path, limits: ReadLimits | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, after checking its size and header (every tensor's shape against
    `limits`); read into memory (not mapped: see the module's doc) and parsed by safetensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_bytes

    limits = limits or ReadLimits.for_spec(None)
    limits.check_file(path)
    header = safetensors_header(path)
    too_big = [
        p
        for name, info in header.items()
        if name != "__metadata__" and (p := limits.tensor_problem(repr(name), info["shape"]))
    ]
    if too_big:
        raise AdapterFormatError(
            path, too_big[:8] + ([f"… {len(too_big) - 8} more"] if len(too_big) > 8 else [])
        )
    try:
        return dict(sorted(load_bytes(path.read_bytes()).items()))  # safe_open().keys() order, as before
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterFormatError(path, f"unreadable safetensors file ({type(e).__name__}: {e})") from None


def torch_load(path: Path, limits: ReadLimits | None = None) -> dict[str, torch.Tensor]:
    """A torch.save()d dict of tensors, loaded with weights_only=True (a pickle that would run code is
    refused), after checking the file's size against `limits`."""
    check_not_lfs_pointer(path)
    (limits or ReadLimits.for_spec(None)).check_file(path)
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
    except RecursionError:
        raise AdapterFormatError(path, "corrupt checkpoint (its pickle is nested too deeply)") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, struct.error) as e:
        raise AdapterFormatError(path, f"corrupt or truncated checkpoint ({type(e).__name__})") from None
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


def tar_index(tar: tarfile.TarFile, path: Path, limits: ReadLimits) -> dict[str, tarfile.TarInfo]:
    """{name: member} from the members' headers, with `./` stripped; only regular files count (no links, no
    absolute or `..` paths). Refused past MAX_TAR_MEMBERS members or when the members' declared sizes add up
    to more than any adapter of this engine: a gzip bomb costs its headers, not its decompressed size."""
    total = 0  # members seen by an earlier call were checked then (tar.members: the headers read so far)
    while (info := tar.next()) is not None:
        if len(tar.members) > MAX_TAR_MEMBERS:
            raise AdapterFormatError(
                path, f"archive holds more than {MAX_TAR_MEMBERS} members: not an adapter"
            )
        total += max(info.size, 0)
        limits.check_file(path, total, "archive whose members hold")
    index: dict[str, tarfile.TarInfo] = {}
    for info in tar.members:
        if info.isfile() and not Path(info.name).is_absolute() and ".." not in Path(info.name).parts:
            index.setdefault(info.name.removeprefix("./"), info)
    return index


def tar_member(tar: tarfile.TarFile, name: str) -> tarfile.TarInfo | None:
    """The regular-file member `name` (or `./name`), found by a bounded tar_index; None when absent."""
    return tar_index(tar, Path(tar.name or "archive"), ReadLimits.for_spec(None)).get(name)


def read_member(tar: tarfile.TarFile, info: tarfile.TarInfo, limit: int) -> bytes:
    """A member's bytes, streamed in chunks and never more than `limit` (whatever its header says)."""
    f = tar.extractfile(info)
    out, got = [], 0
    while chunk := f.read(min(CHUNK, limit + 1 - got)):
        got += len(chunk)
        if got > limit:
            raise AdapterFormatError(info.name, f"archive member larger than {limit} bytes")
        out.append(chunk)
    return b"".join(out)
