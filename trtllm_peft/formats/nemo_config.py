"""model_config.yaml of a NeMo 1.x `.nemo`: the LoRA settings (`peft` section) and the model geometry.

NeMo's defaults are kept (nemo/collections/nlp/parts/peft_config.py): num_query_groups null = MHA,
kv_channels null = hidden / heads, alpha absent = adapter_dim (scale 1), target_modules absent =
attention_qkv, layer_selection 1-based with null = every layer. Every problem is appended to `problems`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trtllm_peft.formats.nemo_layout import Geometry
from trtllm_peft.lora import ModelSpec

CONFIG_MEMBER = "model_config.yaml"
LORA_SCHEMES = {"lora", "qlora"}  # QLoRA adapters are plain LoRA tensors trained over a quantised base


@dataclass(frozen=True)
class LoraSettings:
    """The `peft` section of model_config.yaml, as far as serving needs it."""

    scheme: str | None
    variant: str
    target_modules: list[str]
    adapter_dim: int | None
    alpha: float | None
    layer_selection: list[int] | None  # 1-based, None = every layer


MAX_PARALLEL = 1024  # Megatron's largest grids (TP 8 x PP 128) stay far below


def parallel_size(config: dict, key: str, problems: list[str]) -> int:
    """tensor_model_parallel_size / pipeline_model_parallel_size (absent or null = 1, at most MAX_PARALLEL)."""
    value = config.get(key) or 1
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        problems.append(f"{CONFIG_MEMBER}: {key} must be a positive integer, got {str(value)[:40]!r}")
        return 1
    if value > MAX_PARALLEL:
        problems.append(f"{CONFIG_MEMBER}: {key} is {value}, more than {MAX_PARALLEL}: not a real model's")
        return 1
    return value


def lora_settings(config: dict, problems: list[str]) -> LoraSettings:
    """The `peft` section; a non-LoRA scheme (p-tuning, IA3, adapters, even combined with LoRA) or tied
    weights are problems. A file without a `peft` section is read as LoRA with NeMo's defaults."""
    peft = config.get("peft") if isinstance(config.get("peft"), dict) else {}
    scheme = peft.get("peft_scheme")
    if scheme is not None:
        others = [s.strip() for s in str(scheme).lower().split(",") if s.strip() not in LORA_SCHEMES]
        if others:
            problems.append(
                f"peft.peft_scheme is {scheme!r}: {', '.join(others)} is not LoRA; only LoRA "
                "adapters can be served"
            )
    tuning = peft.get("lora_tuning") if isinstance(peft.get("lora_tuning"), dict) else {}
    if tuning.get("weight_tying"):
        problems.append(
            "peft.lora_tuning.weight_tying is set: tied LoRA (one adapter shared by every layer, "
            "with position embeddings) is not supported"
        )
    dim, alpha, selection = tuning.get("adapter_dim"), tuning.get("alpha"), tuning.get("layer_selection")
    if dim is not None and not _is_int(dim, minimum=1):
        problems.append(f"peft.lora_tuning.adapter_dim must be a positive integer, got {dim!r}")
        dim = None
    if alpha is not None and not (isinstance(alpha, int | float) and not isinstance(alpha, bool)):
        problems.append(f"peft.lora_tuning.alpha must be a number, got {alpha!r}")
        alpha = None
    if selection is not None and not (isinstance(selection, list) and all(_is_int(x, 1) for x in selection)):
        problems.append(
            f"peft.lora_tuning.layer_selection must be a list of 1-based layer numbers, got {selection!r}"
        )
        selection = None
    targets = tuning.get("target_modules", ["attention_qkv"])
    return LoraSettings(
        scheme=scheme,
        variant=str(tuning.get("variant", "nemo")),
        target_modules=list(targets) if isinstance(targets, list | tuple) else [str(targets)],
        adapter_dim=dim,
        alpha=None if alpha is None else float(alpha),
        layer_selection=selection,
    )


def _is_int(x: Any, minimum: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= minimum


def geometry(config: dict, spec: ModelSpec | None, problems: list[str]) -> Geometry | None:
    """Geometry with NeMo's defaults (num_query_groups null = MHA, kv_channels null = hidden / heads)."""

    def pick(key: str, fallback: int | None) -> int | None:
        value = config.get(key)
        if value is None:
            return fallback
        if not _is_int(value, 1):
            problems.append(f"{CONFIG_MEMBER}: {key} must be a positive integer, got {value!r}")
        return value if _is_int(value, 1) else None

    has = "num_attention_heads" in config
    hidden = pick("hidden_size", spec and spec.hidden_size)
    heads = pick("num_attention_heads", spec and spec.num_heads)
    groups = pick("num_query_groups", heads if has else spec and spec.num_kv_heads)
    head_dim = pick("kv_channels", hidden // heads if has and hidden and heads else spec and spec.head_dim)
    layers = pick("num_layers", spec and spec.num_layers)
    ffn = pick("ffn_hidden_size", spec and spec.intermediate_size)
    activation = config.get("activation")
    # NeMo's default activation is gelu; with no activation in the file but an engine spec, the engine's
    # (gated) MLP is the better guess.
    gated = str(activation).endswith("glu") if activation is not None else spec is not None
    missing = [
        k
        for k, v in (
            ("hidden_size", hidden),
            ("num_attention_heads", heads),
            ("num_layers", layers),
            ("num_query_groups", groups),
            ("kv_channels", head_dim),
        )
        if v is None
    ]
    if missing:
        problems.append(
            f"{CONFIG_MEMBER} lacks {', '.join(missing)} (and there is no engine spec to take it from)"
        )
        return None
    if heads % groups:
        problems.append(
            f"{CONFIG_MEMBER}: num_attention_heads {heads} is not a multiple of num_query_groups {groups}"
        )
        return None
    return Geometry(
        num_layers=layers,
        hidden_size=hidden,
        num_heads=heads,
        num_groups=groups,
        head_dim=head_dim,
        ffn_hidden_size=ffn,
        gated=gated,
    )


def spec_disagreements(geom: Geometry, spec: ModelSpec) -> list[str]:
    """Every way the adapter's base model differs from the engine's; [] when they agree."""
    pairs = [
        ("num_layers", geom.num_layers, spec.num_layers),
        ("hidden_size", geom.hidden_size, spec.hidden_size),
        ("num_attention_heads", geom.num_heads, spec.num_heads),
        ("num_query_groups", geom.num_groups, spec.num_kv_heads),
        ("kv_channels", geom.head_dim, spec.head_dim),
        ("ffn_hidden_size", geom.ffn_hidden_size, spec.intermediate_size),
    ]
    out = [
        f"{CONFIG_MEMBER} has {k} {a}, the engine's model has {b} (trained for another base model?)"
        for k, a, b in pairs
        if a is not None and a != b
    ]
    if not geom.gated:
        out.append(f"{CONFIG_MEMBER} has a non-gated activation, the engine's model has a gated MLP")
    return out
