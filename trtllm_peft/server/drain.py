"""Graceful shutdown: on SIGTERM the server stops being ready, refuses new work, lets running requests
(streams included) finish, then stops the engine and exits 0.

Kubernetes (and NIM) send SIGTERM on every rollout and keep routing to the pod until its readiness probe
fails, so the listening socket stays open while draining: probes get 503 and new requests a 503 they can
retry elsewhere, rather than a refused connection. Running requests get TRTLLM_PEFT_DRAIN_TIMEOUT seconds;
then uvicorn's own shutdown runs (lifespan: executor shutdown). A second SIGTERM, or SIGINT, stops at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal

import uvicorn

from trtllm_peft.server.http_errors import DrainingError, error_response

log = logging.getLogger(__name__)

# reads that stay answered while draining (probes, scrapes); everything else counts as work
_ALWAYS = frozenset({"GET", "HEAD", "OPTIONS"})


class Drain:
    """Requests in flight, and whether new ones are still welcome."""

    def __init__(self) -> None:
        self.draining = False
        self.active = 0
        self._idle: asyncio.Event | None = None

    def start(self) -> None:
        self.draining = True

    async def wait_idle(self, timeout: float) -> bool:
        """True once no request is running; False if some still run after `timeout` seconds."""
        self._idle = asyncio.Event()
        if self.active == 0:
            return True
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
            return True
        except TimeoutError:
            return False

    def _done(self) -> None:
        self.active -= 1
        if self.active == 0 and self._idle is not None:
            self._idle.set()


class DrainMiddleware:
    """Counts requests that do work (not GET); while draining, answers new ones 503."""

    def __init__(self, app, drain: Drain):
        self.app, self.drain = app, drain

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in _ALWAYS:
            return await self.app(scope, receive, send)
        if self.drain.draining:
            err = DrainingError("the server is shutting down: retry on another replica")
            return await error_response(scope["path"], str(err), 503)(scope, receive, send)
        self.drain.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain._done()


class GracefulServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM drains before uvicorn's shutdown, and exits 0 afterwards."""

    def __init__(self, config: uvicorn.Config, drain: Drain, drain_timeout: float):
        super().__init__(config)
        self.drain, self.drain_timeout = drain, drain_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining_task: asyncio.Task | None = None

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        if sig == signal.SIGTERM and not self.drain.draining and self._loop is not None:
            # not recorded in _captured_signals: uvicorn would re-raise it after shutdown (exit 143, not 0)
            self.drain.start()
            self._loop.call_soon_threadsafe(self._begin_drain)
            return
        super().handle_exit(sig, frame)

    def _begin_drain(self) -> None:
        self._draining_task = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        log.info(
            "SIGTERM: not ready any more; %d running requests get up to %g s to finish",
            self.drain.active,
            self.drain_timeout,
        )
        if await self.drain.wait_idle(self.drain_timeout):
            log.info("drained: every running request finished")
        else:
            log.warning(
                "drain timeout (%g s, TRTLLM_PEFT_DRAIN_TIMEOUT): stopping %d running requests",
                self.drain_timeout,
                self.drain.active,
            )
        self.should_exit = True
