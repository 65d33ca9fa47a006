"""Raw TensorRT-LLM adapter `.bin` files (`model.lora_config.bin`, `model.lora_weights.bin`): bytes only.

`tofile()` writes no shape and no dtype, so a reading is inferred: the one (config columns, weights dtype)
whose rows are all valid for the engine's `ModelSpec`; none or several fitting readings are refused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from trtllm_peft.errors import AdapterFormatError
from trtllm_peft.formats.safe_io import check_not_lfs_pointer
from trtllm_peft.lora import ModelSpec
from trtllm_peft.lora.modules import MODULE_NAMES
from trtllm_peft.lora.spec import dtype_name

# How tofile() stores each weights dtype on x86 and ARM: little-endian; bfloat16 as its 16-bit patterns.
_STORED = {torch.float16: np.dtype("<f2"), torch.float32: np.dtype("<f4"), torch.bfloat16: np.dtype("<i2")}


def read_raw(
    cfg_file: Path, w_file: Path, config: np.ndarray | None, weights: torch.Tensor | None, spec: ModelSpec
) -> tuple[np.ndarray, torch.Tensor, str]:
    """Find the one reading of raw .bin files that fits `spec`; refuse, listing them, when none or several do.

    A config .bin is int32 with 3 or 4 columns; a weights .bin is float16, bfloat16 or float32. A reading fits
    when every config row is valid for the engine (known module, layer in range, rank > 0, is_dora 0|1) and the
    weights are exactly N rows of the longest row (how every TensorRT-LLM writer pads). A 2-byte weights file
    for a 2-byte engine is read in the engine's dtype: TensorRT-LLM takes weights in no other.
    """
    cfg_options = (
        [(config.shape[-1], config.reshape(-1, config.shape[-1]), "")]
        if config is not None
        else _raw_configs(cfg_file)
    )
    dtypes = [weights.dtype] if weights is not None else [torch.float16, torch.bfloat16, torch.float32]
    n_bytes = None if weights is not None else _raw_size(w_file)
    fits, misses = [], []
    for cols, rows, why in cfg_options:
        for dt in dtypes:
            label = f"{cols}-column config with {dtype_name(dt)} weights"
            why_not = why or _raw_misfit(rows, dt, spec, weights, n_bytes)
            (misses if why_not else fits).append((label, why_not, rows, dt))
    where = cfg_file.parent
    if len(fits) > 1:
        raise AdapterFormatError(
            where,
            f"raw .bin files carry no shape or dtype, and {len(fits)} readings fit this "
            f"engine: {'; '.join(f[0] for f in fits)}; write them as .npy, which records both",
        )
    if not fits:
        raise AdapterFormatError(
            where,
            ["raw .bin files carry no shape or dtype, and no reading fits this engine"]
            + [f"{label}: {why}" for label, why, _, _ in misses],
        )
    label, _, rows, dt = fits[0]
    if weights is None:
        weights = _raw_weights(w_file, dt, rows.shape[0])
    return rows, weights, f"raw .bin read as {label} (the only reading that fits the engine)"


def _raw_size(path: Path) -> int:
    check_not_lfs_pointer(path)
    return path.stat().st_size


def _raw_configs(path: Path) -> list[tuple[int, np.ndarray | None, str]]:
    size = _raw_size(path)
    if size == 0 or size % 4:
        raise AdapterFormatError(
            path, f"a raw lora config is int32 values; {size} bytes is not a whole number of them"
        )
    values = np.fromfile(path, dtype="<i4").astype(np.int32)
    out = []
    for cols in (3, 4):
        if len(values) % cols:
            out.append((cols, None, f"{len(values)} int32 values do not make rows of {cols}"))
        else:
            out.append((cols, values.reshape(-1, cols), ""))
    return out


def _raw_misfit(
    rows: np.ndarray, dt: torch.dtype, spec: ModelSpec, weights: torch.Tensor | None, n_bytes: int | None
) -> str:
    """Why this reading does not fit (empty when it does)."""
    need = []
    for i, row in enumerate(rows.tolist()):
        module_id, layer, rank = row[:3]
        is_dora = row[3] if len(row) > 3 else 0
        try:
            d_in, d_out = spec.module_dims(MODULE_NAMES[module_id])
        except KeyError:
            return f"row {i}: module id {module_id} is not a module of a {spec.architecture}"
        if not (0 <= layer < spec.num_layers) or rank <= 0 or is_dora not in (0, 1):
            return f"row {i}: [{', '.join(map(str, row))}] is not [module, layer < {spec.num_layers}, rank > 0, 0|1]"
        need.append(rank * (d_in + d_out) + (d_out if is_dora else 0))
    if not need:
        return "no rows"
    width = max(need)
    if weights is not None:
        if weights.shape[-2] != len(need) or weights.shape[-1] < width:
            return f"weights {list(weights.shape)} do not hold {len(need)} rows of {width} values"
        return ""
    size = torch.empty((), dtype=dt).element_size()
    if n_bytes != len(need) * width * size:
        return f"weights file has {n_bytes} bytes, not {len(need)} rows x {width} values x {size} bytes"
    engine = spec.torch_dtype
    if size == 2 and engine.itemsize == 2 and dt != engine:
        return f"the engine is {spec.dtype}, and TensorRT-LLM takes weights in the engine's dtype only"
    return ""


def _raw_weights(path: Path, dt: torch.dtype, n_rows: int) -> torch.Tensor:
    """The weights .bin as `[N, W]` of `dt` (files are little-endian, as tofile() writes them on x86 and ARM)."""
    stored = _STORED[dt]
    data = np.fromfile(path, dtype=stored).astype(stored.newbyteorder("="), copy=False).reshape(n_rows, -1)
    return torch.from_numpy(data).view(torch.bfloat16) if dt == torch.bfloat16 else torch.from_numpy(data)
