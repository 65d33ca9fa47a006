"""One Triton generation: a TritonRequest through the orchestrator, with tensorrtllm_backend's semantics.

What differs from the OpenAI path (and is TensorRT-LLM's behaviour, which Triton clients expect):
* greedy unless top_k > 1 or top_p > 0 (TensorRT-LLM's default), not OpenAI's "sample at temperature 1";
* stop / bad words are token sequences (the tokenizer's ids of each word, no special tokens, as
  tensorrtllm_backend's preprocessing makes them, or the ids of `stop_words_list`), handed to the engine:
  a matched stop word stays in the output;
* `end_id` ends the sequence on that token (not part of the output); `end_id` -1 never ends it; min_tokens
  holds the end id back (the engine's minLength);
* `exclude_input_in_output` false puts the prompt in front of the output (text or token ids).
The first step is awaited before anything is sent, so errors are real HTTP statuses (as in server/generation.py).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

import torch

from trtllm_peft.errors import TrtllmPeftError
from trtllm_peft.server.runtime import Runtime
from trtllm_peft.server.triton.lora_tasks import ClientLoraTasks
from trtllm_peft.server.triton.schemas import TritonRequest
from trtllm_peft.server.triton.stock import embedding_bias
from trtllm_peft.server.triton.tensors import TritonProtocolError
from trtllm_peft.serving.orchestrator import GenerationParams, Step


@dataclass
class Chunk:
    """New text of the sequence with the tokens it came from."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None = None


@dataclass
class Totals:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None


def generation_params(rt: Runtime, req: TritonRequest, prompt_len: int) -> GenerationParams:
    """Engine parameters with TensorRT-LLM's sampling defaults; 400 when the context does not fit."""
    limit = rt.max_model_len
    if prompt_len + req.max_tokens > limit:
        raise TritonProtocolError(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_len + req.max_tokens} tokens ({prompt_len} in the prompt, {req.max_tokens} in the completion)."
        )
    top_k = req.top_k or None
    top_p = req.top_p or None
    greedy = req.temperature == 0.0 or top_k == 1 or (top_k is None and top_p is None)
    words = rt.tokenizer.encode
    stops = [*req.stop_ids, *(ids for w in req.stop_words if (ids := words(w, add_special_tokens=False)))]
    bads = [*req.bad_ids, *(ids for w in req.bad_words if (ids := words(w, add_special_tokens=False)))]
    bias = req.embedding_bias
    if bias is None and (req.bias_words or req.bias_weights):
        bias = torch.from_numpy(
            embedding_bias(rt.tokenizer, req.bias_words, req.bias_weights, rt.spec.vocab_size)
        )
    if req.min_tokens is not None and req.min_tokens < 0:
        raise TritonProtocolError(f"min_tokens must be >= 0, got {req.min_tokens}")
    if req.end_id is not None and not -1 <= req.end_id < rt.spec.vocab_size:
        raise TritonProtocolError(
            f"end_id must be -1 (none) or a token id below {rt.spec.vocab_size}, got {req.end_id}"
        )
    return GenerationParams(
        max_tokens=req.max_tokens,
        temperature=0.0 if greedy else req.temperature,
        top_k=None if greedy else top_k,
        top_p=None if greedy else top_p,
        seed=req.seed,
        repetition_penalty=req.repetition_penalty,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        ignore_eos=req.end_id == -1,
        end_id=req.end_id if req.end_id is not None and req.end_id >= 0 else None,
        logprobs=req.return_log_probs,
        stop_words=stops,
        bad_words=bads,
        min_tokens=req.min_tokens,
        embedding_bias=bias,
    )


class TritonGeneration:
    """Runs one request; `start()` raises before any byte is sent, then `chunks()` streams the rest."""

    def __init__(self, rt: Runtime, tasks: ClientLoraTasks, model: str, req: TritonRequest):
        self.rt, self.tasks, self.model, self.req = rt, tasks, model, req
        self.prompt_ids = req.prompt_ids if req.prompt_ids is not None else rt.tokenizer.encode(req.text)
        self.params = generation_params(rt, req, len(self.prompt_ids))
        self.label = model
        self._steps: AsyncIterator[Step] | None = None
        self._first: Step | None = None
        self._generated: list[int] = []
        self._started = time.perf_counter()

    async def start(self) -> None:
        m = self.rt.metrics
        try:
            self._steps = self._open()
            self._first = await anext(self._steps)
        except StopAsyncIteration:
            self._first = Step(token_ids=[], logprobs=None, finish_reason="stop")
        except BaseException as e:
            await self.aclose()
            if isinstance(e, TrtllmPeftError):
                m.failure.labels(self.label, str(e.http_status)).inc()
            raise
        m.prompt_tokens.labels(self.label).inc(len(self.prompt_ids))
        m.request_prompt.labels(self.label).observe(len(self.prompt_ids))

    def _open(self) -> AsyncIterator[Step]:
        orch, req = self.rt.orchestrator, self.req
        if req.lora_task_id is None:
            return orch.generate(self.model, self.prompt_ids, self.params)
        task = self.tasks.lease(req.lora_task_id, req.lora_weights, req.lora_config)
        self.label = task.name
        return orch.generate_leased(task, task.packed, self.prompt_ids, self.params)

    async def chunks(self) -> AsyncIterator[Chunk]:
        """Text as it comes; the first chunk carries the prompt when exclude_input_in_output is false."""
        detok, first_at, reason = self.rt.tokenizer.stream(), None, None
        prefix = "" if self.req.exclude_input else self.rt.tokenizer.decode(self.prompt_ids)
        self.rt.metrics.adapter_requests.labels(self.label).inc()
        try:
            async for step in self._all_steps():
                first_at = first_at or time.perf_counter()
                chunk = self._feed(detok, step)
                chunk.text, prefix = prefix + chunk.text, ""
                reason = chunk.finish_reason
                yield chunk
                if reason:
                    return
        finally:
            await self.aclose()
            self._record(first_at, reason)

    async def collect(self) -> Totals:
        out = Totals()
        async for c in self.chunks():
            out.text += c.text
            out.token_ids += c.token_ids
            out.logprobs += c.logprobs
            out.finish_reason = c.finish_reason or out.finish_reason
        return out

    async def _all_steps(self) -> AsyncIterator[Step]:
        if self._first is not None:
            first, self._first = self._first, None
            yield first
        if self._steps is not None:
            async for step in self._steps:
                yield step

    def _feed(self, detok, step: Step) -> Chunk:
        """New text of a step (the engine applied end id, stop words and min tokens)."""
        ids = list(step.token_ids)
        lps = list(step.logprobs) if step.logprobs else [0.0] * len(ids)
        self._generated += ids
        return Chunk("".join(detok.step(t) for t in ids), ids, lps, step.finish_reason)

    def _record(self, first_at: float | None, reason: str | None) -> None:
        m, labels, end = self.rt.metrics, (self.label,), time.perf_counter()
        if first_at is None:
            return
        tokens = len(self._generated)
        m.ttft.labels(*labels).observe(first_at - self._started)
        if tokens > 1:
            m.tpot.labels(*labels).observe((end - first_at) / (tokens - 1))
        m.e2e.labels(*labels).observe(end - self._started)
        m.generation_tokens.labels(*labels).inc(tokens)
        m.request_generation.labels(*labels).observe(tokens)
        m.success.labels(*labels, reason or "abort").inc()

    async def aclose(self) -> None:
        """Stop the engine request (if still running) and release its adapter lease."""
        if self._steps is not None:
            steps, self._steps = self._steps, None
            async with aclosing(steps):
                pass
