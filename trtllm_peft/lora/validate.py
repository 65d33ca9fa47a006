"""Check an adapter against an engine spec, collecting every problem, and fit fused modules to it."""

from __future__ import annotations

import torch

from trtllm_peft.errors import AdapterIncompatibleError
from trtllm_peft.lora.adapter import Key, LoraAdapter, LoraWeights
from trtllm_peft.lora.modules import FUSED_PARTS, TRTLLM_TO_HF
from trtllm_peft.lora.spec import ModelSpec


def _label(module: str) -> str:
    hf = TRTLLM_TO_HF.get(module)
    return f"{module} ({hf})" if hf else module


def _layers(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> 'layers 0-2, 5'."""
    layers = sorted(set(layers))
    runs, start, prev = [], layers[0], layers[0]
    for cur in layers[1:]:
        if cur != prev + 1:
            runs.append((start, prev))
            start = cur
        prev = cur
    runs.append((start, prev))
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
    return ("layer " if len(layers) == 1 else "layers ") + text


def _problems_of(layer: int, module: str, w: LoraWeights, spec: ModelSpec, finite: bool) -> list[str]:
    """Problems of one (layer, module), without the layer (grouped across layers by the caller); `finite`:
    whether A, B and the DoRA magnitude hold no NaN or inf (`_finite_flags`)."""
    out = []
    if module not in spec.lora_target_modules:
        enabled = ", ".join(spec.lora_target_modules) or "none"
        return [f"module {_label(module)} is not enabled in this engine (built with: {enabled})"]
    if not (0 <= layer < spec.num_layers):
        return [f"{_label(module)}: layer index out of range [0, {spec.num_layers})"]
    if w.a.numel() == 0 or w.b.numel() == 0:
        return [f"{_label(module)}: empty tensor (rank 0; saved under ZeRO-3 without gathering?)"]
    if w.a.ndim != 2 or w.b.ndim != 2:
        return [f"{_label(module)}: A and B must be 2-D, got {tuple(w.a.shape)} and {tuple(w.b.shape)}"]
    if w.a.shape[0] != w.b.shape[1]:
        out.append(f"{_label(module)}: rank of A ({w.a.shape[0]}) and B ({w.b.shape[1]}) differ")
    want_in, want_out = spec.module_dims(module)
    if w.in_features != want_in or w.out_features != want_out:
        out.append(
            f"{_label(module)}: shape A {list(w.a.shape)} B {list(w.b.shape)} does not fit the model "
            f"(expected A [r, {want_in}] and B [{want_out}, r]; wrong base model?)"
        )
    if spec.max_lora_rank and w.rank > spec.max_lora_rank:
        out.append(
            f"{_label(module)}: rank {w.rank} exceeds max_lora_rank {spec.max_lora_rank} (NIM_MAX_LORA_RANK)"
        )
    if not finite and not _all_finite(w.a, w.b):
        out.append(f"{_label(module)}: contains NaN or inf")
    if w.scale != w.scale or w.scale in (float("inf"), float("-inf")):
        out.append(f"{_label(module)}: scale is {w.scale}")
    if w.is_dora:
        out += _dora_problems(module, w, spec, finite)
    return out


def _all_finite(*tensors: torch.Tensor) -> bool:
    """The exact elementwise check (a few small ops per tensor: only where `_finite_flags` is unsure)."""
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _finite_flags(adapter: LoraAdapter) -> list[bool]:
    """Per entry of `adapter` (in its order): True when its A, B and DoRA magnitude surely hold no NaN or inf.

    One float32 sum per tensor, stacked and checked at once: a tensor holding NaN or ±inf has a non-finite
    sum (both propagate, and inf - inf is NaN), so True is exact; False (a non-finite sum: NaN/inf, or finite
    values summing past float32's range) sends the entry to the exact elementwise check. Per tensor that is
    one reduction instead of isfinite + all + a Python bool: an adapter of ~400 tensors is read, validated and
    packed on every cold load of a serving host cache, and validated again when its rows reach the engine.
    """
    sums, owners, flags = [], [], [True] * len(adapter)
    for i, (_, w) in enumerate(adapter):
        for t in (w.a, w.b, w.magnitude):
            if t is None or not t.numel():
                continue
            if t.is_floating_point():
                sums.append(t.sum(dtype=torch.float32))
                owners.append(i)
            else:
                flags[i] = False  # integer, bool, complex: rare, checked elementwise
    if sums:
        for i, ok in zip(owners, torch.isfinite(torch.stack(sums)).tolist(), strict=True):
            flags[i] = flags[i] and ok
    return flags


def _dora_problems(module: str, w: LoraWeights, spec: ModelSpec, finite: bool) -> list[str]:
    m = w.magnitude
    if not spec.dora_plugin:
        # TensorRT-LLM 1.2 accepts DoRA rows on such an engine and silently ignores the magnitudes
        # (examples/dora/README.md: "if you omit --dora_plugin=enable, you will not receive any warning …
        # the DoRA magnitudes will simply be ignored"): refuse here instead of serving wrong outputs.
        return [
            "DoRA adapter, but this engine was built without the DoRA plugin "
            "(build_config.plugin_config.dora_plugin; rebuild with `trtllm-peft build --dora`)"
        ]
    if m.ndim != 1 or m.shape[0] != w.out_features:
        return [f"{_label(module)}: DoRA magnitude has shape {list(m.shape)}, expected [{w.out_features}]"]
    if not m.is_floating_point() or not (finite or _all_finite(m)):
        return [f"{_label(module)}: DoRA magnitude is not finite floating-point values"]
    return []


def validate(adapter: LoraAdapter, spec: ModelSpec) -> list[str]:
    """Every problem that stops `adapter` from running on `spec`, grouped by message; [] when it fits."""
    if len(adapter) == 0:
        return ["adapter has no LoRA weights"]
    grouped: dict[str, list[int]] = {}
    for ((layer, module), w), finite in zip(adapter, _finite_flags(adapter), strict=True):
        for p in _problems_of(layer, module, w, spec, finite):
            grouped.setdefault(p, []).append(layer)
    return [f"{msg} ({_layers(layers)})" for msg, layers in grouped.items()]


def _split(w: LoraWeights, sizes: list[int]) -> list[LoraWeights]:
    """Split a fused module's B (and DoRA magnitude: one value per output row) by rows; A (shared input
    projection) is the same for every part. Row norms are per output row, so the split is exact."""
    bs = torch.split(w.b, sizes, dim=0)
    mags = torch.split(w.magnitude, sizes) if w.is_dora else [None] * len(sizes)
    return [w.with_tensors(b=b.contiguous(), magnitude=m) for b, m in zip(bs, mags, strict=True)]


def fit_to_spec(adapter: LoraAdapter, spec: ModelSpec) -> LoraAdapter:
    """Return `adapter` in the engine's module vocabulary, validated; raise AdapterIncompatibleError.

    A fused module the engine lacks (attn_qkv, mlp_gate_up) is split exactly into its parts when the
    engine has them: the parts share A and take their rows of B.
    """
    out: dict[Key, LoraWeights] = {}
    for (layer, module), w in adapter:
        parts = FUSED_PARTS.get(module)
        if (
            parts
            and module not in spec.lora_target_modules
            and all(p in spec.lora_target_modules for p in parts)
        ):
            sizes = [spec.module_dims(p)[1] for p in parts]
            if w.out_features != sum(sizes) or (w.is_dora and w.magnitude.shape != (w.out_features,)):
                out[(layer, module)] = w  # let validate() report the shape problem
                continue
            out.update({(layer, p): pw for p, pw in zip(parts, _split(w, sizes), strict=True)})
        else:
            out[(layer, module)] = w
    fitted = adapter.with_weights(out)
    problems = validate(fitted, spec)
    if problems:
        raise AdapterIncompatibleError(adapter.source or "adapter", problems)
    return fitted
