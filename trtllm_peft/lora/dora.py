"""DoRA magnitudes: PEFT's trained `m` <-> the normalized factor TensorRT-LLM's rows carry.

PEFT (peft/tuners/lora/dora.py, DoraLinearLayer) computes, for a linear layer W `[out, in]`,

    weight_norm = ‖W + s·B·A‖ over dim=1        one value per output row (`get_weight_norm`)
    y = (m / weight_norm) ⊙ (W x + s·B·A x) + bias                                (`forward`, at inference)

TensorRT-LLM does not compute the norm at run time: examples/dora/normalize_weights.py
(`normalize_dora_vector`: `mag / torch.linalg.norm(W + scale * B @ A, dim=1)`) stores the factor
`m / weight_norm` in the adapter once, and the DoRA plugin (cpp/tensorrt_llm/plugins/doraPlugin/doraPlugin.cpp)
only multiplies each token's output by its adapter's factor. We do the same: the norm is computed once per
adapter when it is loaded (here), never per step. The norm is taken in float32 from the engine's weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from trtllm_peft.errors import AdapterFormatError
from trtllm_peft.lora.adapter import LoraAdapter, LoraWeights

# (layer, TensorRT-LLM module name) -> the base weight W [out, in] (engine/base_weights.py reads them)
WeightOf = Callable[[int, str], torch.Tensor]


def row_norms(w: LoraWeights, base: torch.Tensor) -> torch.Tensor:
    """‖W + s·B·A‖ per output row, in float32 (PEFT: `torch.linalg.norm(weight + scaling * lora_weight, dim=1)`)."""
    merged = base.to(torch.float32) + w.scaled_b(torch.float32) @ w.a.to(torch.float32)  # [out, in]
    return torch.linalg.vector_norm(merged, dim=1)  # [out]


def in_form(adapter: LoraAdapter, normalized: bool, weight_of: WeightOf | None) -> LoraAdapter:
    """`adapter` with every DoRA magnitude in the asked form (normalized: TensorRT-LLM's; else PEFT's).

    Converting needs the base weights (`weight_of`); without them an adapter already in the asked form passes
    unchanged and any other is refused with the reason.
    """
    todo = [key for key, w in adapter if w.is_dora and w.normalized != normalized]
    if not todo:
        return adapter
    if weight_of is None:
        want = "normalized (TensorRT-LLM's form)" if normalized else "as trained (PEFT's form)"
        raise AdapterFormatError(
            adapter.source or "adapter",
            f"DoRA magnitudes must be {want} for this target, and converting them needs the base model's "
            "weights (the norms of W + s·B·A): give a base model or engine directory that holds them",
        )
    out = dict(adapter.weights)
    for layer, module in todo:
        w = out[(layer, module)]
        norms = row_norms(w, weight_of(layer, module))
        mag = w.magnitude.to(torch.float32)
        mag = mag / norms if normalized else mag * norms
        out[(layer, module)] = w.with_tensors(magnitude=mag.to(w.magnitude.dtype), normalized=normalized)
    return adapter.with_weights(out)


def normalized(adapter: LoraAdapter, weight_of: WeightOf | None) -> LoraAdapter:
    """TensorRT-LLM's form: each magnitude divided by its row norms (what pack() writes)."""
    return in_form(adapter, True, weight_of)


def trained(adapter: LoraAdapter, weight_of: WeightOf | None) -> LoraAdapter:
    """PEFT's form: the magnitude as trained (what adapter_model.safetensors holds)."""
    return in_form(adapter, False, weight_of)
