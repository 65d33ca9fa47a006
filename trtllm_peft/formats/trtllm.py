"""TensorRT-LLM's adapter files: `model.lora_weights.npy` `[1, N, W]` + `model.lora_config.npy` `[1, N, 3|4]`.

Row layout in lora/pack.py; writing in trtllm_writer.py, raw `.bin` files (no shape, no dtype) in
trtllm_raw.py. The files record neither the model's dimensions nor (for raw `.bin`) shapes and
dtype, so reading them needs the engine's `ModelSpec`. B is stored already multiplied by the scale: an
adapter read back has scale 1. bfloat16 weights are stored as numpy void `|V2`, as TensorRT-LLM's
`torch_to_numpy` writes them; we write them the same way so TensorRT-LLM's own tools read our files.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from trtllm_peft.errors import AdapterFormatError
from trtllm_peft.formats.safe_io import check_not_lfs_pointer
from trtllm_peft.formats.trtllm_raw import read_raw
from trtllm_peft.lora import LoraAdapter, ModelSpec, fit_to_spec, unpack
from trtllm_peft.lora.modules import MODULE_IDS
from trtllm_peft.lora.pack import row_size
from trtllm_peft.lora.spec import dtype_name

WEIGHTS_FILE = "model.lora_weights.npy"
CONFIG_FILE = "model.lora_config.npy"
# Readable names, first found wins; model.lora_keys.npy is the Triton client's legacy name for the config.
CONFIG_NAMES = ("model.lora_config.npy", "model.lora_keys.npy", "model.lora_config.bin")
WEIGHTS_NAMES = ("model.lora_weights.npy", "model.lora_weights.bin")

NPY_HEADER_MAX = 1 << 16  # a .npy header is at most a few hundred bytes (format 2.0 allows up to 4 GB)
NP_BFLOAT16 = np.dtype("V2")  # TensorRT-LLM's np_bfloat16 (its metadata is not saved in .npy files anyway)
TORCH_TO_NP = {
    torch.float16: np.dtype(np.float16),
    torch.float32: np.dtype(np.float32),
    torch.bfloat16: NP_BFLOAT16,
}


def _find(path: Path, names: tuple[str, ...]) -> Path | None:
    return next((path / n for n in names if (path / n).is_file()), None)


def detect(path: Path) -> bool:
    """A directory holding a lora config (or lora_keys) file and a lora weights file, .npy or raw .bin."""
    return _find(path, CONFIG_NAMES) is not None and _find(path, WEIGHTS_NAMES) is not None


def load(path: Path, spec: ModelSpec | None) -> LoraAdapter:
    """Read the two files into a `LoraAdapter` (format "trtllm", scale 1) with the dimensions of `spec`."""
    if spec is None:
        raise AdapterFormatError(
            path,
            "TensorRT-LLM adapter files do not record the model's dimensions: give the base model or "
            "engine (--base) to read them",
        )
    cfg_file, w_file = _find(path, CONFIG_NAMES), _find(path, WEIGHTS_NAMES)
    if cfg_file is None or w_file is None:
        want = (
            "model.lora_config.npy (or model.lora_keys.npy)" if cfg_file is None else "model.lora_weights.npy"
        )
        raise AdapterFormatError(path, f"missing {want}")
    notes: list[str] = []
    rows, width = max_rows(spec), max_row_width(spec)
    if cfg_file.suffix == ".bin":  # a .npy's header is checked instead, more precisely (_read_npy)
        _check_raw_size(cfg_file, rows * 4 * 4, f"{rows} rows of 4 int32")
    if w_file.suffix == ".bin":
        _check_raw_size(w_file, rows * width * 4, f"{rows} rows of {width} float32")
    config = _config_array(_read_npy(cfg_file, rows, 16), cfg_file) if cfg_file.suffix == ".npy" else None
    weights = _weights_tensor(_read_npy(w_file, rows, width), w_file) if w_file.suffix == ".npy" else None
    if any(x is not None and x.ndim == 2 for x in (config, weights)):
        notes.append(
            "2-D arrays without the leading batch dimension of 1 (TensorRT-LLM's tools write [1, N, …])"
        )
    if config is None or weights is None:
        config, weights, note = read_raw(cfg_file, w_file, config, weights, spec)
        notes.append(note)
    _check_bin_twins(path, {cfg_file: config, w_file: weights})
    adapter = unpack(weights, torch.from_numpy(config), spec, source=str(path))
    if len(adapter) == 0:
        raise AdapterFormatError(path, "the files hold no rows")
    meta = {
        "files": [cfg_file.name, w_file.name],
        "dtype": dtype_name(weights.dtype),
        "config_columns": int(config.shape[-1]),
        "notes": notes,
    }
    return adapter.with_weights(adapter.weights, meta=meta)


def _check_bin_twins(path: Path, read: dict[Path, np.ndarray | torch.Tensor]) -> None:
    """A raw .bin beside the .npy that was read must hold the same bytes: if not, which one is meant?"""
    stale = []
    for npy, array in read.items():
        twin = npy.with_suffix(".bin")
        if npy.suffix != ".npy" or not twin.is_file():
            continue
        data = array.contiguous().view(torch.uint8).numpy() if isinstance(array, torch.Tensor) else array
        if twin.stat().st_size != data.nbytes or twin.read_bytes() != np.ascontiguousarray(data).tobytes():
            stale.append(f"{npy.name} and {twin.name} disagree; delete the stale one")
    if stale:
        raise AdapterFormatError(path, stale)


def save(adapter: LoraAdapter, out: Path, spec: ModelSpec) -> list[Path]:
    """Fit `adapter` to the engine `spec` (fused modules split, every problem raised) and write it in its dtype."""
    from trtllm_peft.formats.trtllm_writer import write_npy

    return write_npy(fit_to_spec(adapter, spec), out, spec.dtype)


def convert(src: Path, out: Path, dtype: str, *, expect: str) -> LoraAdapter:
    """Converter scripts' work: read the HF or NeMo adapter at `src`, fold its scale, write `out`.

    `src` may be a directory, or for NeMo the `.nemo` file itself. Returns the adapter that was read.
    """
    from trtllm_peft import formats
    from trtllm_peft.formats.trtllm_writer import write_npy

    src = Path(src)
    if expect == "nemo" and src.is_file():
        from trtllm_peft.formats import nemo

        adapter = nemo.load(src, None)
    else:
        found = formats.detect(src)
        if found != expect:
            names = {
                "hf": "a Hugging Face PEFT adapter",
                "nemo": "a NeMo adapter",
                "trtllm": "TensorRT-LLM files",
            }
            raise AdapterFormatError(src, f"is {names[found]}, not {names[expect]}")
        adapter = formats.load(src, None)
    write_npy(adapter, out, dtype)
    return adapter


def describe(adapter: LoraAdapter, out: Path, dtype: str, *, verbose: bool = False) -> str:
    """What a converter wrote, in one line (and one more per module when `verbose`)."""
    width = max(row_size(w) for _, w in adapter)
    ranks = sorted({w.rank for _, w in adapter})
    rank = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
    lines = [
        f"{out}: {WEIGHTS_FILE} [1, {len(adapter)}, {width}] {dtype_name(dtype)} + {CONFIG_FILE} "
        f"[1, {len(adapter)}, 4]: {len(adapter.layers)} layers, {len(adapter.modules)} modules, {rank}"
    ]
    if verbose:
        for module in sorted(adapter.modules, key=lambda m: MODULE_IDS[m]):
            ws = [(layer, w) for (layer, m), w in adapter if m == module]
            scales = sorted({w.scale for _, w in ws})
            lines.append(
                f"  {module} (id {MODULE_IDS[module]}): {len(ws)} layers, ranks {sorted({w.rank for _, w in ws})}, "
                f"scale {', '.join(f'{x:g}' for x in scales)} folded into B"
            )
    return "\n".join(lines)


def max_rows(spec: ModelSpec) -> int:
    """Most rows an adapter of `spec` has: one per (layer, module)."""
    return spec.num_layers * len(MODULE_IDS)


def max_row_width(spec: ModelSpec) -> int:
    """Widest row an adapter of `spec` needs: max_lora_rank x (in + out) of its widest module, + out for a
    DoRA magnitude (LoraModule::flattenedInOutSize(adapterSize, isDora))."""
    widths = []
    for module in MODULE_IDS:
        try:
            d_in, d_out = spec.module_dims(module)
        except KeyError:  # a module id this architecture does not have
            continue
        widths.append(max(spec.max_lora_rank, 1) * (d_in + d_out) + d_out)
    return max(widths)


def _check_raw_size(path: Path, most: int, what: str) -> None:
    """Refuse a file larger than the engine's largest adapter (checked before a byte of it is read)."""
    size = path.stat().st_size
    if size > most + NPY_HEADER_MAX:
        raise AdapterFormatError(
            path, f"{size} bytes is more than any adapter of this engine holds ({what}: {most} bytes)"
        )


