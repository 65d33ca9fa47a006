"""Our executor api types ↔ TensorRT-LLM 1.2's `tensorrt_llm.bindings.executor` types, both directions.

Pure mapping: `tle` (the bindings module) is passed in, so nothing here imports TensorRT-LLM; executor/trtllm.py
does, and drives the engine. Signatures follow the nanobind bindings: cpp/tensorrt_llm/nanobind/executor/request.cpp
(Request: everything after max_tokens keyword-only; SamplingConfig(beam_width, *, …); LoraConfig(task_id,
weights=None, config=None)), executorConfig.cpp (PeftCacheConfig, KvCacheConfig, GuidedDecodingConfig,
ExecutorConfig).

LoRA tensors go in as TensorRT-LLM wants them (cpp/tensorrt_llm/executor/loraConfig.cpp,
runtime/loraUtils.cpp): 2-D CPU torch tensors, weights `[N, W]` in the engine dtype, config `[N, 4|3]`
int32. The `.npy` files' leading batch dimension of 1 is squeezed; numpy arrays (bfloat16 stored as
numpy 'V2', as TensorRT-LLM's torch_to_numpy writes it) are converted.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from trtllm_peft.engine.peft_cache_sizing import PeftCacheSizing
from trtllm_peft.executor.api import (
    FinishReason,
    GuidedDecodingConfig,
    GuidedDecodingParams,
    IterationStats,
    KvCacheConfig,
    KvCacheStats,
    LoraConfig,
    Request,
    Response,
    Result,
    SamplingConfig,
)

_SAMPLING_ALWAYS = (
    "min_tokens",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "length_penalty",
    "no_repeat_ngram_size",
    "early_stopping",
)
_SAMPLING_RANDOM = (
    "top_k",
    "top_p",
    "top_p_min",
    "top_p_reset_ids",
    "top_p_decay",
    "seed",
    "temperature",
    "min_p",
)


# ---- api → bindings ---------------------------------------------------------------------------------------


def to_torch(x: Any, name: str) -> torch.Tensor:
    """A torch tensor from a tensor or numpy array; numpy 'V2' is bfloat16 (tensorrt_llm/_utils.py np_bfloat16)."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        if x.dtype.kind == "V" and x.dtype.itemsize == 2:
            return torch.from_numpy(np.ascontiguousarray(x).view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(np.ascontiguousarray(x))
    raise TypeError(f"LoRA {name} must be a torch tensor or numpy array, got {type(x).__name__}")


def as_2d(x: Any, name: str) -> torch.Tensor:
    """`[N, W]` from `[N, W]` or the `.npy` files' `[1, N, W]` (TensorRT-LLM's executor takes 2-D only)."""
    t = to_torch(x, name)
    if t.ndim == 3 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 2:
        raise ValueError(f"LoRA {name} must be 2-D [N, …] (or [1, N, …]), got shape {list(t.shape)}")
    return t


def lora_tensors(cfg: LoraConfig, dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(weights `[N, W]` in `dtype`, config `[N, 4|3]` int32), CPU and contiguous, or Nones."""
    w = None if cfg.weights is None else as_2d(cfg.weights, "weights")
    c = None if cfg.config is None else as_2d(cfg.config, "config")
    if (w is None) != (c is None):
        raise ValueError(f"task {cfg.task_id}: LoRA weights and config must be given together")
    if w is None:
        return None, None
    if not w.is_floating_point():
        raise ValueError(f"task {cfg.task_id}: LoRA weights must be floating point, got {w.dtype}")
    if c.is_floating_point() and not torch.equal(c, c.round()):
        raise ValueError(f"task {cfg.task_id}: LoRA config must hold integers")
    if w.shape[0] != c.shape[0] or c.shape[1] not in (3, 4):
        raise ValueError(
            f"task {cfg.task_id}: LoRA weights {list(w.shape)} and config {list(c.shape)} disagree "
            "(need [N, W] and [N, 4] or [N, 3])"
        )
    weights = w.detach().to(device="cpu", dtype=dtype).contiguous()  # [N, W]
    config = c.detach().to(device="cpu", dtype=torch.int32).contiguous()  # [N, 4|3]
    return weights, config


def sampling_kwargs(cfg: SamplingConfig) -> dict[str, Any]:
    """Keyword arguments of tle.SamplingConfig. Greedy requests (api: top_k ≤ 1 and top_p = 0, or temperature
    0) send no top_k/top_p/temperature, which is TensorRT-LLM's greedy; penalties apply either way."""
    names = _SAMPLING_ALWAYS + (() if cfg.is_greedy else _SAMPLING_RANDOM)
    return {n: getattr(cfg, n) for n in names if getattr(cfg, n) is not None}


def to_trtllm_request(tle: Any, req: Request, dtype: torch.dtype) -> Any:
    """tle.Request for our Request; ValueError when we or the binding refuse it (its message kept)."""
    weights = config = None
    if req.lora_config is not None:
        weights, config = lora_tensors(req.lora_config, dtype)
    try:
        return _build_request(tle, req, weights, config)
    except (RuntimeError, TypeError) as e:  # TLLM_CHECK failures surface as RuntimeError
        raise ValueError(f"TensorRT-LLM refused the request: {e}") from e


def _build_request(tle: Any, req: Request, weights: torch.Tensor | None, config: torch.Tensor | None) -> Any:
    lora = None if req.lora_config is None else tle.LoraConfig(req.lora_config.task_id, weights, config)
    oc = req.output_config
    return tle.Request(
        list(req.input_token_ids),
        int(req.max_tokens),
        streaming=req.streaming,
        sampling_config=tle.SamplingConfig(1, **sampling_kwargs(req.sampling_config)),
        output_config=tle.OutputConfig(
            return_log_probs=oc.return_log_probs,
            return_context_logits=oc.return_context_logits,
            return_generation_logits=oc.return_generation_logits,
            exclude_input_from_output=oc.exclude_input_from_output,
            return_encoder_output=oc.return_encoder_output,
            return_perf_metrics=oc.return_perf_metrics,
        ),
        end_id=req.end_id,
        pad_id=req.pad_id,
        bad_words=req.bad_words,
        stop_words=req.stop_words,
        embedding_bias=_bias(req.embedding_bias),
        lora_config=lora,
        client_id=req.client_id,
        guided_decoding_params=to_trtllm_guided(tle, req.guided_decoding_params),
    )


def to_trtllm_guided(tle: Any, p: GuidedDecodingParams | None) -> Any:
    """tle.GuidedDecodingParams(guide_type, guide) (nanobind/executor/request.cpp), same enum names."""
    if p is None:
        return None
    return tle.GuidedDecodingParams(tle.GuidedDecodingParams.GuideType[p.guide_type.name], p.guide)


def to_trtllm_guided_config(tle: Any, c: GuidedDecodingConfig | None) -> Any:
    """tle.GuidedDecodingConfig(backend, encoded_vocab, tokenizer_str, stop_token_ids) (executorConfig.cpp)."""
    if c is None:
        return None
    return tle.GuidedDecodingConfig(
        tle.GuidedDecodingConfig.GuidedDecodingBackend[c.backend.name],
        encoded_vocab=c.encoded_vocab,
        tokenizer_str=c.tokenizer_str,
        stop_token_ids=c.stop_token_ids,
    )


def _bias(bias: torch.Tensor | None) -> torch.Tensor | None:
    """embedding_bias as the engine takes it: a contiguous CPU float32 [vocab] (the engines' logits dtype)."""
    return None if bias is None else bias.detach().to(device="cpu", dtype=torch.float32).contiguous()


def executor_config(
    tle: Any,
    sizing: PeftCacheSizing,
    *,
    kv_cache_fraction: float,
    max_queue_size: int | None = None,
    kv_cache_config: KvCacheConfig | None = None,
    enable_chunked_context: bool = False,
    gather_generation_logits: bool = False,
    guided_decoding_config: GuidedDecodingConfig | None = None,
) -> Any:
    """tle.ExecutorConfig: beam width 1, our KvCacheConfig (its fraction, else `kv_cache_fraction`), our PEFT
    cache sizing, chunked context as asked, generation logits gathered when the engine was built to, guided
    decoding (xgrammar) when configured. Field for field: the names are TensorRT-LLM's (executor.h)."""
    p = sizing.config
    peft = tle.PeftCacheConfig(
        num_host_module_layer=p.num_host_module_layer,
        num_device_module_layer=p.num_device_module_layer,
        optimal_adapter_size=p.optimal_adapter_size,
        max_adapter_size=p.max_adapter_size,
    )
    kv = kv_cache_config or KvCacheConfig()
    return tle.ExecutorConfig(
        max_beam_width=1,
        kv_cache_config=tle.KvCacheConfig(
            enable_block_reuse=kv.enable_block_reuse,
            max_tokens=kv.max_tokens,
            free_gpu_memory_fraction=kv.free_gpu_memory_fraction or kv_cache_fraction,
        ),
        enable_chunked_context=enable_chunked_context,
        peft_cache_config=peft,
        max_queue_size=max_queue_size,
        gather_generation_logits=gather_generation_logits,
        guided_decoding_config=to_trtllm_guided_config(tle, guided_decoding_config),
    )


# ---- bindings → api ---------------------------------------------------------------------------------------


def _logits(x: Any) -> torch.Tensor | None:
    """A float32 CPU torch tensor of logits returned by the bindings (a torch tensor or numpy array)."""
    return None if x is None else to_torch(x, "logits").detach().to(device="cpu", dtype=torch.float32)


def from_trtllm_response(r: Any) -> Response:
    """Our Response; `error_msg` and `result` are read only when they exist (the C++ getters throw otherwise)."""
    if r.has_error():
        return Response(request_id=r.request_id, error_msg=r.error_msg, client_id=r.client_id)
    res = r.result
    return Response(
        request_id=r.request_id,
        result=Result(
            is_final=bool(res.is_final),
            output_token_ids=[list(beam) for beam in res.output_token_ids],
            finish_reasons=[FinishReason[f.name] for f in res.finish_reasons],
            log_probs=None if res.log_probs is None else [list(b) for b in res.log_probs],
            cum_log_probs=None if res.cum_log_probs is None else list(res.cum_log_probs),
            context_logits=_logits(res.context_logits),
            generation_logits=_logits(res.generation_logits),
            sequence_index=int(res.sequence_index),
            is_sequence_final=bool(res.is_sequence_final),
            decoding_iter=int(res.decoding_iter),
        ),
        client_id=r.client_id,
    )


def from_trtllm_stats(s: Any, active_lora_tasks: int) -> IterationStats:
    """Our IterationStats from tle.IterationStats (LoRA cache membership is not exposed by TensorRT-LLM)."""
    ifb = s.inflight_batching_stats
    return IterationStats(
        timestamp=s.timestamp,
        iter=s.iter,
        iter_latency_ms=s.iter_latency_ms,
        new_active_requests_queue_latency_ms=s.new_active_requests_queue_latency_ms,
        num_new_active_requests=s.num_new_active_requests,
        num_active_requests=s.num_active_requests,
        num_queued_requests=s.num_queued_requests,
        num_completed_requests=s.num_completed_requests,
        max_num_active_requests=s.max_num_active_requests,
        cpu_mem_usage=s.cpu_mem_usage,
        gpu_mem_usage=s.gpu_mem_usage,
        num_context_tokens=ifb.num_ctx_tokens if ifb else 0,
        num_gen_tokens=ifb.num_gen_requests if ifb else 0,
        num_active_lora_tasks=active_lora_tasks,
        kv_cache_stats=from_trtllm_kv_stats(s.kv_cache_stats),
    )


def from_trtllm_kv_stats(kv: Any) -> KvCacheStats | None:
    """tle.KvCacheStats (IterationStats.kv_cache_stats, None without a KV cache manager) as ours: the same
    nine fields (cpp/tensorrt_llm/pybind/executor/bindings.cpp, 1.2: max_num_blocks … cache_hit_rate)."""
    if kv is None:
        return None
    return KvCacheStats(
        max_num_blocks=kv.max_num_blocks,
        free_num_blocks=kv.free_num_blocks,
        used_num_blocks=kv.used_num_blocks,
        tokens_per_block=kv.tokens_per_block,
        alloc_total_blocks=kv.alloc_total_blocks,
        alloc_new_blocks=kv.alloc_new_blocks,
        reused_blocks=kv.reused_blocks,
        missed_blocks=kv.missed_blocks,
        cache_hit_rate=kv.cache_hit_rate,
    )
