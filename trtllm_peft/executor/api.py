"""The engine contract, modelled on `tensorrt_llm.bindings.executor` (TensorRT-LLM 1.2).

Names, field names and argument order follow the C++ header and its Python bindings:
  cpp/include/tensorrt_llm/executor/executor.h (SamplingConfig, OutputConfig, LoraConfig, Request, Result,
  Response, PeftCacheConfig, KvCacheConfig, GuidedDecodingParams, GuidedDecodingConfig, Executor),
  cpp/include/tensorrt_llm/executor/types.h (FinishReason,
  IterationStats), cpp/tensorrt_llm/nanobind/executor/request.cpp and executorConfig.cpp (the Python
  names: snake_case, everything after `max_tokens` keyword-only).
Both executors (TorchExecutor, TrtllmExecutor) accept and return exactly these types, so the serving
layer above never knows which engine runs.

Semantics the executors honour (TensorRT-LLM's, see DESIGN §4.4):
* Non-streaming: one final Response; `output_token_ids[0]` holds prompt + generated tokens unless
  `OutputConfig.exclude_input_from_output` is set. Streaming: one Response per step with only the new
  tokens (TensorRT-LLM's default `return_all_generated_tokens=False`); the last has `is_final=True`.
* Sampling is greedy unless `top_k > 1` or `top_p > 0` (TensorRT-LLM: top_k=0 and top_p=0 is greedy,
  whatever the temperature). An OpenAI layer that means "sample" must therefore pass top_p=1.0.
* The end id is not part of the output tokens; a matched stop word is.
* Logits (`OutputConfig.return_context_logits` / `return_generation_logits`) are the model's raw float32
  logits, before embedding_bias, bad words, penalties and temperature: `Result.context_logits` [prompt_len,
  vocab] (row i predicts prompt token i + 1), `Result.generation_logits` [1, T, vocab] in a non-streaming
  result, [T, 1, vocab] in a streaming one (executor.h `Result::generationLogits`), row t being the logits
  the t-th output token was sampled from. TensorRT-LLM returns them only when the engine was built with
  `--gather_context_logits` / `ExecutorConfig(gather_generation_logits=True)` (executorImpl.cpp
  fetchNewRequests); the serving layer computes OpenAI's log-probs (top-k included) from them.
* `embedding_bias` [vocab] float32 is added to the logits before sampling (llmRequest.h); `bad_words` ban
  a word's last token wherever the sequence ends with the rest of it; `SamplingConfig.min_tokens` holds
  back the end id until that many tokens were generated (TensorRT-LLM's minLength).
"""

from __future__ import annotations

import enum
from dataclasses import KW_ONLY, dataclass, field
from typing import Protocol, runtime_checkable

import torch

IdType = int  # uint64 in C++ (executor::IdType)

# Exact texts of TensorRT-LLM's errors; the serving layer matches on them (see trtllm_lora.md §4.3).
NOT_CACHED_MESSAGE = "LoRA task {task_id} not found in cache. Please send LoRA weights with request"
HOST_CACHE_FULL_MESSAGE = "PEFT Cache is full. Could not store taskId={task_id}"
DEVICE_CACHE_FULL_MESSAGE = (
    "Caught exception during copyTask ensure batch -- Couldn't claim pages during copyTask -- "
    "Cache is full. There are no done tasks to evict"
)
FETCH_ERROR_PREFIX = "Encountered an error when fetching new request: "
# executorImpl.cpp (fetchNewRequests): a request with GuidedDecodingParams on an executor without a
# GuidedDecodingConfig (TLLM_CHECK_WITH_INFO(mModel->hasGuidedDecoder(), …)).
GUIDED_NOT_SETUP_MESSAGE = (
    "Request is specified with GuidedDecodingParams, but GuidedDecoder is not setup. Please provide a valid "
    "GuidedDecodingConfig to setup GuidedDecoder."
)
GUIDE_ERROR_PREFIX = "Guided decoding: "  # ours: a guide the grammar compiler refused


class FinishReason(enum.IntEnum):
    """executor::FinishReason (types.h)."""

    NOT_FINISHED = 0
    END_ID = 1
    STOP_WORDS = 2
    LENGTH = 3
    TIMED_OUT = 4
    CANCELLED = 5


