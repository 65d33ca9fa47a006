"""TensorRT-LLM's adapter files: `model.lora_weights.npy` `[1, N, W]` + `model.lora_config.npy` `[1, N, 3|4]`.

Row layout in lora/pack.py. The files record neither the model's dimensions nor (for raw `.bin`) shapes and
dtype, so reading them needs the engine's `ModelSpec`. B is stored already multiplied by the scale: an
adapter read back has scale 1. bfloat16 weights are stored as numpy void `|V2`, as TensorRT-LLM's
`torch_to_numpy` writes them; we write them the same way so TensorRT-LLM's own tools read our files.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from trtllm_peft.errors import AdapterFormatError
from trtllm_peft.formats.safe_io import check_not_lfs_pointer
from trtllm_peft.lora import LoraAdapter, LoraWeights, ModelSpec, fit_to_spec, unpack
from trtllm_peft.lora.modules import MODULE_IDS, MODULE_NAMES
from trtllm_peft.lora.pack import check_normalized, config_rows, row_order, row_size, write_scaled_b
from trtllm_peft.lora.spec import DTYPES, dtype_name

WEIGHTS_FILE = "model.lora_weights.npy"
CONFIG_FILE = "model.lora_config.npy"
# Readable names, first found wins; model.lora_keys.npy is the Triton client's legacy name for the config.
CONFIG_NAMES = ("model.lora_config.npy", "model.lora_keys.npy", "model.lora_config.bin")
WEIGHTS_NAMES = ("model.lora_weights.npy", "model.lora_weights.bin")

NPY_HEADER_MAX = 1 << 16  # a .npy header is at most a few hundred bytes (format 2.0 allows up to 4 GB)
NP_BFLOAT16 = np.dtype("V2")  # TensorRT-LLM's np_bfloat16 (its metadata is not saved in .npy files anyway)
_TORCH_TO_NP = {
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
        config, weights, note = _read_raw(cfg_file, w_file, config, weights, spec)
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
    return write_npy(fit_to_spec(adapter, spec), out, spec.dtype)


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


def convert(src: Path, out: Path, dtype: str, *, expect: str) -> LoraAdapter:
    """Converter scripts' work: read the HF or NeMo adapter at `src`, fold its scale, write `out`.

    `src` may be a directory, or for NeMo the `.nemo` file itself. Returns the adapter that was read.
    """
    from trtllm_peft import formats

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
        "descr": np.lib.format.dtype_to_descr(_TORCH_TO_NP[dt]),
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


# ---- raw .bin: bytes only, no shape, no dtype ------------------------------------------------------------


def _read_raw(
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
    stored = np.dtype("<i2") if dt == torch.bfloat16 else _TORCH_TO_NP[dt].newbyteorder("<")
    data = np.fromfile(path, dtype=stored).astype(stored.newbyteorder("="), copy=False).reshape(n_rows, -1)
    return torch.from_numpy(data).view(torch.bfloat16) if dt == torch.bfloat16 else torch.from_numpy(data)
