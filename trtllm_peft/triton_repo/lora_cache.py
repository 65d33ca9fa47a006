"""tensorrtllm_backend's `lora_cache_*` parameters from NIM_MAX_GPU_LORAS / NIM_MAX_CPU_LORAS.

The backend builds its PeftCacheConfig from a byte count (host) and a fraction of free GPU memory (device),
never from `num_*_module_layer` (model_instance_state.cc `getPeftCacheConfigFromParams`, trtllm_lora.md §7).
With `optimal_adapter_size = max_adapter_size = engine max rank` one page holds one adapter of any rank
(engine/peft_cache_sizing.py), so:
* host bytes = exactly NIM_MAX_CPU_LORAS pages: TensorRT-LLM gets slots = bytes / (page width × dtype bytes),
  a whole number of pages;
* GPU fraction = the bytes of NIM_MAX_GPU_LORAS pages over the GPU memory free *after* the engine, runtime
  buffers and decoder are allocated (when TensorRT-LLM makes the cache), less a margin, rounded up:
  at least NIM_MAX_GPU_LORAS adapters fit (peft_cache_sizing.device_cache_fraction).
"""

from __future__ import annotations

from dataclasses import dataclass

from trtllm_peft.engine.peft_cache_sizing import (
    FRACTION_DIGITS,
    PeftCacheSizing,
    device_cache_fraction,
    size_peft_cache,
)
from trtllm_peft.errors import SettingsError
from trtllm_peft.lora.spec import ModelSpec

GIB = 1024**3


@dataclass(frozen=True)
class LoraCacheParams:
    optimal_adapter_size: int
    max_adapter_size: int
    gpu_memory_fraction: float
    host_memory_bytes: int
    sizing: PeftCacheSizing
    gpu_free_after_engine: int  # the figure the fraction was computed against

    def as_parameters(self) -> dict[str, str]:
        return {
            "lora_cache_optimal_adapter_size": str(self.optimal_adapter_size),
            "lora_cache_max_adapter_size": str(self.max_adapter_size),
            "lora_cache_gpu_memory_fraction": f"{self.gpu_memory_fraction:.{FRACTION_DIGITS}f}",
            "lora_cache_host_memory_bytes": str(self.host_memory_bytes),
        }


def lora_cache_params(
    spec: ModelSpec, *, max_gpu_loras: int, max_cpu_loras: int, gpu_free_bytes: int
) -> LoraCacheParams:
    """The backend's parameters for `max_gpu_loras` / `max_cpu_loras` adapters of the engine's max rank;
    `gpu_free_bytes` is the GPU memory free after the engine, runtime buffers and decoder."""
    sizing = size_peft_cache(spec, max_gpu_loras=max_gpu_loras, max_cpu_loras=max_cpu_loras)
    fraction = device_cache_fraction(sizing.device.bytes, gpu_free_bytes) if gpu_free_bytes > 0 else 2.0
    if fraction > 1:
        raise SettingsError(
            f"NIM_MAX_GPU_LORAS={max_gpu_loras}: the device LoRA cache needs {sizing.device.bytes / GIB:.2f} GiB, "
            f"more than the {gpu_free_bytes / GIB:.2f} GiB of GPU memory free after the engine (less a margin)"
        )
    geom = sizing.geometry
    return LoraCacheParams(
        optimal_adapter_size=geom.optimal_adapter_size,
        max_adapter_size=geom.max_adapter_size,
        gpu_memory_fraction=fraction,
        host_memory_bytes=sizing.host.pages * geom.page_bytes,
        sizing=sizing,
        gpu_free_after_engine=gpu_free_bytes,
    )