@dataclass
class SamplingConfig:
    """executor::SamplingConfig; `None` means "engine default", as the optional fields in C++."""

    beam_width: int = 1
    top_k: int | None = None
    top_p: float | None = None
    top_p_min: float | None = None
    top_p_reset_ids: int | None = None
    top_p_decay: float | None = None
    seed: int | None = None
    temperature: float | None = None
    min_tokens: int | None = None
    beam_search_diversity_rate: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    length_penalty: float | None = None
    early_stopping: int | None = None
    no_repeat_ngram_size: int | None = None
    num_return_sequences: int | None = None
    min_p: float | None = None

    def __post_init__(self) -> None:
        if self.beam_width != 1:
            raise ValueError("beam_width must be 1: beam search is not supported by this engine")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.top_p is not None and not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if self.temperature is not None and self.temperature < 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0.0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def is_greedy(self) -> bool:
        """TensorRT-LLM's rule: top_k=0 and top_p=0 (or top_k=1, or temperature 0) is greedy."""
        if self.top_k == 1 or self.temperature == 0.0:
            return True
        return not (self.top_k or 0) and not (self.top_p or 0.0)


@dataclass
class OutputConfig:
    """executor::OutputConfig."""

    return_log_probs: bool = False
    return_context_logits: bool = False
    return_generation_logits: bool = False
    exclude_input_from_output: bool = False
    return_encoder_output: bool = False
    return_perf_metrics: bool = False


class GuideType(enum.IntEnum):
    """executor::GuidedDecodingParams::GuideType (executor.h; the binding's GuidedDecodingParams.GuideType)."""

    JSON = 0  # any JSON object (the guide string is unused)
    JSON_SCHEMA = 1  # JSON valid against the schema in the guide string
    REGEX = 2
    EBNF_GRAMMAR = 3
    STRUCTURAL_TAG = 4  # xgrammar's structural tag (a JSON string)


@dataclass(frozen=True)
class GuidedDecodingParams:
    """executor::GuidedDecodingParams(guide_type, guide=None): the output is constrained to the guide."""

    GuideType = GuideType
    guide_type: GuideType
    guide: str | None = None


class GuidedDecodingBackend(enum.IntEnum):
    """executor::GuidedDecodingConfig::GuidedDecodingBackend."""

    XGRAMMAR = 0
    LLGUIDANCE = 1


@dataclass(frozen=True)
class GuidedDecodingConfig:
    """executor::GuidedDecodingConfig(backend, encoded_vocab=None, tokenizer_str=None, stop_token_ids=None).

    Part of the executor's configuration: without it, a request with GuidedDecodingParams is an error.
    `encoded_vocab` lists the tokens in id order; `tokenizer_str` is the HF tokenizer.json text.
    """

    GuidedDecodingBackend = GuidedDecodingBackend
    backend: GuidedDecodingBackend = GuidedDecodingBackend.XGRAMMAR
    encoded_vocab: list[str] | None = field(default=None, repr=False)
    tokenizer_str: str | None = field(default=None, repr=False)
    stop_token_ids: list[int] | None = None


@dataclass(frozen=True)
class LoraConfig:
    """executor::LoraConfig(task_id, weights=None, config=None).

    weights: [N, W] in the engine dtype; config: [N, 4] (or [N, 3]) int32; both CPU torch tensors, 2-D
    (the `.npy` files carry a leading batch dimension of 1: squeeze it first).
    """

    task_id: IdType
    weights: torch.Tensor | None = None  # [N, W]
    config: torch.Tensor | None = None  # [N, 4|3] int32


@dataclass
class Request:
    """executor::Request; everything after `max_tokens` is keyword-only, as in the nanobind binding."""

    input_token_ids: list[int]
    max_tokens: int
    _: KW_ONLY
    streaming: bool = False
    sampling_config: SamplingConfig = field(default_factory=SamplingConfig)
    output_config: OutputConfig = field(default_factory=OutputConfig)
    end_id: int | None = None
    pad_id: int | None = None
    bad_words: list[list[int]] | None = None
    stop_words: list[list[int]] | None = None
    embedding_bias: torch.Tensor | None = None  # [vocab] float32, added to the logits
    lora_config: LoraConfig | None = None
    client_id: int | None = None
    guided_decoding_params: GuidedDecodingParams | None = None


