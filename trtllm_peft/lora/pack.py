"""Pack a `LoraAdapter` into TensorRT-LLM's runtime tensors, and unpack them back.

Row layout (LoraCache::copyToPages, cpp/tensorrt_llm/runtime/loraCache.cpp): row i holds A `[r, in]`
row-major, then B·scale `[out, r]` row-major, then for a DoRA row its magnitude `[out]` — already normalized,
m / ‖W + s·B·A‖_row (examples/dora/normalize_weights.py; the DoRA plugin only multiplies by it) — zero-padded
to W = the longest row of the adapter. `LoraModule::flattenedInOutSize(adapterSize, isDora)` counts the
magnitude (loraUtils.cpp `loraValidateRequestTensors`: "lora_weights has to few values"). Config row i is int32
`[module_id, layer, rank, is_dora]` (loraUtils.h kLORA_CONFIG_IS_DORA_OFF = 3; LoraModuleConfig reads is_dora
only from 4-column configs, loraUtils.cpp). Rows are ordered by layer, then
module id. The executor takes these 2-D; the `.npy` files add a leading batch dimension of 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trtllm_peft.errors import AdapterFormatError
from trtllm_peft.lora.adapter import Key, LoraAdapter, LoraWeights
from trtllm_peft.lora.modules import MODULE_IDS, MODULE_NAMES
from trtllm_peft.lora.spec import DTYPES, ModelSpec, dtype_name

CONFIG_COLUMNS = 4  # kLORA_CONFIG_ROW_SIZE; 3 (kLORA_CONFIG_PRE_DORA_ROW_SIZE) is read too


@dataclass(frozen=True)
class PackedLora:
    """TensorRT-LLM's `lora_weights` and `lora_config` for one adapter (2-D, CPU)."""

    weights: torch.Tensor  # [N, W] engine dtype
    config: torch.Tensor  # [N, 4] int32

    @property
    def num_rows(self) -> int:
        return int(self.config.shape[0])

    @property
    def num_bytes(self) -> int:
        return self.weights.numel() * self.weights.element_size() + self.config.numel() * 4

    @property
    def rank_units(self) -> int:
        """Σ rank over rows: what this adapter costs in a PEFT cache budgeted in rank-units."""
        return int(self.config[:, 2].sum())


def row_order(adapter: LoraAdapter) -> list[tuple[Key, LoraWeights]]:
    """The (layer, module) entries of `adapter` in TensorRT-LLM row order: by layer, then module id."""
    return sorted(adapter, key=lambda kv: (kv[0][0], MODULE_IDS[kv[0][1]]))


def row_size(w: LoraWeights) -> int:
    """Values in the row of `w` before padding: A `[r, in]`, B `[out, r]`, DoRA magnitude `[out]`."""
    return w.rank * (w.in_features + w.out_features) + (w.out_features if w.is_dora else 0)


def config_rows(items: list[tuple[Key, LoraWeights]]) -> torch.Tensor:
    """int32 `[N, 4]` rows `[module_id, layer, rank, is_dora]` for entries in row order."""
    rows = [[MODULE_IDS[module], layer, w.rank, int(w.is_dora)] for (layer, module), w in items]
    return torch.tensor(rows, dtype=torch.int32).reshape(len(rows), CONFIG_COLUMNS)


def write_scaled_b(w: LoraWeights, out: torch.Tensor) -> None:
    """Write B·scale into `out` (`[out, r]`, any float dtype): the bits of `w.scaled_b(out.dtype)` (NaN aside).

    That is B widened to float32, multiplied by scale in float32, rounded once to out's dtype (as TensorRT-LLM
    does when B is stored in float32 or in the engine dtype). torch computes a float16/bfloat16 product with a
    scalar in float32 and rounds once, so when B is already float32 or out's dtype no float32 copy is needed
    (checked bit for bit over every float16 and bfloat16 value in tests/unit/test_format_trtllm.py).
    """
    b = w.b
    if out.dtype == torch.float32:
        if w.scale == 1.0:
            out.copy_(b)  # exact widening
        elif b.dtype == torch.float32:
            torch.mul(b, w.scale, out=out)  # one pass: the float32 product copy_ + mul_ would give
        else:
            out.copy_(b)  # exact widening, then the float32 product
            out.mul_(w.scale)
    elif b.dtype in (out.dtype, torch.float32):
        if w.scale == 1.0:
            out.copy_(b)
        else:
            torch.mul(b, w.scale, out=out)
    else:  # float16 <-> bfloat16: go through float32 so the result is rounded once, not twice
        out.copy_(w.scaled_b(torch.float32))


