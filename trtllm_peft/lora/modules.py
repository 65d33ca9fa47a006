"""TensorRT-LLM's LoRA module table and the names other formats give the same modules.

Ids from `LoraModule::ModuleType` (cpp/include/tensorrt_llm/runtime/loraModule.h), the same numbers as
`LoraManager.LORA_MODULE_IDS` (tensorrt_llm/lora_manager.py). Module names are TensorRT-LLM's throughout
this package: they are the canonical names of `LoraAdapter`.
"""

from __future__ import annotations

MODULE_IDS: dict[str, int] = {
    "attn_qkv": 0,
    "attn_q": 1,
    "attn_k": 2,
    "attn_v": 3,
    "attn_dense": 4,
    "mlp_h_to_4h": 5,
    "mlp_4h_to_h": 6,
    "mlp_gate": 7,
    "cross_attn_qkv": 8,
    "cross_attn_q": 9,
    "cross_attn_k": 10,
    "cross_attn_v": 11,
    "cross_attn_dense": 12,
    "moe_h_to_4h": 13,
    "moe_4h_to_h": 14,
    "moe_gate": 15,
    "moe_router": 16,
    "mlp_router": 17,
    "mlp_gate_up": 18,
}
MODULE_NAMES: dict[int, str] = {v: k for k, v in MODULE_IDS.items()}

# The modules a decoder-only Llama-family model has; the others exist in the table but not in our models.
LLAMA_MODULES: tuple[str, ...] = (
    "attn_qkv",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_dense",
    "mlp_h_to_4h",
    "mlp_4h_to_h",
    "mlp_gate",
    "mlp_gate_up",
)

# What `trtllm-build --lora_target_modules` gets by default for a Llama model: the seven projections.
DEFAULT_TARGET_MODULES: tuple[str, ...] = (
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_dense",
    "mlp_h_to_4h",
    "mlp_4h_to_h",
    "mlp_gate",
)

# HF module name (last path component) -> TensorRT-LLM module, as get_default_trtllm_modules_to_hf_modules()
# in tensorrt_llm/lora_helper.py. Note gate_proj -> mlp_h_to_4h and up_proj -> mlp_gate: TensorRT-LLM's
# GatedMLP computes act(fc(x)) * gate(x), so its "gate" is HF's non-activated up_proj.
HF_TO_TRTLLM: dict[str, str] = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_dense",
    "gate_proj": "mlp_h_to_4h",
    "up_proj": "mlp_gate",
    "down_proj": "mlp_4h_to_h",
    "qkv_proj": "attn_qkv",
    "gate_up_proj": "mlp_gate_up",
}
TRTLLM_TO_HF: dict[str, str] = {v: k for k, v in HF_TO_TRTLLM.items()}
HF_PARENT: dict[str, str] = {  # where the HF Llama module lives inside a decoder layer
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "qkv_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
    "gate_up_proj": "mlp",
}

# Fused modules and the parts they split into, in row order of the fused B matrix (canonical layout:
# attn_qkv rows are [Q; K; V]; mlp_gate_up rows are [gate_proj; up_proj] = [mlp_h_to_4h; mlp_gate]).
FUSED_PARTS: dict[str, tuple[str, ...]] = {
    "attn_qkv": ("attn_q", "attn_k", "attn_v"),
    "mlp_gate_up": ("mlp_h_to_4h", "mlp_gate"),
}


def module_id(name: str) -> int:
    """TensorRT-LLM id of a module name; KeyError names the known ones."""
    try:
        return MODULE_IDS[name]
    except KeyError:
        raise KeyError(f"unknown LoRA module {name!r}; known: {', '.join(MODULE_IDS)}") from None