@dataclass
class Result:
    """executor::Result. Token and log-prob lists are per beam (one beam here)."""

    is_final: bool
    output_token_ids: list[list[int]]
    finish_reasons: list[FinishReason] = field(default_factory=lambda: [FinishReason.NOT_FINISHED])
    log_probs: list[list[float]] | None = None
    cum_log_probs: list[float] | None = None
    context_logits: torch.Tensor | None = None  # [prompt_len, vocab] float32
    generation_logits: torch.Tensor | None = None  # [1, T, vocab] (final) or [T, 1, vocab] (streaming)
    sequence_index: int = 0
    is_sequence_final: bool = False
    decoding_iter: int = 0

    @property
    def finish_reason(self) -> FinishReason:
        """The finish reason of the (only) beam."""
        return self.finish_reasons[0]


@dataclass
class Response:
    """executor::Response: a result or an error message for one request."""

    request_id: IdType
    result: Result | None = None
    error_msg: str | None = None
    client_id: int | None = None

    def has_error(self) -> bool:
        return self.error_msg is not None


@dataclass(frozen=True)
class PeftCacheConfig:
    """executor::PeftCacheConfig (field names and defaults of executorConfig.cpp / executor.h).

    `num_*_module_layer` > 0 sets a capacity in rank-units (module-layer rows × rank) and overrides the
    percent / bytes fields. trtllm_peft.engine.memory.peft_cache_config() sizes it from NIM_* values.
    """

    num_host_module_layer: int = 0
    num_device_module_layer: int = 0
    optimal_adapter_size: int = 8
    max_adapter_size: int = 64
    num_put_workers: int = 1
    num_ensure_workers: int = 1
    num_copy_streams: int = 1
    max_pages_per_block_host: int = 24
    max_pages_per_block_device: int = 8
    device_cache_percent: float | None = None
    host_cache_size: int | None = None
    lora_prefetch_dir: str | None = None


@dataclass(frozen=True)
class KvCacheConfig:
    """executor::KvCacheConfig (executor.h, TensorRT-LLM 1.2): the fields this project uses, same names/defaults.

    `max_tokens` and `free_gpu_memory_fraction` both bound the cache; when both are set the smaller wins
    ("memory corresponding to the minimum will be allocated"). The fraction applies to the memory left after
    weights, PEFT caches and activations (for the reference engine: of its memory budget). Block size is not
    here: TensorRT-LLM fixes it at build (`plugin_config.tokens_per_block`, default 32).
    """

    enable_block_reuse: bool = True
    max_tokens: int | None = None
    free_gpu_memory_fraction: float | None = None

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        f = self.free_gpu_memory_fraction
        if f is not None and not 0.0 < f <= 1.0:
            raise ValueError(f"free_gpu_memory_fraction must be in (0, 1], got {f}")


@dataclass
class KvCacheStats:
    """executor::KvCacheStats (types.h): block counts of the KV cache and its reuse."""

    max_num_blocks: int = 0
    free_num_blocks: int = 0
    used_num_blocks: int = 0
    tokens_per_block: int = 0
    alloc_total_blocks: int = 0
    alloc_new_blocks: int = 0
    reused_blocks: int = 0
    missed_blocks: int = 0
    cache_hit_rate: float = 0.0


@dataclass
class IterationStats:
    """executor::IterationStats (types.h), the fields this engine can fill."""

    timestamp: str = ""
    iter: int = 0
    iter_latency_ms: float = 0.0
    new_active_requests_queue_latency_ms: float = 0.0
    num_new_active_requests: int = 0
    num_active_requests: int = 0
    num_queued_requests: int = 0
    num_completed_requests: int = 0
    max_num_active_requests: int = 0
    cpu_mem_usage: int = 0
    gpu_mem_usage: int = 0
    num_context_tokens: int = 0
    num_gen_tokens: int = 0
    num_active_lora_tasks: int = 0
    num_host_cached_lora_tasks: int = 0
    num_device_cached_lora_tasks: int = 0
    kv_cache_stats: KvCacheStats | None = None


@runtime_checkable
class Executor(Protocol):
    """executor::Executor's request API (the part the serving layer uses)."""

    def enqueue_request(self, request: Request) -> IdType: ...

    def enqueue_requests(self, requests: list[Request]) -> list[IdType]: ...

    def await_responses(self, id: IdType | None = None, timeout: float | None = None) -> list[Response]:
        """Responses ready now (waits up to `timeout` seconds for at least one); all ids or one id."""
        ...

    def get_num_responses_ready(self, id: IdType | None = None) -> int: ...

    def cancel_request(self, id: IdType) -> None: ...

    def shutdown(self) -> None: ...

    def can_enqueue_requests(self) -> bool: ...

    def get_latest_iteration_stats(self) -> list[IterationStats]: ...
