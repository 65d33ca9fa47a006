"""OpenAI's log-prob shapes from serving/logprobs.py's entries (values: see there).

Completions (legacy): `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`, where each position's
`top_logprobs` dict holds the k most likely tokens plus the sampled one (k or k + 1 entries, as OpenAI and
vLLM answer; the first prompt token of an `echo` has `null`s). Chat: `{"content": [{"token", "logprob",
"bytes", "top_logprobs": [exactly k {"token", "logprob", "bytes"}]}]}`. Token texts are the tokenizer's
decoding of the single token; two ids with one text share a dict key, as in vLLM.
"""

from __future__ import annotations

from typing import Any

from trtllm_peft.serving.logprobs import TokenLogprob
from trtllm_peft.serving.tokenizer import Tokenizer


class CompletionLogprobs:
    """Builds `choices[i].logprobs` of /v1/completions for one choice, keeping the running text offset
    across streamed chunks."""

    def __init__(self, tok: Tokenizer, offset: int = 0):
        self.tok, self.offset = tok, offset

    def block(self, token_ids: list[int], entries: list[TokenLogprob | None]) -> dict[str, Any]:
        tokens = [self.tok.token_text(t) for t in token_ids]
        out: dict[str, Any] = {"tokens": tokens, "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for text, e in zip(tokens, entries, strict=True):
            out["text_offset"].append(self.offset)
            self.offset += len(text)
            out["token_logprobs"].append(None if e is None else e.logprob)
            out["top_logprobs"].append(None if e is None else self._top(e, text))
        return out

    def _top(self, e: TokenLogprob, text: str) -> dict[str, float]:
        top = {self.tok.token_text(t): lp for t, lp in e.top}
        top.setdefault(text, e.logprob)  # the sampled token is always there
        return top


def merge_blocks(a: dict[str, Any] | None, b: dict[str, Any]) -> dict[str, Any]:
    """Two completion log-prob blocks as one (the echoed prompt's, then the completion's)."""
    if a is None:
        return b
    return {key: a[key] + b[key] for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}


def chat_logprobs(tok: Tokenizer, entries: list[TokenLogprob]) -> dict[str, Any]:
    """`choices[i].logprobs` (or a chunk's) of /v1/chat/completions."""
    content = []
    for e in entries:
        item = _chat_entry(tok, e.token_id, e.logprob)
        item["top_logprobs"] = [_chat_entry(tok, t, lp) for t, lp in e.top]
        content.append(item)
    return {"content": content}


def _chat_entry(tok: Tokenizer, token_id: int, logprob: float) -> dict[str, Any]:
    text = tok.token_text(token_id)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", errors="replace"))}
