"""Configuration and statistics types of `tensorrt_llm.bindings.executor` (TensorRT-LLM 1.2).

Signatures copy cpp/tensorrt_llm/nanobind/executor/executorConfig.cpp (KvCacheConfig, PeftCacheConfig,
GuidedDecodingConfig, ExecutorConfig) and bindings.cpp (IterationStats, InflightBatchingStats).
"""

from __future__ import annotations

import enum
from typing import Any

from tests.trtllm_standin.types import check, float_arg, int_arg


class KvCacheConfig:
    """KvCacheConfig(enable_block_reuse=True, max_tokens=None, max_attention_window=None, sink_token_length=None,
    free_gpu_memory_fraction=None, …): positional-or-keyword up to event_buffer_max_size."""

    def __init__(
        self,
        enable_block_reuse=True,
        max_tokens=None,
        max_attention_window=None,
        sink_token_length=None,
        free_gpu_memory_fraction=None,
        host_cache_size=None,
        onboard_blocks=True,
        cross_kv_cache_fraction=None,
        secondary_offload_min_priority=None,
        event_buffer_max_size=0,
        *,
        enable_partial_reuse=True,
        copy_on_partial_reuse=True,
        use_uvm=False,
        runtime_defaults=None,
    ):
        float_arg("free_gpu_memory_fraction", free_gpu_memory_fraction)
        int_arg("max_tokens", max_tokens, optional=True, minimum=1)
        if not isinstance(enable_block_reuse, bool):
            raise TypeError(f"incompatible function arguments: enable_block_reuse={enable_block_reuse!r}")
        self.enable_block_reuse, self.max_tokens = enable_block_reuse, max_tokens
        self.free_gpu_memory_fraction = free_gpu_memory_fraction


class PeftCacheConfig:
    """PeftCacheConfig(num_host_module_layer=0, …, lora_prefetch_dir=None), read-only properties."""

    FIELDS = (
        ("num_host_module_layer", 0),
        ("num_device_module_layer", 0),
        ("optimal_adapter_size", 8),
        ("max_adapter_size", 64),
        ("num_put_workers", 1),
        ("num_ensure_workers", 1),
        ("num_copy_streams", 1),
        ("max_pages_per_block_host", 24),
        ("max_pages_per_block_device", 8),
    )

    def __init__(
        self,
        num_host_module_layer=0,
        num_device_module_layer=0,
        optimal_adapter_size=8,
        max_adapter_size=64,
        num_put_workers=1,
        num_ensure_workers=1,
        num_copy_streams=1,
        max_pages_per_block_host=24,
        max_pages_per_block_device=8,
        device_cache_percent=None,
        host_cache_size=None,
        lora_prefetch_dir=None,
    ):
        values = dict(locals())
        for name, _ in self.FIELDS:
            int_arg(name, values[name], minimum=0)  # SizeType32
        float_arg("device_cache_percent", device_cache_percent)
        int_arg("host_cache_size", host_cache_size, optional=True, minimum=0)
        self._v = {k: v for k, v in values.items() if k != "self"}

    def __getattr__(self, name: str) -> Any:
        v = self.__dict__.get("_v", {})
        if name in v:
            return v[name]
        raise AttributeError(name)


class GuidedDecodingConfig:
    """GuidedDecodingConfig(backend, encoded_vocab=None, tokenizer_str=None, stop_token_ids=None) with the
    nested enum GuidedDecodingBackend; the executor validates it (executorConfig.cpp
    GuidedDecodingConfig::validate(): xgrammar needs the encoded vocab)."""

    class GuidedDecodingBackend(enum.Enum):
        XGRAMMAR = 0
        LLGUIDANCE = 1

    def __init__(self, backend, encoded_vocab=None, tokenizer_str=None, stop_token_ids=None):
        if not isinstance(backend, GuidedDecodingConfig.GuidedDecodingBackend):
            raise TypeError("incompatible function arguments: backend must be a GuidedDecodingBackend")
        if encoded_vocab is not None and not (
            isinstance(encoded_vocab, list) and all(isinstance(t, str) for t in encoded_vocab)
        ):
            raise TypeError("incompatible function arguments: encoded_vocab must be a list of str")
        if stop_token_ids is not None:
            for t in stop_token_ids:
                int_arg("stop_token_ids", t)
        self.backend, self.encoded_vocab = backend, encoded_vocab
        self.tokenizer_str, self.stop_token_ids = tokenizer_str, stop_token_ids

    def validate(self) -> None:
        if self.backend is GuidedDecodingConfig.GuidedDecodingBackend.XGRAMMAR:
            check(
                self.encoded_vocab is not None,
                "Guided decoding is enabled with xgrammar, but EncodedVocab is not set",
                "cpp/tensorrt_llm/executor/executorConfig.cpp",
            )


