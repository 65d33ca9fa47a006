"""How NeMo 1.x lays out LoRA tensors: key names, tensor/pipeline-parallel shards, the fused-QKV interleave.

Pure tensor and string logic, no file IO (nemo.py owns the archive). Sources (NVIDIA/NeMo @8cfedd7):
- parallel_adapters.py `ParallelLinearAdapter`: LoRA adapters are built with gather_output=False, so
  `linear_out` is a ColumnParallelLinear (rows split over TP ranks) and `linear_in` is a ColumnParallelLinear
  with gather_output=True (rows = rank split over TP ranks), except where the base layer is row-parallel
  (attention dense, fc2: `input_is_parallel=True`), where `linear_in` is a RowParallelLinear (columns split).
- peft_config.py `LoraPEFTConfig`: in/out features of each adapter; fast-*glu doubles fc1's output.
- export/utils/lora_converter.py `convert_lora_weights_to_canonical`: the per-group q/k/v blocks of the fused
  QKV `linear_out`, and fc1's `[gate; up]` halves.
- megatron.core `TransformerLayer._get_layer_offset`: where a pipeline / virtual-pipeline chunk's layers sit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

# NeMo adapter (as it appears after `adapter_layer.`) -> (parent block, what it holds in our vocabulary).
# "qkv" and "fc1" are fused and need the geometry to be split; the rest are one TensorRT-LLM module each.
LORA_ADAPTERS: dict[str, tuple[str, str]] = {
    "lora_kqv_adapter": ("self_attention", "qkv"),
    "lora_unfused_kqv_adapter.q_adapter": ("self_attention", "attn_q"),
    "lora_unfused_kqv_adapter.k_adapter": ("self_attention", "attn_k"),
    "lora_unfused_kqv_adapter.v_adapter": ("self_attention", "attn_v"),
    "lora_dense_attention_adapter": ("self_attention", "attn_dense"),
    "lora_hto4h_adapter": ("mlp", "fc1"),
    "lora_unfused_hto4h_adapter.gate_adapter": ("mlp", "mlp_h_to_4h"),
    "lora_unfused_hto4h_adapter.up_adapter": ("mlp", "mlp_gate"),
    "lora_4htoh_adapter": ("mlp", "mlp_4h_to_h"),
}
FUSED_QKV, FUSED_FC1 = "lora_kqv_adapter", "lora_hto4h_adapter"
UNFUSED_QKV = {
    "attn_q": "lora_unfused_kqv_adapter.q_adapter",
    "attn_k": "lora_unfused_kqv_adapter.k_adapter",
    "attn_v": "lora_unfused_kqv_adapter.v_adapter",
}
UNFUSED_FC1 = {
    "mlp_h_to_4h": "lora_unfused_hto4h_adapter.gate_adapter",
    "mlp_gate": "lora_unfused_hto4h_adapter.up_adapter",
}
DENSE, FC2 = "lora_dense_attention_adapter", "lora_4htoh_adapter"
# Adapters whose base layer is row-parallel: their linear_in is split over its input columns.
ROW_PARALLEL = {DENSE, FC2}

# Adapters NeMo can put in `adapter_layer` that are not LoRA (parallel_adapters.py `AdapterName`).
OTHER_ADAPTERS: dict[str, str] = {
    "ptuning_adapter": "p-tuning",
    "adapter_1": "a bottleneck adapter (peft_scheme 'adapter')",
    "adapter_2": "a bottleneck adapter (peft_scheme 'adapter')",
    "key_infused_adapter": "IA3",
    "value_infused_adapter": "IA3",
    "mlp_infused_adapter": "IA3",
    "lora_q_adapter": "T5 cross-attention LoRA",
    "lora_kv_adapter": "T5 cross-attention LoRA",
    "vera_kqv_adapter": "VeRA",
    "lora_moe_hto4h_adapter": "mixture-of-experts LoRA",
    "lora_moe_4htoh_adapter": "mixture-of-experts LoRA",
    "mlp_head_adapter": "an MLP head",
    "mm_linear_adapter": "a multimodal projector",
}

# mcore `model.decoder.`, legacy `model.language_model.encoder.`, O2 `model.module.…`, and TensorRT-LLM's
# own test mock `model.layers.` (no block name).
_KEY = re.compile(
    r"^model\.(?:module\.)?(?:decoder\.|language_model\.encoder\.)?layers\.(?P<layer>\d+)\."
    r"(?P<parent>self_attention|mlp)\.adapter_layer\."
    r"(?P<adapter>[A-Za-z0-9_]+(?:\.[a-z]+_adapter)?)\.(?P<param>linear_in|linear_out)\.weight$"
)
_ANY_ADAPTER = re.compile(r"adapter_layer\.([A-Za-z0-9_]+)")
_VPP_CHUNK = re.compile(r"^model_(\d+)$")

Entry = tuple[int, str, str]  # (global layer, adapter, "linear_in" | "linear_out")


@dataclass(frozen=True)
class Geometry:
    """The base-model shapes a NeMo LoRA is interpreted with (model_config.yaml, or the engine spec)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_groups: int  # num_query_groups; = num_heads for MHA
    head_dim: int  # kv_channels
    ffn_hidden_size: int | None
    gated: bool  # fast-swiglu / fast-geglu / fast-reglu: fc1 rows are [gate; up]

    @property
    def qkv_out(self) -> int:
        return (self.num_heads + 2 * self.num_groups) * self.head_dim

    def dims(self, adapter: str) -> tuple[int, int | None]:
        """(in, out) features of a NeMo adapter, as peft_config.py computes them; None where unknown."""
        h, q, kv, f = (
            self.hidden_size,
            self.num_heads * self.head_dim,
            self.num_groups * self.head_dim,
            self.ffn_hidden_size,
        )
        fc1_out = f * (2 if self.gated else 1) if f else None
        return {
            FUSED_QKV: (h, self.qkv_out),
            UNFUSED_QKV["attn_q"]: (h, q),
            UNFUSED_QKV["attn_k"]: (h, kv),
            UNFUSED_QKV["attn_v"]: (h, kv),
            DENSE: (q, h),
            FUSED_FC1: (h, fc1_out),
            UNFUSED_FC1["mlp_h_to_4h"]: (h, f),
            UNFUSED_FC1["mlp_gate"]: (h, f),
            FC2: (f, h),
        }[adapter]


