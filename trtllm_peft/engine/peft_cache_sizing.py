"""TensorRT-LLM's PEFT-cache page arithmetic, and `PeftCacheConfig` sized so N max-rank adapters fit exactly.

TensorRT-LLM stores adapters in pages (cpp/tensorrt_llm/batch_manager/peftCacheManager.cpp,
`PeftCacheManager::getPageManagerConfig` / `getMaxNumSlots`; cpp/tensorrt_llm/runtime/loraCache.cpp,
`LoraCache::determineNumPages`). With `oneD(m) = in(m) + out(m)` over the engine's LoRA modules and `L` layers:

    page_width     = min oneD(m)                       elements per slot
    slots_per_page = max(optimal · L · Σ ceil(oneD(m) / page_width),  ceil(max_adapter · max oneD / page_width))
    slots          = num_*_module_layer · ceil(max oneD / page_width)      (when num_*_module_layer > 0)
    pages          = ceil(slots / slots_per_page)
    a row of rank r takes ceil(r · oneD(m) / page_width) slots; rows fill pages in order, never split

So with `optimal_adapter_size = max_adapter_size = R` (NIM's recipe, the default here) one page holds exactly
one adapter of rank ≤ R on every module and layer: N pages = N adapters, whatever their rank. This module
picks `num_*_module_layer` so that the page count is exactly N (TensorRT-LLM's own recipe in
`_TrtLLM._build_model` over-provisions by ~1.5×; engine/memory.py keeps that recipe for the reference engine).
A smaller `optimal_adapter_size` makes pages smaller, so low-rank adapters take fewer pages (NIM's "8 rank-64
= 32 rank-16" example holds with optimal 16 on Llama-3-8B) at the cost of page fragmentation.

Tensor parallelism is 1 (the engines here are single-GPU): local dims equal global dims.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from trtllm_peft.engine.memory import GIB
from trtllm_peft.errors import EngineError
from trtllm_peft.executor.api import PeftCacheConfig
from trtllm_peft.lora.spec import DTYPES, ModelSpec

MIB = 2**20


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def module_in_out(spec: ModelSpec, module: str) -> tuple[int, int]:
    """(in, out) of a module as `LoraModule::createLoraModules` (cpp/tensorrt_llm/runtime/loraModule.cpp)
    defines them; note attn_dense is (hidden, hidden) there, not (heads·head_dim, hidden)."""
    if module == "attn_dense":
        return spec.hidden_size, spec.hidden_size
    return spec.module_dims(module)


def module_one_d(spec: ModelSpec, module: str) -> int:
    """in + out of a module: the elements one rank of it takes in a page."""
    return sum(module_in_out(spec, module))


@dataclass(frozen=True)
class PageGeometry:
    """One cache's page layout (getPageManagerConfig); sizes in elements of the engine dtype."""

    module_one_d: dict[str, int]
    num_layers: int
    optimal_adapter_size: int
    max_adapter_size: int
    dtype_bytes: int

    @property
    def page_width(self) -> int:
        return min(self.module_one_d.values())

    @property
    def max_one_d(self) -> int:
        return max(self.module_one_d.values())

    @property
    def total_one_d(self) -> int:
        return sum(self.module_one_d.values())

    @property
    def slots_per_page(self) -> int:
        per_layer = sum(_ceil_div(d, self.page_width) for d in self.module_one_d.values())
        total = self.optimal_adapter_size * per_layer * self.num_layers
        return max(total, _ceil_div(self.max_adapter_size * self.max_one_d, self.page_width))

    @property
    def slots_per_module_layer(self) -> int:
        """Slots one unit of `num_*_module_layer` buys (getMaxNumSlots: ceil(max1d / pageWidth))."""
        return _ceil_div(self.max_one_d, self.page_width)

    @property
    def page_bytes(self) -> int:
        return self.slots_per_page * self.page_width * self.dtype_bytes

    @property
    def max_lora_size(self) -> int:
        """Elements of one max-rank adapter on every module and layer (the C++ `maxLoraSize`)."""
        return self.max_adapter_size * self.total_one_d * self.num_layers

    @property
    def min_total_slots(self) -> int:
        """Fewest slots a cache may have: TensorRT-LLM refuses to start below this."""
        return _ceil_div(self.max_lora_size, self.page_width)

    def row_slots(self, module: str, rank: int) -> int:
        """Slots one config row takes: ceil(LoraModule::localInOutSize / pageWidth). No DoRA rows here."""
        return _ceil_div(rank * self.module_one_d[module], self.page_width)

    def pages_for_rows(self, rows: Iterable[tuple[str, int]]) -> int:
        """Pages an adapter with these (module, rank) rows takes, packed in order (determineNumPages)."""
        page, slot, per_page = 0, 0, self.slots_per_page
        for module, rank in rows:
            need = self.row_slots(module, rank)
            if slot + need > per_page:
                page, slot = page + 1, 0
            slot += need
        return page + 1