class ExecutorConfig:
    """ExecutorConfig(max_beam_width=1, scheduler_config=…, kv_cache_config=…, …, peft_cache_config=…, …)."""

    def __init__(
        self,
        max_beam_width=1,
        scheduler_config=None,
        kv_cache_config=None,
        enable_chunked_context=False,
        normalize_log_probs=True,
        iter_stats_max_iterations=1000,
        request_stats_max_iterations=0,
        batching_type=None,
        max_batch_size=None,
        max_num_tokens=None,
        parallel_config=None,
        peft_cache_config=None,
        logits_post_processor_config=None,
        decoding_config=None,
        use_gpu_direct_storage=False,
        gpu_weights_percent=1.0,
        max_queue_size=None,
        extended_runtime_perf_knob_config=None,
        debug_config=None,
        recv_poll_period_ms=0,
        max_seq_idle_microseconds=180000000,
        spec_dec_config=None,
        guided_decoding_config=None,
        additional_model_outputs=None,
        cache_transceiver_config=None,
        gather_generation_logits=False,
        mm_embedding_offloading=False,
        enable_trt_overlap=False,
    ):
        int_arg("max_beam_width", max_beam_width, minimum=1)
        int_arg("max_queue_size", max_queue_size, optional=True)
        for name, value, cls in (
            ("kv_cache_config", kv_cache_config, KvCacheConfig),
            ("peft_cache_config", peft_cache_config, PeftCacheConfig),
            ("guided_decoding_config", guided_decoding_config, GuidedDecodingConfig),
        ):
            if value is not None and not isinstance(value, cls):
                raise TypeError(f"incompatible function arguments: {name} must be a {cls.__name__}")
        self.max_beam_width, self.max_queue_size = max_beam_width, max_queue_size
        self.enable_chunked_context = bool(enable_chunked_context)
        self.kv_cache_config = kv_cache_config or KvCacheConfig()
        self.peft_cache_config = peft_cache_config or PeftCacheConfig()
        if not isinstance(gather_generation_logits, bool):
            raise TypeError(
                f"incompatible function arguments: gather_generation_logits={gather_generation_logits!r}"
            )
        self.gather_generation_logits = gather_generation_logits
        self.guided_decoding_config = guided_decoding_config


class InflightBatchingStats:
    def __init__(self) -> None:
        self.num_scheduled_requests = self.num_context_requests = self.num_gen_requests = 0
        self.num_paused_requests = self.num_ctx_tokens = self.micro_batch_id = 0
        self.avg_num_decoded_tokens_per_iter = 0.0


class KvCacheStats:
    """KvCacheStats(): bindings.cpp (1.2) def_readwrite of executor::KvCacheStats (types.h)."""

    def __init__(self) -> None:
        self.max_num_blocks = self.free_num_blocks = self.used_num_blocks = self.tokens_per_block = 0
        self.alloc_total_blocks = self.alloc_new_blocks = self.reused_blocks = self.missed_blocks = 0
        self.cache_hit_rate = 0.0


class IterationStats:
    """IterationStats(): the fields bindings.cpp exposes (no PEFT cache fields in 1.2)."""

    def __init__(self) -> None:
        self.timestamp, self.iter, self.iter_latency_ms = "", 0, 0.0
        self.new_active_requests_queue_latency_ms = 0.0
        self.num_new_active_requests = self.num_active_requests = self.num_queued_requests = 0
        self.num_completed_requests = self.max_num_active_requests = 0
        self.gpu_mem_usage = self.cpu_mem_usage = self.pinned_mem_usage = 0
        self.kv_cache_stats = self.cross_kv_cache_stats = self.static_batching_stats = None
        self.inflight_batching_stats: InflightBatchingStats | None = InflightBatchingStats()
        self.specdec_stats = None
