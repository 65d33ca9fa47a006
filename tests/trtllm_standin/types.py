"""The value types of `tensorrt_llm.bindings.executor` (TensorRT-LLM 1.2), with the checks the C++ makes.

Signatures copy the nanobind bindings — cpp/tensorrt_llm/nanobind/executor/request.cpp (SamplingConfig,
OutputConfig, LoraConfig, GuidedDecodingParams, Request, Result, Response) and bindings.cpp (ModelType) — including which
arguments are keyword-only (the configuration types are in configs.py). Wrong argument types raise TypeError as nanobind does; a failed TLLM_CHECK
raises TllmError (a RuntimeError) with TensorRT-LLM's text (cpp/include/tensorrt_llm/common/tllmException.h:
"[TensorRT-LLM][ERROR] Assertion failed: <info> (<file>:<line>)").
"""

from __future__ import annotations

import datetime
import enum
from typing import Any

import torch


class TllmError(RuntimeError):
    """tensorrt_llm::common::TllmException as Python sees it (nanobind maps std::runtime_error to RuntimeError)."""


def check(ok: bool, info: str, where: str) -> None:
    """TLLM_CHECK_WITH_INFO (cpp/include/tensorrt_llm/common/assert.h)."""
    if not ok:
        raise TllmError(f"[TensorRT-LLM][ERROR] Assertion failed: {info} ({where})")


def int_arg(name: str, v: Any, *, optional: bool = False, minimum: int | None = None) -> None:
    if v is None and optional:
        return
    if not isinstance(v, int) or isinstance(v, bool) or (minimum is not None and v < minimum):
        raise TypeError(f"incompatible function arguments: {name}={v!r} (expected int)")


def float_arg(name: str, v: Any) -> None:
    if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool)):
        raise TypeError(f"incompatible function arguments: {name}={v!r} (expected float)")


def _tensor(name: str, v: Any) -> None:
    # customCasters.h: the Tensor caster accepts torch.Tensor only (THPVariable_Check); numpy is rejected
    if v is not None and not isinstance(v, torch.Tensor):
        raise TypeError(
            f"incompatible function arguments: {name} must be a torch.Tensor, got {type(v).__name__}"
        )
    # runtime/torchView.h: TorchView's constructor does TLLM_CHECK(mTensor.is_contiguous())
    if v is not None:
        check(v.is_contiguous(), "mTensor.is_contiguous()", "cpp/tensorrt_llm/runtime/torchView.h")


def _token_lists(name: str, v: Any) -> None:  # std::optional<std::list<VecTokens>>
    if v is None:
        return
    if not isinstance(v, list) or not all(
        isinstance(t, list) and all(isinstance(i, int) for i in t) for t in v
    ):
        raise TypeError(f"incompatible function arguments: {name} must be a list of lists of int")


class ModelType(enum.Enum):
    DECODER_ONLY = 0
    ENCODER_ONLY = 1
    ENCODER_DECODER = 2


class FinishReason(enum.Enum):
    NOT_FINISHED = 0
    END_ID = 1
    STOP_WORDS = 2
    LENGTH = 3
    TIMED_OUT = 4
    CANCELLED = 5


_SAMPLING_FLOATS = (
    "top_p",
    "top_p_min",
    "top_p_decay",
    "temperature",
    "beam_search_diversity_rate",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "length_penalty",
    "min_p",
)
_SAMPLING_INTS = (
    "top_k",
    "top_p_reset_ids",
    "seed",
    "min_tokens",
    "early_stopping",
    "no_repeat_ngram_size",
    "num_return_sequences",
)


class SamplingConfig:
    """SamplingConfig(beam_width=1, *, top_k=None, …): only beam_width is positional (request.cpp)."""

    def __init__(
        self,
        beam_width: int = 1,
        *,
        top_k=None,
        top_p=None,
        top_p_min=None,
        top_p_reset_ids=None,
        top_p_decay=None,
        seed=None,
        temperature=None,
        min_tokens=None,
        beam_search_diversity_rate=None,
        repetition_penalty=None,
        presence_penalty=None,
        frequency_penalty=None,
        length_penalty=None,
        early_stopping=None,
        no_repeat_ngram_size=None,
        num_return_sequences=None,
        min_p=None,
        beam_width_array=None,
    ):
        int_arg("beam_width", beam_width, minimum=1)
        values = dict(locals())
        for n in _SAMPLING_FLOATS:
            float_arg(n, values[n])
        for n in _SAMPLING_INTS:
            int_arg(n, values[n], optional=True)
        # executor/samplingConfig.cpp: checkTemperature (>= 0), checkRepetitionPenalty (> 0), checkTopP …
        check(temperature is None or temperature >= 0, "temperature.value() >= 0.f", "samplingConfig.cpp")
        check(
            top_p is None or 0 <= top_p <= 1,
            "topP.value() >= 0.f && topP.value() <= 1.f",
            "samplingConfig.cpp",
        )
        check(
            repetition_penalty is None or repetition_penalty > 0,
            "penalty.value() > 0.F",
            "samplingConfig.cpp",
        )
        for n in ("beam_width", *_SAMPLING_FLOATS, *_SAMPLING_INTS, "beam_width_array"):
            setattr(self, n, values[n])


