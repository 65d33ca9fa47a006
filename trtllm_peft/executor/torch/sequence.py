"""One request inside the reference engine: its tokens, adapter, sampling state and stream position."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

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
    prompt_len: int = 0
    cached: int = 0  # tokens whose K/V are in the cache
    streamed: int = 0  # generated tokens already sent
    finish: FinishReason = FinishReason.NOT_FINISHED
    guide_future: Future | None = None  # the compiled grammar of guided_decoding_params (guided.py)
    guide: Any = None  # guided.GuideState once admitted

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len :]

    def add(self, token: int, log_prob: float | None) -> None:
        """Append a sampled token and decide whether the sequence is finished."""
        req = self.request
        if req.end_id is not None and token == req.end_id:
            self.finish = FinishReason.END_ID  # the end id is not part of the output
            return
        self.tokens.append(token)
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
        result = Result(
            is_final=final,
            output_token_ids=[new],
            finish_reasons=[self.finish],
            log_probs=[list(lps)] if req.output_config.return_log_probs else None,
            cum_log_probs=[sum(self.log_probs)] if req.output_config.return_log_probs else None,
            is_sequence_final=final,
            decoding_iter=len(self.generated),
        )
        return Response(request_id=self.id, result=result, client_id=req.client_id)


def _ends_with(tokens: list[int], word: list[int]) -> bool:
    return len(tokens) >= len(word) and tokens[-len(word) :] == list(word)
