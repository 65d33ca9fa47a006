"""A request's sampling fields in engine terms (GenerationParams): the context-length check, the sampling
knobs (nvext overriding OpenAI's), and the logit controls (logit_bias, min_tokens, stop_token_ids,
bad_words), each refused by name when it names no token."""

from __future__ import annotations

from typing import Any

import torch

from trtllm_peft.server.http_errors import BadRequestError
from trtllm_peft.server.runtime import Runtime
from trtllm_peft.server.schemas import _Sampling
from trtllm_peft.serving.orchestrator import GenerationParams


def generation_params(
    rt: Runtime,
    body: _Sampling,
    prompt_len: int,
    max_tokens: int | None,
    *,
    top_logprobs: int | None = None,
    prompt_logprobs: int | None = None,
) -> GenerationParams:
    limit = rt.max_model_len
    if prompt_len >= limit:
        raise BadRequestError(
            f"This model's maximum context length is {limit} tokens. However, your prompt has {prompt_len} "
            "tokens. Please reduce the length of the prompt."
        )
    room = limit - prompt_len
    if max_tokens is not None and max_tokens > room:
        raise BadRequestError(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} in the completion)."
        )
    nv = body.nvext
    return GenerationParams(
        max_tokens=max_tokens or room,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=(nv.top_k if nv and nv.top_k is not None else body.top_k),
        seed=body.seed,
        repetition_penalty=(
            nv.repetition_penalty if nv and nv.repetition_penalty else body.repetition_penalty
        ),
        presence_penalty=body.presence_penalty or None,
        frequency_penalty=body.frequency_penalty or None,
        ignore_eos=bool(body.ignore_eos or (nv and nv.ignore_eos)),
        top_logprobs=top_logprobs,
        prompt_logprobs=prompt_logprobs,
        **logit_controls(rt, body),
    )


def logit_controls(rt: Runtime, body: _Sampling) -> dict[str, Any]:
    """logit_bias (as TensorRT-LLM's embedding_bias [vocab]), min_tokens, stop_token_ids (single-token stop
    words), bad_words in engine terms; 400 naming a bad id."""
    vocab = rt.vocab_size
    bias = None
    for key, value in (body.logit_bias or {}).items():
        token = int(key) if key.lstrip("-").isdigit() else None
        if token is None or not 0 <= token < vocab:
            raise BadRequestError(f"logit_bias key {key!r} is not a token id: token ids are 0 to {vocab - 1}")
        bias = torch.zeros(vocab, dtype=torch.float32) if bias is None else bias
        bias[token] = float(value)
    bad_ids = [t for t in body.stop_token_ids if not 0 <= t < vocab]
    if bad_ids:
        raise BadRequestError(f"stop_token_ids: {bad_ids[0]} is not a token id (0 to {vocab - 1})")
    return {
        "embedding_bias": bias,
        "min_tokens": body.min_tokens or None,
        "stop_words": [[t] for t in body.stop_token_ids] or None,
        "bad_words": [list(w) for w in bad_words(rt, body.bad_words)] or None,
    }


def bad_words(rt: Runtime, words: list[str]) -> tuple[tuple[int, ...], ...]:
    """Each word's token ids, alone and after a space (as vLLM tokenizes bad_words)."""
    out: list[tuple[int, ...]] = []
    for word in words:
        if not word or len(word) > 256:
            raise BadRequestError("bad_words: each word must have 1 to 256 characters")
        for variant in (word, " " + word.lstrip()):
            ids = tuple(rt.tokenizer.encode(variant, add_special_tokens=False))
            if ids and ids not in out:
                out.append(ids)
    return tuple(out)