def page_geometry(spec: ModelSpec, *, optimal_adapter_size: int, max_adapter_size: int) -> PageGeometry:
    """Page layout of the engine `spec`; sizes clamped to its max_lora_rank as the PeftCacheManager ctor does."""
    if not spec.lora_target_modules:
        raise EngineError(
            f"{spec.source or 'engine'}: built without LoRA modules (lora_target_modules is empty)"
        )
    return PageGeometry(
        module_one_d={m: module_one_d(spec, m) for m in spec.lora_target_modules},
        num_layers=spec.num_layers,
        optimal_adapter_size=min(optimal_adapter_size, spec.max_lora_rank),
        max_adapter_size=min(max_adapter_size, spec.max_lora_rank),
        dtype_bytes=DTYPES[spec.dtype].itemsize,
    )


def adapter_rows(spec: ModelSpec, rank: int) -> list[tuple[str, int]]:
    """Rows of a rank-`rank` adapter on every target module and layer, in pack() order (layer, module id)."""
    from trtllm_peft.lora.modules import MODULE_IDS

    modules = sorted(spec.lora_target_modules, key=MODULE_IDS.__getitem__)
    return [(m, rank) for _ in range(spec.num_layers) for m in modules]


@dataclass(frozen=True)
class CachePlan:
    """One tier (host or device) as TensorRT-LLM will allocate it."""

    tier: str
    num_module_layer: int
    slots: int
    pages: int
    page_bytes: int
    adapters: int  # adapters of max rank that fit (pages // pages per max-rank adapter)
    trtllm_logged_loras: int  # TensorRT-LLM's own "LoRA <tier> Cache can hold N max sized LoRAs"

    @property
    def bytes(self) -> int:
        """What is allocated: whole pages (LoraCachePageManager::initialize)."""
        return self.pages * self.page_bytes


def cache_plan(geom: PageGeometry, num_module_layer: int, tier: str, pages_per_adapter: int) -> CachePlan:
    """The tier TensorRT-LLM builds from `num_module_layer`; raises its own startup error when too small."""
    slots = num_module_layer * geom.slots_per_module_layer
    if slots < geom.min_total_slots:
        raise EngineError(
            f"Not enough space allocated to {tier} LoRA cache to hold 1 max sized LoRA {slots} < {geom.min_total_slots}"
        )
    pages = _ceil_div(slots, geom.slots_per_page)
    return CachePlan(
        tier=tier,
        num_module_layer=num_module_layer,
        slots=slots,
        pages=pages,
        page_bytes=geom.page_bytes,
        adapters=pages // pages_per_adapter,
        trtllm_logged_loras=pages * geom.slots_per_page * geom.page_width // geom.max_lora_size,
    )


def module_layers_for_pages(geom: PageGeometry, pages: int) -> int:
    """`num_*_module_layer` giving exactly `pages` pages where TensorRT-LLM allows it.

    floor(pages · slots_per_page / slots_per_module_layer) units give slots in (pages·spp − spml, pages·spp],
    hence exactly `pages` pages since spml ≤ spp (a ceil, as in trtllm_lora.md §8, adds a page whenever
    pages·spp is not a multiple of spml). When that is below TensorRT-LLM's one-max-adapter minimum
    (possible only for tiny geometries) the minimum wins and the cache gets a page more.
    """
    units = pages * geom.slots_per_page // geom.slots_per_module_layer
    return max(units, _ceil_div(geom.min_total_slots, geom.slots_per_module_layer))


