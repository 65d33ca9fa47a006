"""Async bridge to an Executor: the executor's thread-based API on one side, asyncio streams on the other.

One poller thread waits on `await_responses()` and hands each Response to the asyncio queue of its
request, on the event loop's thread. The event loop never blocks on the executor.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator

from trtllm_peft.errors import InvalidRequestError
from trtllm_peft.executor.api import Executor, IdType, Request, Response

log = logging.getLogger(__name__)

POLL_TIMEOUT_S = 0.05


class EngineClient:
    """Owns the executor for the server's lifetime; `generate()` streams the responses of one request."""

    def __init__(self, executor: Executor, loop: asyncio.AbstractEventLoop):
        self.executor = executor
        self._loop = loop
        self._queues: dict[IdType, asyncio.Queue[Response]] = {}
        self._lock = threading.Lock()  # enqueue + register must be atomic against the poller
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="engine-responses", daemon=True)
        self._thread.start()

    async def generate(self, request: Request) -> AsyncIterator[Response]:
        """Enqueue `request` and yield its responses until the final one (or an error).

        If the consumer stops early (client gone, stop string matched), the request is cancelled.
        """
        queue: asyncio.Queue[Response] = asyncio.Queue()
        with self._lock:
            try:
                request_id = self.executor.enqueue_request(request)
            except ValueError as e:  # the executor validates before queueing (TensorRT-LLM's checks)
                raise InvalidRequestError(str(e)) from None
            self._queues[request_id] = queue
        finished = False
        try:
            while True:
                response = await queue.get()
                finished = response.has_error() or bool(response.result and response.result.is_final)
                yield response
                if finished:
                    return
        finally:
            with self._lock:
                self._queues.pop(request_id, None)
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
                routed = [(self._queues.get(r.request_id), r) for r in responses]
            for queue, response in routed:
                if queue is not None:
                    self._loop.call_soon_threadsafe(queue.put_nowait, response)

    def _fail_all(self, message: str) -> None:
        with self._lock:
            items = list(self._queues.items())
        for request_id, queue in items:
            self._loop.call_soon_threadsafe(
                queue.put_nowait, Response(request_id=request_id, error_msg=message)
            )