class OutputConfig:
    """OutputConfig(return_log_probs=False, return_context_logits=False, …): all positional-or-keyword."""

    def __init__(
        self,
        return_log_probs=False,
        return_context_logits=False,
        return_generation_logits=False,
        exclude_input_from_output=False,
        return_encoder_output=False,
        return_perf_metrics=False,
        additional_model_outputs=None,
    ):
        for n, v in list(locals().items())[1:-1]:
            if not isinstance(v, bool):
                raise TypeError(f"incompatible function arguments: {n}={v!r} (expected bool)")
            setattr(self, n, v)
        self.additional_model_outputs = additional_model_outputs


class LoraConfig:
    """LoraConfig(task_id, weights=None, config=None) with the constructor checks of
    cpp/tensorrt_llm/executor/loraConfig.cpp (2-D tensors, CPU memory, int32 config, same row count)."""

    def __init__(self, task_id: int, weights: torch.Tensor | None = None, config: torch.Tensor | None = None):
        int_arg("task_id", task_id, minimum=0)  # IdType = uint64
        _tensor("weights", weights)
        _tensor("config", config)
        where = "cpp/tensorrt_llm/executor/loraConfig.cpp"
        if config is not None:
            check(config.ndim == 2, "Expected config tensor to have 2 dimensions", where)
            check(not config.is_cuda, "Expected lora config to be in CPU memory", where)
            check(config.dtype == torch.int32, "Expected lora config tensor to have type kINT32", where)
        if weights is not None:
            check(
                config is not None,
                "Request for LoRA inference with lora weights must also have lora config",
                where,
            )
            check(weights.ndim == 2, "Expected weights tensor to have 2 dimensions", where)
            check(not weights.is_cuda, "Expected lora weights to be in CPU memory", where)
            check(
                config.shape[0] == weights.shape[0],
                "Expected dim 0 of lora weights and lora config to have the same size",
                where,
            )
        self._task_id, self._weights, self._config = task_id, weights, config

    task_id = property(lambda self: self._task_id)  # def_prop_ro
    weights = property(lambda self: self._weights)
    config = property(lambda self: self._config)


class GuidedDecodingParams:
    """GuidedDecodingParams(guide_type, guide=None) with the nested enum GuideType (request.cpp); read-only
    properties guide_type, guide. Every type but JSON needs a guide (executor/guidedDecodingParams.cpp:
    TLLM_CHECK_WITH_INFO(mGuideType == GuideType::kJSON || mGuide.has_value(), …))."""

    class GuideType(enum.Enum):
        JSON = 0
        JSON_SCHEMA = 1
        REGEX = 2
        EBNF_GRAMMAR = 3
        STRUCTURAL_TAG = 4

    def __init__(self, guide_type, guide=None):
        if not isinstance(guide_type, GuidedDecodingParams.GuideType):
            raise TypeError(
                "incompatible function arguments: guide_type must be a GuidedDecodingParams.GuideType"
            )
        if guide is not None and not isinstance(guide, str):
            raise TypeError("incompatible function arguments: guide must be a str")
        check(
            guide_type is GuidedDecodingParams.GuideType.JSON or guide is not None,
            "The guide string must be provided unless using GuideType::kJSON.",
            "cpp/tensorrt_llm/executor/guidedDecodingParams.cpp",
        )
        self._guide_type, self._guide = guide_type, guide

    guide_type = property(lambda self: self._guide_type)
    guide = property(lambda self: self._guide)


