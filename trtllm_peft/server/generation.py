"""One HTTP generation request: prompts × n sequences, tokens → text, stop strings, usage, metrics.

Sequence i·n + j is prompt i's j-th sample (OpenAI's and vLLM's choice index). All are submitted together
(so the engine batches them) and *primed* (their first step awaited) before any byte goes out, so a 404,
422 or 429 is a real HTTP status, not an error inside a 200 stream. Leaving early (client gone, stop
string) closes the sequence, which cancels its engine request.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field, replace

from trtllm_peft.errors import TrtllmPeftError
from trtllm_peft.serving.logprobs import TokenLogprob
from trtllm_peft.serving.orchestrator import GenerationParams, Orchestrator
from trtllm_peft.serving.stop import StopMatcher
from trtllm_peft.serving.tokenizer import Tokenizer


@dataclass
class Piece:
    """New text of one sequence, with the tokens (and their log-probs) it came from."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: str | None = None
    top: list[TokenLogprob] | None = None  # OpenAI log-probs of token_ids, when asked


@dataclass
class Sequence:
    """A whole sequence, for non-streaming answers."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    top: list[TokenLogprob] = field(default_factory=list)


class Generation:
    """The n sequences of one request."""

    def __init__(
        self,
        orch: Orchestrator,
        tok: Tokenizer,
        metrics,
        *,
        model: str,
        prompts: list[list[int]],
        params: GenerationParams,
        stops: list[str],
        n: int,
    ):
        self.orch, self.tok, self.metrics = orch, tok, metrics
        self.model, self.prompts, self.params, self.stops = model, prompts, params, stops
        self.per_prompt, self.n = n, n * len(prompts)  # n: sequences in all
        self.completion_tokens = 0
        self.prompt_logprobs: dict[int, list[TokenLogprob | None]] = {}  # prompt index → its log-probs
        self._streams: list[AsyncIterator[Piece]] = []
        self._firsts: list[Piece] = []

    async def start(self) -> None:
        """Open every sequence and await their first pieces together (one batch for the engine); raises
        TrtllmPeftError before anything is sent. Choice j of each prompt samples with seed + j."""
        seeds = choice_seeds(self.params.seed, self.per_prompt)
        try:
            for i in range(self.n):
                params = replace(self.params, seed=seeds[i % self.per_prompt])
                self._streams.append(self._pieces(i, self.prompts[i // self.per_prompt], params))
            self._firsts = list(await asyncio.gather(*(anext(s) for s in self._streams)))
        except BaseException as e:
            await self.aclose()
            if isinstance(e, TrtllmPeftError):
                self.metrics.failure.labels(self.model, str(e.http_status)).inc()
            raise

    async def stream(self) -> AsyncIterator[Piece]:
        """Pieces of all sequences as they come (interleaved when n > 1)."""
        if self.n == 1:
            yield self._firsts[0]
            async for piece in self._streams[0]:
                yield piece
            return
        queue: asyncio.Queue[Piece | None] = asyncio.Queue()

        async def pump(first: Piece, rest: AsyncIterator[Piece]) -> None:
            await queue.put(first)
            async for piece in rest:
                await queue.put(piece)
            await queue.put(None)

        tasks = [asyncio.create_task(pump(f, s)) for f, s in zip(self._firsts, self._streams, strict=True)]
        try:
            done = 0
            while done < self.n:
                piece = await queue.get()
                if piece is None:
                    done += 1
                else:
                    yield piece
            for t in tasks:
                t.result()  # re-raise a failure of a sequence
        finally:
            for t in tasks:
                t.cancel()

    async def collect(self) -> list[Sequence]:
        """Run every sequence to the end."""
        seqs = [Sequence(index=i) for i in range(self.n)]
        async for p in self.stream():
            s = seqs[p.index]
            s.text += p.text
            s.token_ids += p.token_ids
            s.logprobs += p.logprobs or []
            s.top += p.top or []
            s.finish_reason = p.finish_reason or s.finish_reason
        return seqs

    async def aclose(self) -> None:
        for s in self._streams:
            await s.aclose()

    async def _pieces(
        self, index: int, prompt_ids: list[int], params: GenerationParams
    ) -> AsyncIterator[Piece]:
        detok, stop = self.tok.stream(), StopMatcher(self.stops)
        start = time.perf_counter()
        first_at, tokens, reason = None, 0, None
        labels = (self.model,)
        self.metrics.adapter_requests.labels(self.model).inc()
        try:
            async with aclosing(self.orch.generate(self.model, prompt_ids, params)) as steps:
                async for step in steps:
                    first_at = first_at or time.perf_counter()
                    tokens += len(step.token_ids)
                    self.completion_tokens += len(step.token_ids)  # current before the piece is out
                    if step.prompt is not None:
                        self.prompt_logprobs[index // self.per_prompt] = step.prompt
                    text = "".join(detok.step(t) for t in step.token_ids)
                    text = stop.feed(text + (detok.flush() if step.finish_reason else ""))
                    reason = "stop" if stop.stopped else step.finish_reason
                    if reason and not stop.stopped:
                        text += stop.flush()
                    yield Piece(index, text, step.token_ids, step.logprobs, reason, step.top)
                    if reason:
                        return
        finally:
            self._record(labels, start, first_at, tokens, reason)

    def _record(self, labels, start, first_at, tokens, reason) -> None:
        m, end = self.metrics, time.perf_counter()
        if first_at is None:
            return
        m.ttft.labels(*labels).observe(first_at - start)
        if tokens > 1:
            m.tpot.labels(*labels).observe((end - first_at) / (tokens - 1))
        m.e2e.labels(*labels).observe(end - start)
        m.generation_tokens.labels(*labels).inc(tokens)
        m.request_generation.labels(*labels).observe(tokens)
        m.success.labels(*labels, reason or "abort").inc()


SEED_SPACE = 2**64  # the engine's seed is a uint64 (TensorRT-LLM's RandomSeedType)


def choice_seeds(seed: int | None, n: int) -> list[int]:
    """The sampling seed of each of n choices: `seed + i` when the client gave one (reproducible), else
    a random base per request (the engine would otherwise seed every request, and every choice, with 0:
    n identical samples, the same on every call)."""
    base = secrets.randbits(63) if seed is None else seed
    return [(base + i) % SEED_SPACE for i in range(n)]
