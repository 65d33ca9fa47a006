"""Async bridge to an Executor: the executor's thread-based API on one side, asyncio streams on the other.

One poller thread waits on `await_responses()` and hands everything one call returned (one engine step,
usually, for every running request) to the event loop in a single hand-off, which routes each Response to
the queue of its request: one wake-up of the loop per step, not one per token. A stream that asked for
OpenAI log-probs (`generate(..., scores=...)`) gets them computed in the poller thread, for all such
streams of the step in one pass (serving/logprobs.py), so the event loop never touches the logits.
The event loop never blocks on the executor.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from trtllm_peft.errors import InvalidRequestError
from trtllm_peft.executor.api import Executor, IdType, Request, Response
from trtllm_peft.serving.logprobs import RowsToScore, TokenLogprob, generation_rows, score_batch

log = logging.getLogger(__name__)

POLL_TIMEOUT_S = 0.05

Scores = list[TokenLogprob] | ValueError | None  # a response's log-probs (None: not asked, or no result)


@dataclass(frozen=True)
class ScoreSpec:
    """What a stream wants scored: top-k alternatives over a vocabulary of `vocab` tokens."""

    k: int
    vocab: int


@dataclass
class _Stream:
    queue: asyncio.Queue[tuple[Response, Scores]]
    scores: ScoreSpec | None


class EngineClient:
    """Owns the executor for the server's lifetime; `generate()` streams the responses of one request."""

    def __init__(self, executor: Executor, loop: asyncio.AbstractEventLoop):
        self.executor = executor
        self._loop = loop
        self._streams: dict[IdType, _Stream] = {}
        self._lock = threading.Lock()  # enqueue + register must be atomic against the poller
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="engine-responses", daemon=True)
        self._thread.start()

    async def generate(self, request: Request) -> AsyncIterator[Response]:
        """Enqueue `request` and yield its responses until the final one (or an error).

        If the consumer stops early (client gone, stop string matched), the request is cancelled.
        """
        async for response, _ in self.generate_scored(request, None):
            yield response

    async def generate_scored(
        self, request: Request, scores: ScoreSpec | None
    ) -> AsyncIterator[tuple[Response, Scores]]:
        """Like `generate`, each response with the OpenAI log-probs of its new tokens when `scores` is set
        (from `Result.generation_logits`: the request must ask for them, and they are dropped from the
        result once scored); a ValueError where the logits do not fit the tokens."""
        stream = _Stream(asyncio.Queue(), scores)
        with self._lock:
            try:
                request_id = self.executor.enqueue_request(request)
            except ValueError as e:  # the executor validates before queueing (TensorRT-LLM's checks)
                raise InvalidRequestError(str(e)) from None
            self._streams[request_id] = stream
        finished = False
        try:
            while True:
                response, scored = await stream.queue.get()
                finished = response.has_error() or bool(response.result and response.result.is_final)
                yield response, scored
                if finished:
                    return
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:
                self.executor.cancel_request(request_id)

    def close(self) -> None:
        """Stop polling and shut the executor down (waits for its thread)."""
        self._stop.set()
        self._thread.join(timeout=5)
        self.executor.shutdown()

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                responses = self.executor.await_responses(timeout=POLL_TIMEOUT_S)
            except Exception:  # the engine died: fail every waiting request rather than hang them
                log.exception("executor failed; failing all active requests")
                self._fail_all("engine error: the executor stopped")
                return
            if not responses:
                continue
            with self._lock:
                routed = [(s, r) for r in responses if (s := self._streams.get(r.request_id)) is not None]
            if routed:
                batch = list(zip(routed, _score(routed), strict=True))
                self._loop.call_soon_threadsafe(_deliver, batch)

    def _fail_all(self, message: str) -> None:
        with self._lock:
            items = list(self._streams.items())
        batch = [((s, Response(request_id=rid, error_msg=message)), None) for rid, s in items]
        self._loop.call_soon_threadsafe(_deliver, batch)


def _deliver(batch: list[tuple[tuple[_Stream, Response], Scores]]) -> None:
    """On the event loop: every response of one poll to its stream's queue."""
    for (stream, response), scores in batch:
        stream.queue.put_nowait((response, scores))


def _score(routed: list[tuple[_Stream, Response]]) -> list[Scores]:
    """The log-probs of every response whose stream asked, in one pass (poller thread, which must not die:
    a malformed result fails its own stream only)."""
    out: list[Scores] = [None] * len(routed)
    wanted, items = [], []
    for i, (stream, r) in enumerate(routed):
        result = r.result
        if stream.scores is None or result is None or not result.output_token_ids[0]:
            continue
        logits = result.generation_logits
        if logits is None or logits.dim() != 3 or logits.shape[1] != 1:
            shape = None if logits is None else tuple(logits.shape)
            out[i] = ValueError(f"the engine returned no streaming generation logits (got {shape})")
            continue
        wanted.append(i)
        rows = generation_rows(logits, streaming=True)  # [T, V]
        items.append(RowsToScore(rows, result.output_token_ids[0], stream.scores.k, stream.scores.vocab))
    try:
        scored = score_batch(items) if items else []
    except Exception as e:  # not expected: fail the streams that asked, keep polling
        log.exception("scoring log-probs failed")
        scored = [ValueError(f"log-probs failed: {e}") for _ in items]
    for i, s in zip(wanted, scored, strict=True):
        out[i] = s
        # scored: the stream needs the rows no more, and a response queued behind a slow client would
        # otherwise hold a [T, 1, V] tensor per token
        routed[i][1].result.generation_logits = None
    return out
