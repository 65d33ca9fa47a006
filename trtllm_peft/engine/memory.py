"""The memory plan: how an engine's memory budget is split, printed at build and at start.

Order of claims follows TensorRT-LLM 1.x (trtllm_lora.md §4.2: the PEFT cache is created before the KV
cache, which gets what is left): weights, PEFT device cache, PEFT host cache (counted in the budget only
when host and device share memory, as on CPU), LoRA activations (∝ max_batch_size × max_lora_rank),
other activations, then the KV cache from the remainder.

PEFT capacities use TensorRT-LLM's official recipe (`_TrtLLM._build_model`, tensorrt_llm/llmapi/llm.py):
`num_device_module_layer = max_lora_rank × num_layers × num_modules × max_loras`, in rank-units (one
module-layer row of rank 1); a unit is priced at the widest module (in + out), like TensorRT-LLM's max1d.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from trtllm_peft.errors import EngineError
from trtllm_peft.executor.api import PeftCacheConfig
from trtllm_peft.lora.spec import DTYPES, ModelSpec

GIB = 1024**3


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per use; `kv_slots` sequences of `max_seq_len` tokens fit in the KV cache."""

    budget_bytes: int
    weights_bytes: int
    peft_device_bytes: int
    peft_host_bytes: int
    lora_activation_bytes: int
    activation_bytes: int
    kv_bytes: int
    kv_bytes_per_token: int
    kv_slots: int
    max_seq_len: int
    num_device_module_layer: int
    num_host_module_layer: int
    host_in_budget: bool

    @property
    def used_bytes(self) -> int:
        host = self.peft_host_bytes if self.host_in_budget else 0
        fixed = (
            self.weights_bytes + self.peft_device_bytes + self.lora_activation_bytes + self.activation_bytes
        )
        return fixed + host + self.kv_bytes

    def to_dict(self) -> dict[str, int | bool]:
        return asdict(self)

    def table(self) -> str:
        """A human-readable breakdown (printed by `trtllm-peft build` and at executor start)."""
        rows = [
            ("weights", self.weights_bytes, ""),
            ("PEFT device cache", self.peft_device_bytes, f"{self.num_device_module_layer:,} rank-units"),
            (
                "PEFT host cache",
                self.peft_host_bytes,
                f"{self.num_host_module_layer:,} rank-units" + ("" if self.host_in_budget else ", host RAM"),
            ),
            ("LoRA activations", self.lora_activation_bytes, "∝ max_batch_size × max_lora_rank"),
            ("other activations", self.activation_bytes, ""),
            ("KV cache", self.kv_bytes, f"{self.kv_slots} sequences × {self.max_seq_len} tokens"),
        ]
        lines = [f"  {name:<18} {b / 2**20:>10.1f} MiB  {note}" for name, b, note in rows]
        lines.append(
            f"  {'total':<18} {self.used_bytes / 2**20:>10.1f} MiB  of a {self.budget_bytes / 2**20:.0f} MiB budget"
        )
        return "memory plan:\n" + "\n".join(lines)


def num_module_layers(spec: ModelSpec, max_lora_rank: int, num_loras: int) -> int:
    """TensorRT-LLM's recipe: rank × layers × modules × adapters (in rank-units)."""
    return max_lora_rank * spec.num_layers * len(spec.lora_target_modules) * num_loras


def unit_bytes(spec: ModelSpec) -> int:
    """Bytes of one rank-unit, priced at the widest module like TensorRT-LLM's max1d."""
    widest = (
        max(sum(spec.module_dims(m)) for m in spec.lora_target_modules) if spec.lora_target_modules else 0
    )
    return widest * DTYPES[spec.dtype].itemsize


def peft_cache_config(
    spec: ModelSpec, *, max_lora_rank: int, max_gpu_loras: int, max_cpu_loras: int
) -> PeftCacheConfig:
    """The PeftCacheConfig both executors get: capacities in rank-units, one page = one max-rank adapter."""
    return PeftCacheConfig(
        num_host_module_layer=num_module_layers(spec, max_lora_rank, max_cpu_loras),
        num_device_module_layer=num_module_layers(spec, max_lora_rank, max_gpu_loras),
        optimal_adapter_size=max_lora_rank,
        max_adapter_size=max_lora_rank,
    )


def weights_bytes(spec: ModelSpec, *, tied: bool) -> int:
    """Parameter bytes of a Llama-family model with this geometry."""
    h, i, v = spec.hidden_size, spec.intermediate_size, spec.vocab_size
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h
    params = spec.num_layers * per_layer + v * h * (1 if tied else 2) + h
    return params * DTYPES[spec.dtype].itemsize


def plan_memory(
    spec: ModelSpec,
    *,
    max_batch_size: int,
    max_seq_len: int,
    max_gpu_loras: int,
    max_cpu_loras: int,
    budget_bytes: int,
    host_in_budget: bool = True,
    tied_embeddings: bool = False,
) -> MemoryPlan:
    """Split `budget_bytes`; raise EngineError when not even one sequence's KV cache fits."""
    isz = DTYPES[spec.dtype].itemsize
    rank = spec.max_lora_rank
    n_dev = num_module_layers(spec, rank, max_gpu_loras)
    n_host = num_module_layers(spec, rank, max_cpu_loras)
    ub = unit_bytes(spec)
    # LoRA intermediates per projection group: x·Aᵀ [tokens, distinct adapters × rank × parts] plus its mask.
    distinct = min(max_batch_size, max_gpu_loras)
    lora_act = (max_batch_size * distinct + max_seq_len) * rank * 3 * 2 * isz
    # Prefill of one whole sequence: the widest activation [seq, 2·intermediate] a few times, and fp32 logits.
    act = max_seq_len * (2 * spec.intermediate_size + 4 * spec.hidden_size) * isz * 2
    act += max_batch_size * spec.vocab_size * 4 * 2
    kv_per_token = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * isz
    plan = dict(
        budget_bytes=budget_bytes,
        weights_bytes=weights_bytes(spec, tied=tied_embeddings),
        peft_device_bytes=n_dev * ub,
        peft_host_bytes=n_host * ub,
        lora_activation_bytes=lora_act,
        activation_bytes=act,
        kv_bytes_per_token=kv_per_token,
        max_seq_len=max_seq_len,
        num_device_module_layer=n_dev,
        num_host_module_layer=n_host,
        host_in_budget=host_in_budget,
    )
    fixed = sum(
        plan[k] for k in ("weights_bytes", "peft_device_bytes", "lora_activation_bytes", "activation_bytes")
    )
    fixed += plan["peft_host_bytes"] if host_in_budget else 0
    free = budget_bytes - fixed
    per_seq = kv_per_token * max_seq_len
    slots = min(max_batch_size, max(free, 0) // per_seq)
    if slots < 1:
        raise EngineError(
            f"memory budget {budget_bytes / GIB:.2f} GiB leaves {max(free, 0) / 2**20:.0f} MiB for the KV cache, "
            f"less than one {max_seq_len}-token sequence ({per_seq / 2**20:.1f} MiB): lower NIM_MAX_GPU_LORAS / "
            "NIM_MAX_CPU_LORAS / NIM_MAX_LORA_RANK or --max-seq-len, or raise the budget"
        )
    return MemoryPlan(kv_bytes=slots * per_seq, kv_slots=int(slots), **plan)


def default_budget_bytes(device: str = "cpu") -> int:
    """90% of free GPU memory, or half of the available RAM on CPU."""
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info()
        return int(free * 0.9)
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        avail = 8 * GIB
    return int(avail * 0.5)
