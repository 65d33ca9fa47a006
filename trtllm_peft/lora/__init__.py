"""The canonical LoRA adapter, TensorRT-LLM's module table, and packing to its runtime tensors."""

from trtllm_peft.lora.adapter import LoraAdapter, LoraWeights
from trtllm_peft.lora.modules import MODULE_IDS
from trtllm_peft.lora.pack import PackedLora, pack, unpack
from trtllm_peft.lora.spec import ModelSpec, load_spec
from trtllm_peft.lora.validate import fit_to_spec, validate

__all__ = [
    "MODULE_IDS",
    "LoraAdapter",
    "LoraWeights",
    "ModelSpec",
    "PackedLora",
    "fit_to_spec",
    "load_spec",
    "pack",
    "unpack",
    "validate",
]