@dataclass(frozen=True)
class PeftCacheSizing:
    """PeftCacheConfig for N max-rank adapters on the device and M on the host, and what it allocates."""

    geometry: PageGeometry
    pages_per_adapter: int
    device: CachePlan
    host: CachePlan
    config: PeftCacheConfig

    def lines(self) -> list[str]:
        g = self.geometry
        head = (
            f"PEFT cache pages: {g.slots_per_page:,} slots × {g.page_width:,} elements = "
            f"{g.page_bytes / MIB:.1f} MiB; an adapter of rank ≤ {g.max_adapter_size} takes "
            f"{self.pages_per_adapter} page(s) (optimal_adapter_size={g.optimal_adapter_size})"
        )
        return [head] + [
            f"PEFT {p.tier} cache: num_{p.tier}_module_layer={p.num_module_layer:,} → {p.pages} pages, "
            f"{p.bytes / MIB:,.1f} MiB, {p.adapters} adapters of rank {g.max_adapter_size} "
            f"(TensorRT-LLM will log 'can hold {p.trtllm_logged_loras} max sized LoRAs')"
            for p in (self.device, self.host)
        ]


def size_peft_cache(
    spec: ModelSpec, *, max_gpu_loras: int, max_cpu_loras: int, optimal_adapter_size: int | None = None
) -> PeftCacheSizing:
    """Size TensorRT-LLM's PEFT cache from NIM_MAX_GPU_LORAS / NIM_MAX_CPU_LORAS and the engine's max rank.

    `optimal_adapter_size` defaults to the engine's max_lora_rank (one page per adapter, NIM's recipe).
    """
    rank = spec.max_lora_rank
    geom = page_geometry(spec, optimal_adapter_size=optimal_adapter_size or rank, max_adapter_size=rank)
    per_adapter = geom.pages_for_rows(adapter_rows(spec, rank))
    plans = {
        tier: cache_plan(geom, module_layers_for_pages(geom, n * per_adapter), tier, per_adapter)
        for tier, n in (("device", max_gpu_loras), ("host", max_cpu_loras))
    }
    config = PeftCacheConfig(
        num_host_module_layer=plans["host"].num_module_layer,
        num_device_module_layer=plans["device"].num_module_layer,
        optimal_adapter_size=geom.optimal_adapter_size,
        max_adapter_size=geom.max_adapter_size,
    )
    return PeftCacheSizing(geom, per_adapter, plans["device"], plans["host"], config)


def lora_activation_bytes(spec: ModelSpec, *, max_num_tokens: int) -> int:
    """Estimate of the LoRA plugin's intermediates: x·Aᵀ [tokens, max_rank] per module, twice (NIM: the
    space "scales relative to max_batch_size * max_lora_rank"). TensorRT-LLM reserves it inside the engine's
    activation memory; it is logged, not allocated, by us."""
    return (
        2 * max_num_tokens * spec.max_lora_rank * len(spec.lora_target_modules) * DTYPES[spec.dtype].itemsize
    )


def memory_plan_lines(
    sizing: PeftCacheSizing,
    *,
    engine_bytes: int,
    activation_bytes: int,
    free_gpu_bytes: int | None,
    kv_cache_fraction: float,
) -> list[str]:
    """The start-up memory plan, NIM style: what the PEFT caches take and what is left for the KV cache.

    TensorRT-LLM 1.x creates the PEFT cache before the KV cache (TrtGptModelInflightBatching), so the KV
    cache gets `kv_cache_fraction` of the GPU memory free after the engine and the device PEFT cache.
    """
    d, h = sizing.device, sizing.host
    rows = [
        ("engine", engine_bytes, "TensorRT engine file"),
        ("PEFT device cache", d.bytes, f"{d.pages} pages = {d.adapters} adapters (NIM_MAX_GPU_LORAS)"),
        (
            "PEFT host cache",
            h.bytes,
            f"{h.pages} pages = {h.adapters} adapters (NIM_MAX_CPU_LORAS), host RAM",
        ),
        ("LoRA activations", activation_bytes, "estimate, inside the engine's activation memory"),
    ]
    if free_gpu_bytes is not None:
        left = max(free_gpu_bytes - d.bytes - activation_bytes, 0)
        rows.append(("KV cache", int(left * kv_cache_fraction), f"{kv_cache_fraction:.0%} of what is left"))
    lines = [f"  {name:<18} {b / MIB:>10,.1f} MiB  {note}" for name, b, note in rows]
    if free_gpu_bytes is not None:
        lines.append(
            f"  {'free GPU memory':<18} {free_gpu_bytes / MIB:>10,.1f} MiB  before the executor started"
        )
    if free_gpu_bytes is not None and d.bytes + activation_bytes > free_gpu_bytes:
        lines.append(
            f"  WARNING: the device PEFT cache alone needs more than the {free_gpu_bytes / GIB:.1f} GiB free"
        )
    return ["TensorRT-LLM memory plan:", *lines]