def _read_npy(path: Path, rows: int, width: int) -> np.ndarray:
    """np.load(allow_pickle=False), after checking the header so that every failure says what is wrong and
    that the array is no larger than `rows` x `width` (the engine's largest adapter)."""
    check_not_lfs_pointer(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
        except ValueError:
            raise AdapterFormatError(path, "not a .npy file (no numpy header)") from None
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version in readers:
            try:
                shape, _, dtype = readers[version](f)
            except ValueError as e:
                raise AdapterFormatError(path, f"corrupt .npy header ({e})") from None
            if dtype.hasobject:
                raise AdapterFormatError(path, "refused: holds Python objects (a pickle), not numbers")
            if problem := _shape_problem(shape, rows, width):
                raise AdapterFormatError(path, problem)
            need = math.prod(shape) * dtype.itemsize
            if size - f.tell() < need:
                raise AdapterFormatError(
                    path,
                    f"truncated .npy file: {list(shape)} {dtype} needs {need} bytes of data, has {size - f.tell()}",
                )
    try:
        return np.load(path, allow_pickle=False)  # reads only the checked [N, W] (not mapped: safe_io.py)
    except (ValueError, OSError, EOFError) as e:
        raise AdapterFormatError(path, f"unreadable .npy file ({type(e).__name__})") from None


def _shape_problem(shape: tuple[int, ...], rows: int, width: int) -> str | None:
    """Why an array of `shape` ([1, N, W] or [N, W]) cannot be this engine's adapter rows, or None."""
    if len(shape) not in (2, 3) or (len(shape) == 3 and shape[0] > 8):  # batch != 1: refused later, precisely
        values = math.prod(shape)
        if values <= rows * width:
            return None
        return f"shape {list(shape)} holds {values} values, more than this engine's largest adapter"
    if shape[-1] > width:
        return (
            f"rows of {shape[-1]} values are wider than any this engine takes ({width}: max_lora_rank x "
            "(in + out) (+ out for DoRA) of its widest module)"
        )
    if shape[-2] > rows:
        return f"{shape[-2]} rows, more than this engine's adapters have ({rows}: one per layer and module)"
    return None


def _config_array(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.dtype.kind != "i" or arr.dtype.itemsize != 4:
        raise AdapterFormatError(
            path, f"lora_config must be int32 (TensorRT-LLM takes nothing else), got {arr.dtype}"
        )
    if arr.ndim not in (2, 3) or arr.shape[-1] not in (3, 4):
        raise AdapterFormatError(
            path, f"lora_config must be [1, N, 3|4] (or [N, 3|4]), got {list(arr.shape)}"
        )
    return np.ascontiguousarray(arr, dtype=np.int32)  # native byte order


def _weights_tensor(arr: np.ndarray, path: Path) -> torch.Tensor:
    """float16 / float32 as they are; bfloat16 stored as void `|V2` or (u)int16 is reinterpreted, not converted."""
    kind, size = arr.dtype.kind, arr.dtype.itemsize
    if kind == "f" and size in (2, 4):
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("=")))
    if size == 2 and (kind in "iu" or (kind == "V" and arr.dtype.fields is None)):
        native = arr.dtype if kind == "V" else arr.dtype.newbyteorder("=")
        bits = np.ascontiguousarray(arr, dtype=native).view(np.int16)  # [.., W] bfloat16 bit patterns
        return torch.from_numpy(bits).view(torch.bfloat16)
    raise AdapterFormatError(
        path,
        f"lora_weights dtype {arr.dtype} is not one TensorRT-LLM uses (float16, float32, bfloat16 as |V2)",
    )
