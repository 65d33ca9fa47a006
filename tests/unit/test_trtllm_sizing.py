"""TensorRT-LLM's PEFT-cache page arithmetic against values computed by hand (trtllm_lora.md §8).

Llama-3-8B: hidden 4096, 32 heads, 8 kv heads, head_dim 128, intermediate 14336, 32 layers, bf16, the seven
modules. in+out per module (loraModule.cpp): q, o 8192; k, v 5120; gate, up, down 18432 → page width 5120,
max 18432, total 81920; Σ ceil(oneD/5120) per layer = 2+1+1+2+4+4+4 = 18.
"""

from __future__ import annotations

import math

import pytest

from trtllm_peft.engine.memory import num_module_layers
from trtllm_peft.engine.peft_cache_sizing import (
    FREE_MEMORY_MARGIN,
    adapter_rows,
    cache_plan,
    device_cache_fraction,
    engine_memory_estimate,
    lora_activation_bytes,
    memory_plan_lines,
    module_in_out,
    module_layers_for_pages,
    page_geometry,
    size_peft_cache,
)
from trtllm_peft.errors import EngineError
from trtllm_peft.lora.spec import ModelSpec

MIB = 2**20
GIB = 2**30
LLAMA3_8B = ModelSpec(
    num_layers=32,
    hidden_size=4096,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    intermediate_size=14336,
    vocab_size=128256,
    dtype="bfloat16",
    max_lora_rank=64,
)
SMOLLM2 = ModelSpec(
    num_layers=30,
    hidden_size=576,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    intermediate_size=1536,
    vocab_size=49152,
    dtype="bfloat16",
    max_lora_rank=32,
)


def test_module_dims_follow_create_lora_modules():
    assert module_in_out(LLAMA3_8B, "attn_q") == (4096, 4096)
    assert module_in_out(LLAMA3_8B, "attn_k") == (4096, 1024)
    assert module_in_out(LLAMA3_8B, "attn_dense") == (4096, 4096)
    assert module_in_out(LLAMA3_8B, "mlp_4h_to_h") == (14336, 4096)
    # attn_dense is (hidden, hidden) in TensorRT-LLM even when heads·head_dim differs from hidden
    odd = ModelSpec(
        num_layers=1, hidden_size=64, num_heads=4, num_kv_heads=4, head_dim=32, intermediate_size=96
    )
    assert module_in_out(odd, "attn_dense") == (64, 64)


def test_llama3_8b_page_geometry():
    g = page_geometry(LLAMA3_8B, optimal_adapter_size=64, max_adapter_size=64)
    assert (g.page_width, g.max_one_d, g.total_one_d) == (5120, 18432, 81920)
    assert g.slots_per_page == 64 * 18 * 32 == 36864
    assert g.slots_per_module_layer == 4  # ceil(18432 / 5120)
    assert g.page_bytes == 36864 * 5120 * 2 == 360 * MIB
    assert g.min_total_slots == 64 * 81920 * 32 // 5120 == 32768
    # a rank-64 row: q ceil(64·8192/5120) = 103, k 64, v 64, o 103, each MLP ceil(64·18432/5120) = 231
    assert [g.row_slots(m, 64) for m in ("attn_q", "attn_k", "attn_v", "attn_dense", "mlp_gate")] == [
        103,
        64,
        64,
        103,
        231,
    ]
    assert g.pages_for_rows(adapter_rows(LLAMA3_8B, 64)) == 1  # 32 × 1027 = 32864 ≤ 36864


def test_sizes_are_clamped_to_the_engine_rank():
    g = page_geometry(LLAMA3_8B, optimal_adapter_size=128, max_adapter_size=256)
    assert (g.optimal_adapter_size, g.max_adapter_size) == (64, 64)


def test_llama3_8b_exactly_n_adapters_one_page_each():
    s = size_peft_cache(LLAMA3_8B, max_gpu_loras=8, max_cpu_loras=16)
    c = s.config
    assert (c.optimal_adapter_size, c.max_adapter_size) == (64, 64)
    assert c.num_device_module_layer == 8 * 36864 // 4 == 73728
    assert c.num_host_module_layer == 16 * 36864 // 4 == 147456
    assert (s.device.pages, s.device.adapters, s.host.pages, s.host.adapters) == (8, 8, 16, 16)
    assert s.device.bytes == 8 * 360 * MIB == 3_019_898_880
    assert s.host.bytes == 16 * 360 * MIB
    # TensorRT-LLM's own log line divides by the rank-64 data size (320 MiB), not by pages: it says 9 and 18
    assert (s.device.trtllm_logged_loras, s.host.trtllm_logged_loras) == (9, 18)


