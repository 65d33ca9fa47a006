"""The memory plan: how an engine's memory budget is split, printed at build and at start.

Order of claims follows TensorRT-LLM 1.x (trtllm_lora.md §4.2: the PEFT cache is created before the KV
cache, which gets what is left): weights, PEFT device cache, PEFT host cache (counted in the budget only
when host and device share memory, as on CPU), LoRA activations (∝ max_batch_size × max_lora_rank),
other activations, then the KV cache from the remainder.

The KV cache is paged (the reference engine's executor/torch/kv/): `KvCacheConfig.max_tokens` and
`free_gpu_memory_fraction` (default 0.9, TensorRT-LLM's) of the remainder bound it, the smaller winning as in
TensorRT-LLM; it never exceeds `max_batch_size × max_seq_len` tokens (more could only ever be idle) and must
hold one `max_seq_len` sequence. Its figure is a ceiling: the pool is reserved, not written, and a page
becomes resident only when a block is first used. `max_batch_size` likewise bounds running requests; it
allocates nothing.

PEFT capacities use TensorRT-LLM's official recipe (`_TrtLLM._build_model`, tensorrt_llm/llmapi/llm.py):
`num_device_module_layer = max_lora_rank × num_layers × num_modules × max_loras`, in rank-units (one
module-layer row of rank 1); a unit is priced at the widest module (in + out), like TensorRT-LLM's max1d.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from trtllm_peft.errors import EngineError
from trtllm_peft.executor.api import KvCacheConfig, PeftCacheConfig
from trtllm_peft.lora.spec import DTYPES, ModelSpec

GIB = 1024**3
DEFAULT_TOKENS_PER_BLOCK = 32  # TensorRT-LLM's plugin_config.tokens_per_block default (plugin.py)
DEFAULT_FREE_FRACTION = 0.9  # KvCacheConfig.free_gpu_memory_fraction's default (executor.h)


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per use; the KV cache holds `kv_num_blocks` blocks of `tokens_per_block` tokens (a ceiling)."""

    budget_bytes: int
    weights_bytes: int
    peft_device_bytes: int
    peft_host_bytes: int
    lora_activation_bytes: int
    activation_bytes: int
    kv_bytes: int
    kv_bytes_per_token: int
    kv_num_blocks: int
    tokens_per_block: int
    max_batch_size: int
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
            (
                "KV cache",
                self.kv_bytes,
                f"up to {self.kv_num_blocks:,} blocks × {self.tokens_per_block} tokens, paged, resident as used",
            ),
        ]
        lines = [f"  {name:<18} {b / 2**20:>10.1f} MiB  {note}" for name, b, note in rows]
        lines.append(
            f"  {'total':<18} {self.used_bytes / 2**20:>10.1f} MiB  of a {self.budget_bytes / 2**20:.0f} MiB budget"
        )
        lines.append(
            f"  max_batch_size {self.max_batch_size} bounds running requests (a ceiling, not an allocation); "
            f"{self.kv_num_blocks * self.tokens_per_block // self.max_seq_len} full "
            f"{self.max_seq_len}-token sequences fit in the KV cache"
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
    tokens_per_block: int = DEFAULT_TOKENS_PER_BLOCK,
    kv_cache_config: KvCacheConfig | None = None,
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
        tokens_per_block=tokens_per_block,
        max_batch_size=max_batch_size,
        max_seq_len=max_seq_len,
        num_device_module_layer=n_dev,
        num_host_module_layer=n_host,
        host_in_budget=host_in_budget,
    )
    fixed = sum(
        plan[k] for k in ("weights_bytes", "peft_device_bytes", "lora_activation_bytes", "activation_bytes")
    )
    fixed += plan["peft_host_bytes"] if host_in_budget else 0
    free = max(budget_bytes - fixed, 0)
    tokens = kv_tokens(free, kv_per_token, max_batch_size * max_seq_len, kv_cache_config or KvCacheConfig())
    blocks = tokens // tokens_per_block
    if blocks * tokens_per_block < max_seq_len:
        raise EngineError(
            f"memory budget {budget_bytes / GIB:.2f} GiB leaves {free / 2**20:.0f} MiB for the KV cache "
            f"({tokens} tokens), less than one {max_seq_len}-token sequence "
            f"({kv_per_token * max_seq_len / 2**20:.1f} MiB): lower NIM_MAX_GPU_LORAS / NIM_MAX_CPU_LORAS / "
            "NIM_MAX_LORA_RANK or --max-seq-len, or raise the budget or KvCacheConfig.max_tokens"
        )
    return MemoryPlan(kv_bytes=blocks * tokens_per_block * kv_per_token, kv_num_blocks=int(blocks), **plan)


def kv_tokens(free_bytes: int, per_token: int, ceiling: int, config: KvCacheConfig) -> int:
    """Tokens of KV cache: the smaller of `max_tokens` and the fraction of `free_bytes`, at most `ceiling`."""
    fraction = config.free_gpu_memory_fraction
    tokens = int(free_bytes * (DEFAULT_FREE_FRACTION if fraction is None else fraction)) // per_token
    if config.max_tokens is not None:
        tokens = min(tokens, config.max_tokens)
    return min(tokens, ceiling)


def default_budget_bytes(device: str = "cpu", meminfo: str = "/proc/meminfo") -> int:
    """90% of free GPU memory, or half of the available RAM on CPU."""
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info()
        return int(free * 0.9)
    return int(available_ram(meminfo) * 0.5)


def available_ram(meminfo: str = "/proc/meminfo") -> int:
    """Bytes of RAM a new process can take: the kernel's MemAvailable, which counts the page cache it would
    drop. Free pages alone (sysconf's AVPHYS_PAGES) are a fraction of that on any machine that has read files
    lately (after reading an engine or a model: 3 of 20 GB here), and a budget from them refused to start."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:  # no /proc (not Linux) or no MemAvailable (kernel < 3.14)
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 8 * GIB
