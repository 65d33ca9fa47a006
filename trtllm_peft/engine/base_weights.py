"""The base model's projection weights, read on demand: what DoRA's norms ‖W + s·B·A‖ need (lora/dora.py).

A reference engine keeps its weights in `model.safetensors` under Hugging Face names; a Hugging Face model
directory has `model.safetensors` or shards listed in `model.safetensors.index.json`; a TensorRT-LLM engine
names its source checkpoint in trtllm_peft.json (`source_model`). Tensors are read one at a time from
memory-mapped files (safetensors' safe_open), never the whole model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from trtllm_peft.errors import EngineError
from trtllm_peft.lora.modules import FUSED_PARTS, HF_PARENT, TRTLLM_TO_HF

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


class BaseWeights:
    """`weight(layer, module)` -> W `[out, in]` (float32) of a TensorRT-LLM module name, fused ones concatenated."""

    def __init__(self, files: dict[str, Path]) -> None:
        self._files = files  # tensor name -> the safetensors file holding it

    @classmethod
    def open(cls, directory: str | Path) -> BaseWeights | None:
        """The weights of a model or engine directory, or None when it holds no safetensors weights."""
        d = Path(directory)
        meta = d / "trtllm_peft.json"
        if not (d / SINGLE).is_file() and meta.is_file():  # a TensorRT-LLM engine: its source checkpoint
            source = json.loads(meta.read_text()).get("source_model")
            return cls.open(source) if source and Path(source).is_dir() else None
        if (d / INDEX).is_file():
            index = json.loads((d / INDEX).read_text()).get("weight_map", {})
            return cls({name: d / f for name, f in index.items()})
        if (d / SINGLE).is_file():
            from safetensors import safe_open

            with safe_open(str(d / SINGLE), framework="pt") as f:
                return cls(dict.fromkeys(f.keys(), d / SINGLE))
        return None

    def weight(self, layer: int, module: str) -> torch.Tensor:
        """W `[out, in]` of `module` in `layer`, float32 (attn_qkv / mlp_gate_up: its parts stacked by rows)."""
        parts = FUSED_PARTS.get(module, (module,))
        return torch.cat([self._tensor(self._name(layer, p)) for p in parts]).to(torch.float32)

    __call__ = weight  # a lora.dora.WeightOf

    def _name(self, layer: int, module: str) -> str:
        hf = TRTLLM_TO_HF[module]
        return f"model.layers.{layer}.{HF_PARENT[hf]}.{hf}.weight"

    def _tensor(self, name: str) -> torch.Tensor:
        path = self._files.get(name)
        if path is None:
            raise EngineError(f"base weights: no tensor {name}")
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(name)