def test_official_recipe_over_provisions():
    """`_TrtLLM._build_model`'s rank × layers × modules × loras buys 13 pages for 8 adapters."""
    g = page_geometry(LLAMA3_8B, optimal_adapter_size=64, max_adapter_size=64)
    official = cache_plan(g, num_module_layers(LLAMA3_8B, 64, 8), "device", 1)
    assert official.num_module_layer == 64 * 32 * 7 * 8 == 114688
    assert official.pages == 13  # ceil(458752 / 36864)
    assert size_peft_cache(LLAMA3_8B, max_gpu_loras=8, max_cpu_loras=8).device.pages == 8


def test_smaller_pages_hold_more_low_rank_adapters():
    """NIM's example: a cache for 8 rank-64 adapters runs 32 rank-16 ones — true with optimal_adapter_size 16."""
    s = size_peft_cache(LLAMA3_8B, max_gpu_loras=8, max_cpu_loras=16, optimal_adapter_size=16)
    g = s.geometry
    assert g.slots_per_page == 16 * 18 * 32 == 9216
    assert s.pages_per_adapter == 4  # 32864 slots packed row by row, 204 wasted per page: 9012+9012+9012+5828
    assert s.device.pages == 32 and s.device.adapters == 8
    assert g.pages_for_rows(adapter_rows(LLAMA3_8B, 16)) == 1  # 32 × 258 = 8256 ≤ 9216: 32 rank-16 adapters


def test_floor_not_ceil_keeps_the_page_count_exact():
    """k (768) and gate (2112) of SmolLM2 at rank 1 on one layer: 4 slots a page, 3 slots a unit."""
    spec = ModelSpec(
        num_layers=1,
        hidden_size=576,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        intermediate_size=1536,
        dtype="bfloat16",
        max_lora_rank=1,
        lora_target_modules=("attn_k", "mlp_h_to_4h"),
    )
    g = page_geometry(spec, optimal_adapter_size=1, max_adapter_size=1)
    assert (g.page_width, g.slots_per_page, g.slots_per_module_layer) == (768, 4, 3)
    assert module_layers_for_pages(g, 2) == 2  # 6 slots → 2 pages; ceil(8 / 3) = 3 units would make 3 pages
    assert cache_plan(g, 2, "device", 1).pages == 2
    # for one page, floor(4 / 3) = 1 unit is below the one-max-adapter minimum (4 slots): 2 units, 2 pages
    assert module_layers_for_pages(g, 1) == 2


def test_too_small_a_cache_fails_with_tensorrt_llm_text():
    g = page_geometry(LLAMA3_8B, optimal_adapter_size=64, max_adapter_size=64)
    with pytest.raises(
        EngineError,
        match=r"Not enough space allocated to device LoRA cache to hold 1 max sized LoRA 32764 < 32768",
    ):
        cache_plan(g, 8191, "device", 1)


def test_smollm2_default_settings():
    s = size_peft_cache(SMOLLM2, max_gpu_loras=8, max_cpu_loras=16)
    g = s.geometry
    # q, o 1152; k, v 768; MLP 2112 → width 768, Σceil = 2+1+1+2+3+3+3 = 15, 32·15·30 = 14400 slots a page
    assert (g.page_width, g.slots_per_page, g.slots_per_module_layer) == (768, 14400, 3)
    assert s.config.num_device_module_layer == 8 * 14400 // 3 == 38400
    assert (s.device.pages, s.host.pages, s.pages_per_adapter) == (8, 16, 1)
    assert s.device.bytes == 8 * 14400 * 768 * 2


def test_engine_without_lora_modules_is_refused():
    with pytest.raises(EngineError, match="without LoRA modules"):
        size_peft_cache(LLAMA3_8B.with_limits(lora_target_modules=()), max_gpu_loras=1, max_cpu_loras=1)