def pack(adapter: LoraAdapter, dtype: torch.dtype | str) -> PackedLora:
    """Rows for every (layer, module) of `adapter`, B scaled in float32 then cast to `dtype`.

    The adapter should already be fitted to the engine (lora.fit_to_spec) and its DoRA magnitudes normalized
    (lora.dora.normalized); pack only lays out bytes.
    """
    dt = DTYPES[dtype_name(dtype)]
    items = row_order(adapter)
    check_normalized(items, adapter.source)
    width = max((row_size(w) for _, w in items), default=0)
    weights = torch.empty((len(items), width), dtype=dt)  # [N, W]
    for i, (_, w) in enumerate(items):
        n_a, n_b = w.a.numel(), w.b.numel()
        weights[i, :n_a].copy_(w.a.reshape(-1))
        write_scaled_b(w, weights[i, n_a : n_a + n_b].view(w.out_features, w.rank))
        end = n_a + n_b
        if w.is_dora:
            end += w.out_features
            weights[i, n_a + n_b : end].copy_(w.magnitude.reshape(-1))
        weights[i, end:].zero_()
    return PackedLora(weights=weights, config=config_rows(items))


def check_normalized(items: list[tuple[Key, LoraWeights]], source: str) -> None:
    """TensorRT-LLM's rows carry normalized magnitudes only: a trained one here is a caller's mistake."""
    raw = [f"layer {layer} {module}" for (layer, module), w in items if w.is_dora and not w.normalized]
    if raw:
        raise AdapterFormatError(
            source or "adapter",
            f"DoRA magnitudes not normalized against the base weights ({', '.join(raw[:3])}"
            f"{', …' if len(raw) > 3 else ''}): normalize them against the base model first "
            "(`trtllm-peft convert --to trtllm --base MODEL` does)",
        )


def unpack(weights: torch.Tensor, config: torch.Tensor, spec: ModelSpec, *, source: str = "") -> LoraAdapter:
    """Read TensorRT-LLM tensors (2-D, or 3-D with batch 1) back into a `LoraAdapter` with scale 1.

    Module dimensions come from `spec`; a row too short for its rank (and magnitude), an unknown module id or
    a config that disagrees with the weights raises AdapterFormatError naming every bad row. A DoRA row's
    magnitude is read as TensorRT-LLM takes it: normalized.
    """
    weights, config = (
        _squeeze_batch(weights, "lora_weights", source),
        _squeeze_batch(config, "lora_config", source),
    )
    problems = _check_tensors(weights, config)
    if problems:
        raise AdapterFormatError(source or "lora tensors", problems)
    out: dict[Key, LoraWeights] = {}
    for i, row in enumerate(config.tolist()):
        module_id, layer, rank = row[0], row[1], row[2]
        is_dora = len(row) > 3 and row[3] != 0
        module = MODULE_NAMES.get(module_id)
        try:
            d_in, d_out = spec.module_dims(module) if module else (0, 0)
        except KeyError:
            d_in = d_out = 0
        if not d_in:
            problems.append(f"row {i}: module id {module_id} is not a module of a {spec.architecture}")
        elif len(row) > 3 and row[3] not in (0, 1):
            problems.append(f"row {i}: is_dora must be 0 or 1, got {row[3]}")
        elif rank <= 0:
            problems.append(f"row {i}: adapter size must be > 0, got {rank}")
        elif rank * (d_in + d_out) + (d_out if is_dora else 0) > weights.shape[1]:
            need = rank * (d_in + d_out) + (d_out if is_dora else 0)
            what = f"{module} rank {rank}" + (" + DoRA magnitude" if is_dora else "")
            problems.append(f"row {i}: {what} needs {need} values, row has {weights.shape[1]}")
        elif (layer, module) in out:
            problems.append(f"row {i}: duplicate row for layer {layer} module {module}")
        else:
            flat = weights[i]
            a = flat[: rank * d_in].reshape(rank, d_in)
            end = rank * (d_in + d_out)
            b = flat[rank * d_in : end].reshape(d_out, rank)
            mag = flat[end : end + d_out] if is_dora else None  # [out], normalized
            out[(layer, module)] = LoraWeights(a=a, b=b, scale=1.0, magnitude=mag, normalized=is_dora)
    if problems:
        raise AdapterFormatError(source or "lora tensors", problems)
    return LoraAdapter(weights=out, format="trtllm", source=source)


def _squeeze_batch(t: torch.Tensor, name: str, source: str) -> torch.Tensor:
    if t.ndim == 3:
        if t.shape[0] != 1:
            raise AdapterFormatError(
                source or name, f"{name}: expected batch dimension to be 1, got {t.shape[0]}"
            )
        return t[0]
    if t.ndim != 2:
        raise AdapterFormatError(
            source or name, f"{name}: expected 2-D or [1, N, …] 3-D, got shape {list(t.shape)}"
        )
    return t


def _check_tensors(weights: torch.Tensor, config: torch.Tensor) -> list[str]:
    problems = []
    if config.dtype != torch.int32:
        problems.append(f"lora_config must be int32, got {config.dtype}")
    if config.shape[1] not in (3, 4):
        problems.append(f"lora_config rows must have 3 or 4 columns, got {config.shape[1]}")
    if weights.shape[0] != config.shape[0]:
        problems.append(f"lora_weights has {weights.shape[0]} rows but lora_config has {config.shape[0]}")
    if not weights.is_floating_point():
        problems.append(f"lora_weights must be a floating-point tensor, got {weights.dtype}")
    return problems
