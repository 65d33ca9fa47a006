"""One request inside the reference engine: its tokens, adapter, sampling state and stream position."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from trtllm_peft.executor.api import FinishReason, Request, Response, Result
from trtllm_peft.executor.torch.sampler import SamplingState


@dataclass
class Sequence:
    id: int
    request: Request
    sampling: SamplingState
    max_new: int
    task_id: int | None = None
    tokens: list[int] = field(default_factory=list)  # prompt + generated
    log_probs: list[float] = field(default_factory=list)
    context_logits: torch.Tensor | None = None  # [prompt_len, V], until the first response carries it
    gen_logits: list[torch.Tensor] = field(default_factory=list)  # [V] per output token not yet sent
    prompt_len: int = 0
    cached: int = 0  # tokens whose K/V are in the cache
    streamed: int = 0  # generated tokens already sent
    finish: FinishReason = FinishReason.NOT_FINISHED
    guide_future: Future | None = None  # the compiled grammar of guided_decoding_params (guided.py)
    guide: Any = None  # guided.GuideState once admitted

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len :]

    def add(self, token: int, log_prob: float | None, logits: torch.Tensor | None = None) -> None:
        """Append a sampled token (and the raw logits [V] it came from, when asked for); decide whether the
        sequence is finished."""
        req = self.request
        if req.end_id is not None and token == req.end_id:
            self.finish = FinishReason.END_ID  # the end id is not part of the output
            return
        self.tokens.append(token)
        if logits is not None and req.output_config.return_generation_logits:
            self.gen_logits.append(logits)
        if log_prob is not None:
            self.log_probs.append(log_prob)
        if req.stop_words and any(_ends_with(self.generated, w) for w in req.stop_words if w):
            self.finish = FinishReason.STOP_WORDS
        elif len(self.generated) >= self.max_new:
            self.finish = FinishReason.LENGTH

    def response(self) -> Response | None:
        """The response due now: a streaming delta, or the final result; None when nothing is due."""
        final = self.finish != FinishReason.NOT_FINISHED
        req = self.request
        if req.streaming:
            new = self.generated[self.streamed :]
            if not new and not final:
                return None
            lps = self.log_probs[self.streamed : self.streamed + len(new)]
            self.streamed += len(new)
        elif not final:
            return None
        else:
            new = self.generated if req.output_config.exclude_input_from_output else list(self.tokens)
            lps = self.log_probs
        oc = req.output_config
        result = Result(
            is_final=final,
            output_token_ids=[new],
            finish_reasons=[self.finish],
            log_probs=[list(lps)] if oc.return_log_probs else None,
            cum_log_probs=[sum(self.log_probs)] if oc.return_log_probs else None,
            is_sequence_final=final,
            decoding_iter=len(self.generated),
        )
        result.context_logits, self.context_logits = self.context_logits, None  # sent once
        if oc.return_generation_logits:
            result.generation_logits = self._take_generation_logits(req.streaming)
        return Response(request_id=self.id, result=result, client_id=req.client_id)

    def _take_generation_logits(self, streaming: bool) -> torch.Tensor:
        """The rows not yet sent: [T, 1, V] streaming, [1, T, V] final (executor.h Result::generationLogits)."""
        rows, self.gen_logits = self.gen_logits, []
        out = torch.stack(rows) if rows else torch.empty(0, 0)  # [T, V]
        return out[:, None, :] if streaming else out[None, :, :]


def _ends_with(tokens: list[int], word: list[int]) -> bool:
    return len(tokens) >= len(word) and tokens[-len(word) :] == list(word)