class Request:
    """Request(input_token_ids, max_tokens, *, streaming=False, …): keyword-only after max_tokens."""

    def __init__(
        self,
        input_token_ids,
        max_tokens,
        *,
        streaming=False,
        sampling_config=None,
        output_config=None,
        end_id=None,
        pad_id=None,
        position_ids=None,
        bad_words=None,
        stop_words=None,
        embedding_bias=None,
        external_draft_tokens_config=None,
        prompt_tuning_config=None,
        multimodal_input=None,
        multimodal_embedding=None,
        mrope_config=None,
        lora_config=None,
        lookahead_config=None,
        kv_cache_retention_config=None,
        logits_post_processor_name=None,
        logits_post_processor=None,
        encoder_input_token_ids=None,
        client_id=None,
        return_all_generated_tokens=False,
        priority=0.5,
        type=None,
        context_phase_params=None,
        encoder_input_features=None,
        encoder_output_length=None,
        cross_attention_mask=None,
        num_return_sequences=1,
        eagle_config=None,
        skip_cross_attn_blocks=None,
        guided_decoding_params=None,
        language_adapter_uid=None,
        allotted_time_ms=None,
    ):
        _check_request_args(
            input_token_ids, max_tokens, end_id, pad_id, client_id, bad_words, stop_words, embedding_bias
        )
        for name, value, cls in (
            ("sampling_config", sampling_config, SamplingConfig),
            ("output_config", output_config, OutputConfig),
            ("lora_config", lora_config, LoraConfig),
            ("guided_decoding_params", guided_decoding_params, GuidedDecodingParams),
        ):
            if value is not None and not isinstance(value, cls):
                raise TypeError(f"incompatible function arguments: {name} must be a {cls.__name__}")
        self.input_token_ids, self.max_tokens = list(input_token_ids), max_tokens
        self.streaming = bool(streaming)
        self.sampling_config = sampling_config or SamplingConfig()
        self.output_config = output_config or OutputConfig()
        self.end_id, self.pad_id, self.bad_words, self.stop_words = end_id, pad_id, bad_words, stop_words
        self.lora_config, self.client_id = lora_config, client_id
        self.embedding_bias = embedding_bias
        self.return_all_generated_tokens = return_all_generated_tokens
        self.guided_decoding_params = guided_decoding_params


def _check_request_args(
    input_token_ids, max_tokens, end_id, pad_id, client_id, bad_words, stop_words, embedding_bias
) -> None:
    """The binding's type checks of Request's plain arguments (nanobind: TypeError, incompatible arguments)."""
    if not isinstance(input_token_ids, list) or not all(isinstance(t, int) for t in input_token_ids):
        raise TypeError("incompatible function arguments: input_token_ids must be a list of int")
    int_arg("max_tokens", max_tokens)
    int_arg("end_id", end_id, optional=True)
    int_arg("pad_id", pad_id, optional=True)
    int_arg("client_id", client_id, optional=True, minimum=0)
    _token_lists("bad_words", bad_words)
    _token_lists("stop_words", stop_words)
    _tensor("embedding_bias", embedding_bias)


class Result:
    """Result(): plain read-write fields (request.cpp)."""

    def __init__(self) -> None:
        self.is_final = False
        self.output_token_ids: list[list[int]] = []
        self.cum_log_probs: list[float] | None = None
        self.log_probs: list[list[float]] | None = None
        self.context_logits = self.generation_logits = self.encoder_output = None
        self.finish_reasons: list[FinishReason] = []
        self.sequence_index = 0
        self.is_sequence_final = False
        self.decoding_iter = 0


class Response:
    """Response(request_id, error_msg | result, client_id=None); the getters throw like executor/responseImpl.h."""

    def __init__(self, request_id: int, payload: str | Result, client_id: int | None = None):
        self._id, self._payload, self._client_id = request_id, payload, client_id

    request_id = property(lambda self: self._id)
    client_id = property(lambda self: self._client_id)

    def has_error(self) -> bool:
        return isinstance(self._payload, str)

    @property
    def error_msg(self) -> str:
        if not self.has_error():
            raise TllmError("Cannot get the error message for a response without error")
        return self._payload

    @property
    def result(self) -> Result:
        if self.has_error():
            raise TllmError(f"Cannot get the result for a response with an error: {self._payload}")
        return self._payload


def as_timeout(name: str, v: Any) -> float | None:
    """std::optional<std::chrono::milliseconds> via nanobind's chrono caster. It also takes a float (seconds);
    the stand-in insists on timedelta so a seconds/milliseconds mix-up cannot pass unnoticed."""
    if v is None:
        return None
    if not isinstance(v, datetime.timedelta):
        raise TypeError(
            f"incompatible function arguments: {name} must be a datetime.timedelta, got {type(v).__name__}"
        )
    return v.total_seconds()