def parse_key(key: str) -> tuple[int, str, str] | str:
    """(local layer, adapter, param) of a LoRA tensor key, or a problem sentence naming what the key is."""
    m = _KEY.match(key)
    if m and m["adapter"] in LORA_ADAPTERS:
        if LORA_ADAPTERS[m["adapter"]][0] != m["parent"]:
            return f"{key}: {m['adapter']} under {m['parent']} (NeMo puts it under {LORA_ADAPTERS[m['adapter']][0]})"
        return int(m["layer"]), m["adapter"], m["param"]
    found = _ANY_ADAPTER.search(key)
    name = m["adapter"].split(".")[0] if m else (found[1] if found else None)
    if name in OTHER_ADAPTERS:
        return f"adapter {name!r} is {OTHER_ADAPTERS[name]}, not LoRA: only LoRA adapters can be served"
    if name:
        return f"unknown NeMo adapter {name!r} (LoRA adapters are: {', '.join(sorted(LORA_ADAPTERS))})"
    return f"unexpected tensor {key!r} (not a NeMo LoRA linear_in/linear_out weight)"


def vpp_chunks(state: dict) -> list[tuple[int, dict]] | None:
    """[(chunk, state dict)] of a virtual-pipeline dict `{"model_0": {...}, …}`; [(0, state)] when flat; None if mixed."""
    nested = {k: v for k, v in state.items() if isinstance(v, dict)}
    if not nested:
        return [(0, state)]
    if len(nested) != len(state) or not all(_VPP_CHUNK.match(k) for k in nested):
        return None
    return sorted((int(_VPP_CHUNK.match(k)[1]), v) for k, v in nested.items())


