"""Prompts as the OpenAI routes take them: a completion prompt in any of its four shapes (text, texts, token
ids, lists of token ids) to token ids and text, and the size checks that refuse a prompt before it costs
anything (characters before tokenizing, token ids against the vocabulary and the context)."""

from __future__ import annotations

import asyncio

from trtllm_peft.server.http_errors import BadRequestError
from trtllm_peft.server.runtime import Runtime
from trtllm_peft.server.schemas import MAX_CHOICES


async def completion_prompts(rt: Runtime, prompt) -> list[tuple[list[int], str]]:
    """(token ids, text) of each prompt: a string, a list of strings, token ids, or a list of token-id lists;
    tokenizing runs in a thread (it can take a while)."""
    if isinstance(prompt, str) or (prompt and all(isinstance(t, int) for t in prompt)):
        prompt = [prompt]
    if len(prompt) > MAX_CHOICES:
        raise BadRequestError(f"at most {MAX_CHOICES} prompts in one request", param="prompt")
    out = []
    for p in prompt:
        if isinstance(p, str):
            check_prompt_chars(rt, len(p))
            ids = await asyncio.to_thread(rt.tokenizer.encode, p)
            if not ids:
                raise BadRequestError("prompt must not be empty", param="prompt")
            out.append((ids, p))
        else:
            if not p:
                raise BadRequestError("prompt must not be empty", param="prompt")
            check_token_ids(rt, p)
            out.append((list(p), await asyncio.to_thread(rt.tokenizer.decode, list(p))))
    return out


def check_prompt_chars(rt: Runtime, chars: int) -> None:
    """Refuse, before tokenizing, a prompt too long to fit however it tokenizes.

    No token covers more than `tokenizer.max_token_chars` characters, so a prompt of more than
    max_model_len × that many characters has more tokens than the context holds.
    """
    limit = rt.max_model_len * rt.tokenizer.max_token_chars
    if chars > limit:
        raise BadRequestError(
            f"This model's maximum context length is {rt.max_model_len} tokens. However, your prompt has "
            f"{chars} characters, more than {rt.max_model_len} tokens can hold. Please reduce the length of "
            "the prompt.",
            param="prompt",
        )


def check_token_ids(rt: Runtime, ids: list[int]) -> None:
    if len(ids) >= rt.max_model_len:
        raise BadRequestError(
            f"This model's maximum context length is {rt.max_model_len} tokens. However, your prompt has "
            f"{len(ids)} tokens. Please reduce the length of the prompt.",
            param="prompt",
        )
    vocab = rt.vocab_size
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise BadRequestError(
            f"token id {bad} is out of range: token ids are 0 to {vocab - 1}", param="prompt"
        )
