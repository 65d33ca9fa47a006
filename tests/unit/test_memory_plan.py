"""The memory plan: PEFT sizing by TensorRT-LLM's recipe, KV cache from what remains, clear failures."""

from __future__ import annotations

import pytest

from trtllm_peft.engine import memory
from trtllm_peft.engine.memory import (
    available_ram,
    default_budget_bytes,
    num_module_layers,
    peft_cache_config,
    plan_memory,
    weights_bytes,
)
from trtllm_peft.errors import EngineError
from trtllm_peft.executor.api import KvCacheConfig
from trtllm_peft.lora import ModelSpec

SMOL = ModelSpec(
    num_layers=30,
    hidden_size=576,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    intermediate_size=1536,
    vocab_size=49152,
    dtype="float32",
    max_lora_rank=32,
)


def test_weights_of_smollm2_match_its_134_5m_parameters():
    assert weights_bytes(SMOL, tied=True) / 4 == pytest.approx(134.5e6, rel=0.001)


def test_peft_capacity_follows_tensorrt_llms_recipe():
    cfg = peft_cache_config(SMOL, max_lora_rank=32, max_gpu_loras=8, max_cpu_loras=16)
    assert cfg.num_device_module_layer == 32 * 30 * 7 * 8 == num_module_layers(SMOL, 32, 8)
    assert cfg.num_host_module_layer == 2 * cfg.num_device_module_layer
    assert cfg.optimal_adapter_size == cfg.max_adapter_size == 32


@pytest.mark.parametrize("loras", [1, 4, 16])
def test_kv_cache_gets_what_the_peft_cache_leaves(loras):
    kw = dict(
        max_batch_size=32,
        max_seq_len=2048,
        max_cpu_loras=2 * loras,
        budget_bytes=8 * 2**30,
        tied_embeddings=True,
    )
    plan = plan_memory(SMOL, max_gpu_loras=loras, **kw)
    assert plan.used_bytes <= plan.budget_bytes
    assert plan.kv_bytes == plan.kv_num_blocks * plan.tokens_per_block * plan.kv_bytes_per_token
    if loras > 1:
        smaller = plan_memory(SMOL, max_gpu_loras=1, **{**kw, "max_cpu_loras": 2})
        assert (
            smaller.kv_num_blocks >= plan.kv_num_blocks
            and plan.peft_device_bytes == loras * smaller.peft_device_bytes
        )


def test_lora_activations_grow_with_batch_and_rank():
    base = dict(max_seq_len=256, max_gpu_loras=8, max_cpu_loras=8, budget_bytes=8 * 2**30)
    a = plan_memory(SMOL, max_batch_size=8, **base).lora_activation_bytes
    b = plan_memory(SMOL, max_batch_size=32, **base).lora_activation_bytes
    c = plan_memory(SMOL.with_limits(max_lora_rank=64), max_batch_size=8, **base).lora_activation_bytes
    assert b > a and c == 2 * a


def test_host_cache_outside_the_budget_on_a_gpu():
    kw = dict(max_batch_size=64, max_seq_len=2048, max_gpu_loras=8, max_cpu_loras=32, budget_bytes=4 * 2**30)
    cpu, gpu = plan_memory(SMOL, host_in_budget=True, **kw), plan_memory(SMOL, host_in_budget=False, **kw)
    assert gpu.kv_num_blocks > cpu.kv_num_blocks


def test_a_budget_without_room_for_one_sequence_names_the_knobs():
    with pytest.raises(EngineError, match="NIM_MAX_GPU_LORAS"):
        plan_memory(
            SMOL, max_batch_size=8, max_seq_len=2048, max_gpu_loras=8, max_cpu_loras=16, budget_bytes=2**29
        )


def test_table_lists_every_claim():
    plan = plan_memory(
        SMOL, max_batch_size=8, max_seq_len=512, max_gpu_loras=8, max_cpu_loras=16, budget_bytes=4 * 2**30
    )
    text = plan.table()
    for word in ("weights", "PEFT device cache", "PEFT host cache", "LoRA activations", "KV cache", "total"):
        assert word in text


def test_kv_cache_is_the_smaller_of_max_tokens_and_the_fraction_and_never_past_the_batch_ceiling():
    """KvCacheConfig (executor.h): "If both mMaxTokens and mFreeGpuMemoryFraction are specified, memory
    corresponding to the minimum will be allocated"; more than max_batch_size × max_seq_len is never usable."""
    kw = dict(max_batch_size=4, max_seq_len=512, max_gpu_loras=1, max_cpu_loras=1, tokens_per_block=32)
    roomy = plan_memory(SMOL, budget_bytes=64 * 2**30, **kw)
    assert roomy.kv_num_blocks * 32 == 4 * 512  # the ceiling, not the budget
    capped = plan_memory(SMOL, budget_bytes=64 * 2**30, kv_cache_config=KvCacheConfig(max_tokens=1000), **kw)
    assert capped.kv_num_blocks == 1000 // 32
    tight = dict(budget_bytes=plan_memory(SMOL, budget_bytes=64 * 2**30, **kw).used_bytes, **kw)
    half = plan_memory(SMOL, kv_cache_config=KvCacheConfig(free_gpu_memory_fraction=0.5), **tight)
    both = plan_memory(
        SMOL, kv_cache_config=KvCacheConfig(max_tokens=10**6, free_gpu_memory_fraction=0.5), **tight
    )
    assert half.kv_num_blocks == both.kv_num_blocks < roomy.kv_num_blocks
    with pytest.raises(EngineError, match="one 512-token sequence"):
        plan_memory(SMOL, budget_bytes=64 * 2**30, kv_cache_config=KvCacheConfig(max_tokens=500), **kw)
    assert "a ceiling, not an allocation" in roomy.table() and "resident as used" in roomy.table()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(max_tokens=0), "max_tokens must be >= 1"),
        (dict(free_gpu_memory_fraction=0.0), "free_gpu_memory_fraction must be in"),
        (dict(free_gpu_memory_fraction=1.5), "free_gpu_memory_fraction must be in"),
    ],
)
def test_kv_cache_config_refuses_bad_values_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KvCacheConfig(**kwargs)


@pytest.mark.parametrize(
    ("meminfo", "want"),
    [
        # MemAvailable counts the page cache the kernel would drop: 20 GB here where MemFree is 3 GB
        (
            "MemTotal:       24684032 kB\nMemFree:         3000000 kB\nMemAvailable:   20000000 kB\n",
            20000000 * 1024,
        ),
        ("MemAvailable: 1024 kB\n", 1024 * 1024),
    ],
)
def test_cpu_budget_is_half_of_memavailable_not_of_free_pages(tmp_path, meminfo, want):
    f = tmp_path / "meminfo"
    f.write_text(meminfo)
    assert available_ram(str(f)) == want
    assert default_budget_bytes("cpu", str(f)) == want // 2


@pytest.mark.parametrize("meminfo", [None, "MemTotal: 1 kB\n", "MemAvailable: lots kB\n"])
def test_cpu_budget_without_memavailable_falls_back_to_free_pages(tmp_path, monkeypatch, meminfo):
    f = tmp_path / "meminfo"
    if meminfo is not None:
        f.write_text(meminfo)
    pages = {"SC_AVPHYS_PAGES": 1000, "SC_PAGE_SIZE": 4096}
    monkeypatch.setattr(memory.os, "sysconf", pages.__getitem__)
    assert available_ram(str(f)) == 4096 * 1000
