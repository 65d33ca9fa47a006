"""Checks a request must pass before it joins the engine, and reading the LoRA tensors it carries into the
host tier of the PEFT cache.

Texts follow TensorRT-LLM where it has one (loraUtils.cpp `loraValidateRequestTensors`, executorImpl.cpp);
the executor prefixes them with "Encountered an error when fetching new request: " as TensorRT-LLM does.
"""

from __future__ import annotations

import torch

from trtllm_peft.errors import AdapterError
from trtllm_peft.executor.api import (
    FETCH_ERROR_PREFIX,
    GUIDE_ERROR_PREFIX,
    GUIDED_NOT_SETUP_MESSAGE,
    LoraConfig,
    Request,
)
from trtllm_peft.executor.guided import GuideState
from trtllm_peft.executor.torch.peft_cache import LoraCacheFullError, PeftCache, PeftTaskNotCachedError
from trtllm_peft.executor.torch.sequence import Sequence
from trtllm_peft.lora import LoraAdapter, ModelSpec, unpack, validate


def check_request(req: Request, max_seq_len: int, vocab_size: int) -> str | None:
    """Why `req` cannot run on this engine, or None."""
    prompt = req.input_token_ids
    if not prompt:
        return "input_token_ids must not be empty"
    if req.max_tokens < 1:
        return f"max_tokens must be >= 1, got {req.max_tokens}"
    if len(prompt) >= max_seq_len:
        return f"Prompt length ({len(prompt)}) exceeds maximum input length ({max_seq_len - 1})."
    unsupported = _unsupported(req)
    if unsupported:
        return f"{unsupported} is not supported by the reference engine"
    if max(prompt) >= vocab_size or min(prompt) < 0:
        return f"input token ids must be in [0, {vocab_size})"
    return _check_logit_controls(req, vocab_size)


def _check_logit_controls(req: Request, vocab_size: int) -> str | None:
    """embedding_bias must be [vocab] floating point (llmRequest.h views it as [1, vocab]); bad words are
    token ids of the vocabulary."""
    bias = req.embedding_bias
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
            return "embedding_bias must be a floating-point tensor"
        if tuple(bias.shape) != (vocab_size,):
            return f"embedding_bias must have shape [{vocab_size}], got {list(bias.shape)}"
    for w in req.bad_words or []:
        if any(not 0 <= t < vocab_size for t in w):
            return f"bad_words token ids must be in [0, {vocab_size})"
    return None


def _unsupported(req: Request) -> str | None:
    """The first requested feature this engine does not implement (rather than silently ignoring it)."""
    oc, sc = req.output_config, req.sampling_config
    for name, used in (
        ("num_return_sequences > 1", (sc.num_return_sequences or 1) > 1),
        ("return_encoder_output", oc.return_encoder_output),
    ):
        if used:
            return name
    return None


def read_lora(lc: LoraConfig, spec: ModelSpec, dtype: torch.dtype) -> LoraAdapter:
    """The adapter in a request's [N, W] / [N, 4|3] tensors; ValueError or AdapterError when unusable."""
    if lc.weights is None or lc.config is None:
        raise ValueError("Request for LoRA inference must have both lora_weights and lora_keys")
    if lc.weights.dtype != dtype:
        raise ValueError(
            f"Expected lora weights to be the same data type as base model ({lc.weights.dtype} != {dtype})"
        )
    source = f"task {lc.task_id}"
    # No copy: the adapter's A/B are views of the caller's [N, W] tensor, so on the reference-engine path the
    # serving host cache and this host tier hold one copy of each adapter (TensorRT-LLM copies; it may).
    adapter = unpack(lc.weights.detach().cpu(), lc.config.cpu(), spec, source=source)
    problems = validate(adapter, spec)
    if problems:
        raise AdapterError(source, problems)
    return adapter


def accept(seq: Sequence, max_seq_len: int, vocab_size: int, guided: bool) -> str | None:
    """Check a new request and set up its sequence (tokens, output budget, compiled guide); an error or None."""
    req = seq.request
    err = check_request(req, max_seq_len, vocab_size)
    if err:
        return FETCH_ERROR_PREFIX + err
    if req.guided_decoding_params is not None:
        if not guided:
            return FETCH_ERROR_PREFIX + GUIDED_NOT_SETUP_MESSAGE
        if seq.guide_future.exception() is not None:
            return GUIDE_ERROR_PREFIX + str(seq.guide_future.exception())
        seq.guide = GuideState(seq.guide_future.result())
    seq.tokens, seq.prompt_len = list(req.input_token_ids), len(req.input_token_ids)
    seq.max_new = min(req.max_tokens, max_seq_len - seq.prompt_len)
    return None


def admit_lora(cache: PeftCache, lc: LoraConfig, spec: ModelSpec, dtype: torch.dtype) -> str | None:
    """Host tier: known task -> held (weights ignored); new task -> read, validated, stored. An error or None."""
    try:
        if lc.task_id in cache.host or lc.weights is None and lc.config is None:
            cache.admit(lc.task_id)
        else:
            adapter = read_lora(lc, spec, dtype)
            cache.admit(lc.task_id, sum(w.rank for _, w in adapter), adapter)
    except (PeftTaskNotCachedError, LoraCacheFullError) as e:
        return str(e)
    except (AdapterError, ValueError) as e:
        return FETCH_ERROR_PREFIX + str(e)
    return None