def test_memory_plan_leaves_the_kv_cache_what_is_left():
    s = size_peft_cache(LLAMA3_8B, max_gpu_loras=8, max_cpu_loras=16)
    act = lora_activation_bytes(LLAMA3_8B, max_num_tokens=8192)
    assert act == 2 * 8192 * 64 * 7 * 2
    lines = memory_plan_lines(
        s, engine_bytes=16 * 2**30, activation_bytes=act, free_gpu_bytes=60 * 2**30, kv_cache_fraction=0.9
    )
    kv = int((60 * 2**30 - s.device.bytes - act) * 0.9)
    kv_line = next(line for line in lines if "KV cache" in line)
    assert f"{kv / MIB:,.1f} MiB" in kv_line
    assert any("2,880.0 MiB" in line and "8 adapters" in line for line in lines)
    none = memory_plan_lines(
        s, engine_bytes=0, activation_bytes=act, free_gpu_bytes=None, kv_cache_fraction=0.9
    )
    assert not any("KV cache" in line for line in none)  # no GPU measured: no KV figure invented
    tight = memory_plan_lines(
        s, engine_bytes=0, activation_bytes=act, free_gpu_bytes=2**30, kv_cache_fraction=0.9
    )
    assert "WARNING" in tight[-1]


# ---- lora_cache_gpu_memory_fraction: against the memory free after engine, buffers and decoder ----


def device_pages_from_fraction(sizing, fraction: float, free: float) -> int:
    """PeftCacheManager::getMaxNumSlots with a percent: slots = percent × free / (page width × bytes); pages."""
    g = sizing.geometry
    slots = int(fraction * free) // (g.page_width * g.dtype_bytes)
    return -(-slots // g.slots_per_page)


def test_engine_memory_estimate_by_hand():
    est = engine_memory_estimate(
        LLAMA3_8B, engine_bytes=16 * GIB, max_batch_size=64, max_seq_len=8192, max_num_tokens=8192
    )
    per_token = (6 * 4096 + 3 * 14336) * 2  # bf16 intermediates of one layer
    lora = 2 * 8192 * 64 * 7 * 2  # x·Aᵀ for 7 modules, twice
    assert est.activation_bytes == 8192 * per_token + lora + 64 * 128256 * 4 == 1_154_809_856
    assert est.runtime_bytes == 64 * (3 * 128256 * 4 + 4 * 8192 * 4) == 106_889_216
    assert est.total == 16 * GIB + 1_154_809_856 + 106_889_216 + GIB


def test_fraction_of_memory_before_loading_gives_too_few_adapters_and_ours_gives_all():
    """The issue's case: Llama-3-8B on an 80 GB GPU, NIM_MAX_GPU_LORAS=8 (8 pages of 360 MiB)."""
    sizing = size_peft_cache(LLAMA3_8B, max_gpu_loras=8, max_cpu_loras=16)
    assert sizing.device.pages == 8 and sizing.device.bytes == 8 * 360 * MIB
    free_before = 79 * GIB
    est = engine_memory_estimate(
        LLAMA3_8B, engine_bytes=16 * GIB, max_batch_size=64, max_seq_len=8192, max_num_tokens=8192
    )
    free_after = free_before - est.total  # what TensorRT-LLM applies the fraction to
    naive = device_cache_fraction(sizing.device.bytes, free_before, margin=0)
    assert naive == 0.0357 and device_pages_from_fraction(sizing, naive, free_after) == 7  # not 8
    ours = device_cache_fraction(sizing.device.bytes, free_after)
    assert ours == math.ceil(8 * 360 * MIB * 10**4 / (free_after * 0.9)) / 10**4
    assert device_pages_from_fraction(sizing, ours, free_after) >= 8
    assert device_pages_from_fraction(sizing, ours, free_after * (1 - FREE_MEMORY_MARGIN)) >= 8  # the margin
    assert device_pages_from_fraction(sizing, ours, free_after) == 9  # the margin's cost: one page at most


@pytest.mark.parametrize("free", [0, -GIB])
def test_no_memory_left_after_the_engine_is_an_error(free):
    with pytest.raises(EngineError, match="no GPU memory is left"):
        device_cache_fraction(GIB, free)
