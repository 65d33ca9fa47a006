"""TensorRT-LLM adapter files laid out the way examples/hf_lora_convert.py does it (rows in file order, A then B
flattened, zero padding, `torch_to_numpy` for bfloat16), independently of lora.pack, so that the reader is
checked against TensorRT-LLM's layout and not against our own writer.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from trtllm_peft.lora import LoraAdapter, ModelSpec
from trtllm_peft.lora.modules import MODULE_IDS

SPEC = ModelSpec(
    num_layers=3,
    hidden_size=32,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    intermediate_size=48,
    dtype="float16",
)
# (module, layer, rank) in the order of the file: not sorted, ranks differ so rows need padding.
ROWS = [("mlp_4h_to_h", 2, 3), ("attn_q", 0, 2), ("attn_v", 1, 4), ("mlp_gate", 0, 1), ("attn_dense", 2, 2)]
TRT_BF16 = np.dtype("V2", metadata={"dtype": "bfloat16"})  # tensorrt_llm._utils.np_bfloat16
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def torch_to_numpy(t: torch.Tensor) -> np.ndarray:
    """tensorrt_llm._utils.torch_to_numpy."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(TRT_BF16)
    return t.numpy()


def source_weights(seed: int = 0) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for module, layer, rank in ROWS:
        d_in, d_out = SPEC.module_dims(module)
        out[(layer, module)] = (torch.randn(rank, d_in, generator=g), torch.randn(d_out, rank, generator=g))
    return out


def trtllm_arrays(dtype: torch.dtype, columns: int = 4, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """weights `[N, W]` and config `[N, columns]` as hf_lora_convert lays them out."""
    src = source_weights(seed)
    rows, config = [], []
    for module, layer, rank in ROWS:
        a, b = src[(layer, module)]
        rows.append(torch.cat([a.flatten(), b.flatten()]).to(dtype))
        config.append([MODULE_IDS[module], layer, rank, 0][:columns])
    width = max(len(r) for r in rows)
    weights = torch.stack([torch.nn.functional.pad(r, (0, width - len(r))) for r in rows])
    return weights, np.array(config, dtype=np.int32)


def write_dir(
    d: Path, weights, config, *, weights_name="model.lora_weights.npy", config_name="model.lora_config.npy"
):
    d.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "metadata on a dtype is not saved", as in TensorRT-LLM itself
        for name, arr in ((weights_name, weights), (config_name, config)):
            if name.endswith(".bin"):
                arr.tofile(d / name)
            else:
                np.save(d / name, arr)
    return d


def assert_holds_source(adapter: LoraAdapter, dtype: torch.dtype, seed: int = 0) -> None:
    src = source_weights(seed)
    assert sorted(adapter.weights) == sorted(src)
    for key, w in adapter:
        a, b = src[key]
        assert w.scale == 1.0 and w.a.dtype == dtype
        assert torch.equal(w.a.view(torch.uint8), a.to(dtype).view(torch.uint8)), key
        assert torch.equal(w.b.view(torch.uint8), b.to(dtype).contiguous().view(torch.uint8)), key
