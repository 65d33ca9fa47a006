"""`LoraAdapter`: the one in-memory form every on-disk format is parsed into.

Module names are TensorRT-LLM's (`attn_q`, `mlp_h_to_4h`, …; see modules.py). For a linear layer
`y = W x` with `W` `[out, in]`, LoRA adds `scale · B (A x)`. A and B are kept unscaled, as trained, in
the dtype they were stored in; `scale` is the PEFT/NeMo factor (alpha/r, alpha/√r, …). The TensorRT-LLM
format stores B·scale and has scale 1.

DoRA (PEFT `use_dora`) adds a magnitude vector per module: PEFT computes
`y = (m / ‖W + s·B·A‖_row) ⊙ (W x + s·B·A x) + bias`, the norm taken over the input dimension of each
output row (peft/tuners/lora/dora.py, DoraLinearLayer.get_weight_norm: `norm(weight, dim=1)`). `magnitude`
holds PEFT's `m` as trained (`normalized=False`), or the factor `m / ‖W + s·B·A‖_row` that TensorRT-LLM's rows
carry (`normalized=True`: its examples/dora/normalize_weights.py precomputes it; lora/dora.py converts).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch


@dataclass(frozen=True)
class LoraWeights:
    """One (layer, module) of an adapter."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float = 1.0
    magnitude: torch.Tensor | None = None  # [out] DoRA magnitude; None: plain LoRA
    normalized: bool = False  # magnitude already divided by the row norms of W + s·B·A (TensorRT-LLM's form)

    @property
    def is_dora(self) -> bool:
        return self.magnitude is not None

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.a.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.b.shape[0])

    def scaled_b(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """B·scale computed in float32 and then cast, as TensorRT-LLM's LoraManager does."""  # [out, r]
        b = self.b.to(torch.float32)
        if self.scale != 1.0:
            b = b * self.scale
        return b.to(dtype)

    def delta(self) -> torch.Tensor:
        """The dense weight update scale·B·A in float64, for tests and inspection."""  # [out, in]
        return (self.b.double() @ self.a.double()) * self.scale

    @property
    def num_bytes(self) -> int:
        m = self.magnitude
        extra = 0 if m is None else m.numel() * m.element_size()
        return self.a.numel() * self.a.element_size() + self.b.numel() * self.b.element_size() + extra

    def with_tensors(self, **changes: Any) -> LoraWeights:
        """A copy with some fields changed (a, b, scale, magnitude, normalized)."""
        fields = {
            "a": self.a,
            "b": self.b,
            "scale": self.scale,
            "magnitude": self.magnitude,
            "normalized": self.normalized,
        }
        fields.update(changes)
        return LoraWeights(**fields)


Key = tuple[int, str]  # (layer index, TensorRT-LLM module name)


@dataclass(frozen=True)
class LoraAdapter:
    """A LoRA adapter: weights per (layer, module), plus where it came from."""

    weights: Mapping[Key, LoraWeights]
    format: str  # "hf" | "nemo" | "trtllm"
    source: str = ""
    base_model: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        ordered = dict(sorted(self.weights.items(), key=lambda kv: (kv[0][0], kv[0][1])))
        object.__setattr__(self, "weights", MappingProxyType(ordered))

    def __iter__(self) -> Iterator[tuple[Key, LoraWeights]]:
        return iter(self.weights.items())

    def __len__(self) -> int:
        return len(self.weights)

    @property
    def layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.weights})

    @property
    def modules(self) -> list[str]:
        return sorted({m for _, m in self.weights})

    @property
    def ranks(self) -> dict[str, list[int]]:
        """Distinct ranks per module."""
        out: dict[str, set[int]] = {}
        for (_, m), w in self.weights.items():
            out.setdefault(m, set()).add(w.rank)
        return {m: sorted(r) for m, r in sorted(out.items())}

    @property
    def max_rank(self) -> int:
        return max((w.rank for w in self.weights.values()), default=0)

    @property
    def num_bytes(self) -> int:
        return sum(w.num_bytes for w in self.weights.values())

    @property
    def num_params(self) -> int:
        return sum(
            w.a.numel() + w.b.numel() + (0 if w.magnitude is None else w.magnitude.numel())
            for w in self.weights.values()
        )

    @property
    def is_dora(self) -> bool:
        """Whether any module carries a DoRA magnitude."""
        return any(w.is_dora for w in self.weights.values())

    def with_weights(self, weights: Mapping[Key, LoraWeights], **changes: Any) -> LoraAdapter:
        """A copy with other weights (and optionally other metadata fields)."""
        fields = {
            "format": self.format,
            "source": self.source,
            "base_model": self.base_model,
            "meta": self.meta,
        }
        fields.update(changes)
        return LoraAdapter(weights=dict(weights), **fields)

    def folded(self, dtype: torch.dtype | None = None) -> LoraAdapter:
        """The same adapter with scale folded into B (scale 1), as the TensorRT-LLM format stores it."""
        out = {}
        for key, w in self.weights.items():
            dt = dtype or w.b.dtype
            mag = None if w.magnitude is None else w.magnitude.to(dt)
            out[key] = w.with_tensors(a=w.a.to(dt), b=w.scaled_b(dt), scale=1.0, magnitude=mag)
        return self.with_weights(out)
