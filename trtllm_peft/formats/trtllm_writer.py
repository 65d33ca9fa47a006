"""Writing TensorRT-LLM's adapter files, `model.lora_weights.npy` `[1, N, W]` + `model.lora_config.npy` `[1, N, 4]`.

Streamed from the adapter's own tensors, byte for byte what `np.save` of `lora.pack` writes (formats/trtllm.py
reads them back; TensorRT-LLM's own tools read them too).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from trtllm_peft.errors import AdapterFormatError
from trtllm_peft.formats.trtllm import CONFIG_FILE, TORCH_TO_NP, WEIGHTS_FILE
from trtllm_peft.lora import LoraAdapter, LoraWeights
from trtllm_peft.lora.pack import check_normalized, config_rows, row_order, row_size, write_scaled_b
from trtllm_peft.lora.spec import DTYPES, dtype_name


def write_npy(adapter: LoraAdapter, out: Path, dtype: str | torch.dtype) -> list[Path]:
    """Write model.lora_weights.npy `[1, N, W]` and model.lora_config.npy `[1, N, 4]` int32 into `out`.

    The bytes are exactly those of `np.save` of `lora.pack(adapter, dtype)` with a batch dimension, but the
    rows are streamed to the file from the adapter's own tensors (often memory-mapped safetensors): no
    `[N, W]` copy in memory, and the zero padding is left as a hole in the file (it reads back as zeros).
    Each file is written under a temporary name and renamed, so a reader never sees half a file.
    """
    dt = DTYPES[dtype_name(dtype)]
    _check_shapes(adapter)
    items = row_order(adapter)
    check_normalized(items, adapter.source)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights_path, config_path = out / WEIGHTS_FILE, out / CONFIG_FILE
    with _replacing(weights_path) as f:
        _stream_rows(f, items, dt)
    with _replacing(config_path) as f:
        np.save(f, config_rows(items).numpy()[None], allow_pickle=False)  # [1, N, 4]
    return [weights_path, config_path]


def _check_shapes(adapter: LoraAdapter) -> None:
    """Without an engine spec, at least refuse what cannot be laid out as rows."""
    problems = []
    for (layer, module), w in adapter:
        if w.a.ndim != 2 or w.b.ndim != 2 or w.rank == 0 or w.a.shape[0] != w.b.shape[1]:
            problems.append(
                f"layer {layer} {module}: A {list(w.a.shape)} and B {list(w.b.shape)} are not "
                "[r, in] and [out, r] with one rank r > 0"
            )
    if not len(adapter):
        problems.append("adapter has no LoRA weights")
    if problems:
        raise AdapterFormatError(adapter.source or "adapter", problems)


class _replacing:
    """Write `path.tmp`, then move it to `path`; on failure remove it. No reader sees a half-written file.

    An existing `path` is removed before the rename rather than renamed over: ext4 (auto_da_alloc) flushes
    the new file to disk when it replaces another by rename, which made re-converting ~5x slower.
    """

    def __init__(self, path: Path):
        self.path, self.tmp = path, path.with_name(path.name + ".tmp")

    def __enter__(self):
        self.f = open(self.tmp, "wb")  # noqa: SIM115 (closed in __exit__)
        return self.f

    def __exit__(self, exc_type, *_):
        self.f.close()
        if exc_type is None:
            self.path.unlink(missing_ok=True)
            os.rename(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def _stream_rows(f, items: list[tuple[tuple[int, str], LoraWeights]], dt: torch.dtype) -> None:
    """The .npy header of `[1, N, W]` then each row: A, B·scale, a DoRA row's magnitude, a seek over the padding."""
    width = max((row_size(w) for _, w in items), default=0)
    itemsize = torch.empty((), dtype=dt).element_size()
    header = {
        "descr": np.lib.format.dtype_to_descr(TORCH_TO_NP[dt]),
        "fortran_order": False,
        "shape": (1, len(items), width),
    }
    np.lib.format.write_array_header_1_0(f, header)  # what np.save writes for this array
    start = f.tell()
    scratch = torch.empty(max((max(w.a.numel(), w.b.numel()) for _, w in items), default=0), dtype=dt)
    for i, (_, w) in enumerate(items):
        a = w.a
        if a.dtype != dt or not a.is_contiguous():
            a = scratch[: a.numel()].view(a.shape).copy_(a)
        f.write(_raw(a))
        b = w.b
        if w.scale != 1.0 or b.dtype != dt or not b.is_contiguous():
            b = scratch[: b.numel()].view(b.shape)
            write_scaled_b(w, b)
        f.write(_raw(b))
        if w.is_dora:
            f.write(_raw(scratch[: w.out_features].copy_(w.magnitude.reshape(-1))))
        f.seek(start + (i + 1) * width * itemsize)  # padding: a hole, reads back as zeros
    f.truncate(start + len(items) * width * itemsize)


def _raw(t: torch.Tensor) -> np.ndarray:
    """The bytes of a contiguous tensor, without a copy."""
    return t.reshape(-1).view(torch.uint8).numpy()