# ---- the device cache as a fraction of free GPU memory (tensorrtllm_backend's lora_cache_gpu_memory_fraction) ----
#
# TensorRT-LLM creates the PEFT cache in TrtGptModelInflightBatching's constructor
# (cpp/tensorrt_llm/batch_manager/trtGptModelInflightBatching.cpp) after the engine is deserialised (weights +
# TensorRT's activation memory), after createBuffers() (runtime buffers) and createDecoder(), and before the KV
# cache; PeftCacheManager::getMaxNumSlots then takes `device_cache_percent × (free + pool free)` of *that*
# memory. A fraction computed against the memory free before loading gives fewer pages than asked for.

FREE_MEMORY_MARGIN = 0.10  # the free figure is an estimate: size as if 10% less were free
CUDA_OVERHEAD_BYTES = GIB  # CUDA context, cuBLAS/cuBLASLt workspaces, TensorRT's own reserve (estimate)
FRACTION_DIGITS = 4


@dataclass(frozen=True)
class EngineMemoryEstimate:
    """What is allocated on the GPU before the PEFT cache (documented estimate; TensorRT-LLM logs the real
    figures as "[MemUsageChange] Allocated … for runtime buffers / for decoder")."""

    engine_bytes: int  # the serialised engine (weights dominate): size of the *.engine files
    activation_bytes: int  # TensorRT context memory for max_num_tokens tokens (estimate)
    runtime_bytes: int  # runtime buffers and decoder state for max_batch_size sequences (estimate)
    overhead_bytes: int = CUDA_OVERHEAD_BYTES

    @property
    def total(self) -> int:
        return self.engine_bytes + self.activation_bytes + self.runtime_bytes + self.overhead_bytes

    def lines(self) -> list[str]:
        rows = [
            ("engine", self.engine_bytes),
            ("activations (est.)", self.activation_bytes),
            ("buffers+decoder (est.)", self.runtime_bytes),
            ("CUDA overhead (est.)", self.overhead_bytes),
        ]
        return [f"  {name:<24} {b / MIB:>10,.1f} MiB" for name, b in rows]


def engine_memory_estimate(
    spec: ModelSpec, *, engine_bytes: int, max_batch_size: int, max_seq_len: int, max_num_tokens: int
) -> EngineMemoryEstimate:
    """GPU memory taken before the PEFT cache is made, estimated from the engine's limits.

    Activations: one layer's intermediates for `max_num_tokens` tokens (TensorRT reuses them across layers):
    q/k/v/attention output/residual/norm ≈ 6·hidden plus gate/up/act ≈ 3·intermediate per token in the engine
    dtype, the LoRA plugin's x·Aᵀ, and fp32 logits of the last token of each sequence. Runtime buffers and
    decoder: fp32 logits, probabilities and sampling workspace per sequence (3·vocab·4 bytes) and int32 token
    buffers over max_seq_len (output ids, new tokens, sequence lengths, finished flags: 4 per position).
    """
    itemsize = DTYPES[spec.dtype].itemsize
    per_token = (6 * spec.hidden_size + 3 * spec.intermediate_size) * itemsize
    activations = (
        max_num_tokens * per_token
        + lora_activation_bytes(spec, max_num_tokens=max_num_tokens)
        + max_batch_size * spec.vocab_size * 4
    )
    runtime = max_batch_size * (3 * spec.vocab_size * 4 + 4 * max_seq_len * 4)
    return EngineMemoryEstimate(engine_bytes, activations, runtime)


def device_cache_fraction(
    device_bytes: int, free_after_engine: int, *, margin: float = FREE_MEMORY_MARGIN
) -> float:
    """`lora_cache_gpu_memory_fraction` that gives at least `device_bytes` when TensorRT-LLM applies it to the
    memory free after the engine, buffers and decoder, even if that is `margin` less than `free_after_engine`.
    Rounded up to FRACTION_DIGITS decimals (the backend parses the text with std::stof)."""
    usable = free_after_engine * (1 - margin)
    if usable <= 0:
        raise EngineError("no GPU memory is left for the device LoRA cache after the engine")
    scale = 10**FRACTION_DIGITS
    return math.ceil(device_bytes * scale / usable) / scale