def layer_offset(num_layers: int, pp_rank: int, pp_size: int, vpp_chunk: int, vpp_size: int) -> int:
    """First global layer of a (pipeline stage, virtual chunk): megatron.core `_get_layer_offset`."""
    per_virtual_rank = num_layers // pp_size // vpp_size
    return vpp_chunk * (num_layers // vpp_size) + pp_rank * per_virtual_rank


def merge_tp(adapter: str, param: str, parts: list[torch.Tensor], gated: bool) -> torch.Tensor:
    """Join one tensor's TP shards into the full tensor.

    As NeMo's merge.py: linear_in on dim 0 (dim 1 for the row-parallel dense/fc2), linear_out on dim 0.
    Gated fc1 differs: Megatron applies the GLU to each rank's own output, so each rank's linear_out rows are
    `[gate_t; up_t]`; the full `[gate; up]` is every rank's first half, then every rank's second half (naive
    concatenation, as merge.py does, would interleave gate and up). QKV needs nothing special: each rank
    holds whole query groups, so concatenation is already the global per-group interleave.
    """
    if len(parts) == 1:
        return parts[0]
    if param == "linear_in":
        return torch.cat(parts, dim=1 if adapter in ROW_PARALLEL else 0)
    if adapter == FUSED_FC1 and gated:
        halves = [p.chunk(2, dim=0) for p in parts]  # each [out/TP/2, r] x 2
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(parts, dim=0)


def qkv_from_nemo(b: torch.Tensor, g: Geometry) -> torch.Tensor:
    """NeMo's per-group interleaved QKV rows -> canonical [Q; K; V] rows (lora_converter.py's slices)."""
    hpg, r = g.num_heads // g.num_groups, b.shape[1]
    blocks = b.reshape(g.num_groups, hpg + 2, g.head_dim, r)  # per group: hpg query heads, 1 key, 1 value
    q = blocks[:, :hpg].reshape(g.num_heads * g.head_dim, r)
    k = blocks[:, hpg].reshape(g.num_groups * g.head_dim, r)
    v = blocks[:, hpg + 1].reshape(g.num_groups * g.head_dim, r)
    return torch.cat([q, k, v])  # [(heads + 2 groups) * head_dim, r]


def qkv_to_nemo(b: torch.Tensor, g: Geometry) -> torch.Tensor:
    """Canonical [Q; K; V] rows -> NeMo's per-group interleave (the inverse of qkv_from_nemo)."""
    hpg, r, d = g.num_heads // g.num_groups, b.shape[1], g.head_dim
    q, k, v = torch.split(b, [g.num_heads * d, g.num_groups * d, g.num_groups * d])
    blocks = torch.cat(
        [
            q.reshape(g.num_groups, hpg, d, r),
            k.reshape(g.num_groups, 1, d, r),
            v.reshape(g.num_groups, 1, d, r),
        ],
        dim=1,
    )
    return blocks.reshape(-1, r)


def geometry_of(spec) -> Geometry:
    """The Geometry of an engine's ModelSpec (Llama family: gated MLP)."""
    return Geometry(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        num_heads=spec.num_heads,
        num_groups=spec.num_kv_heads,
        head_dim=spec.head_dim,
        ffn_hidden_size=spec.intermediate_size,
        gated=True,
    )


def key_of(layer: int, adapter: str, param: str) -> str:
    """The mcore key NeMo saves (non-O2 form: `model.`, not `model.module.`)."""
    parent = LORA_ADAPTERS[adapter][0]
    return f"model.decoder.layers.{layer}.{parent}.adapter_layer.{adapter}.{param}.weight"
