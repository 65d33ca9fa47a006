"""uvicorn's h11 protocol with a deadline for the request head: no half-open or slow-loris connection
holds a socket forever.

uvicorn times out idle keep-alive connections (`timeout_keep_alive`) but not a connection that never
sends a complete request head (a fresh one that sends nothing, or a few header bytes every minute), nor
one whose unread body it keeps discarding after an early answer (413). Here each of those is closed after
TRTLLM_PEFT_READ_TIMEOUT seconds; a partial head gets 408 first, as nginx's client_header_timeout does.
Stalled bodies under a running request are the ASGI layer's job (server/limits.py).
"""

from __future__ import annotations

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)


class TimedH11Protocol(H11Protocol):
    """H11Protocol that closes a connection waiting on its client for longer than `read_timeout` seconds."""

    read_timeout: float = 30.0  # set per server by protocol_with_read_timeout
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._update()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._update()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _waiting_for_client(self) -> bool:
        """A partial request head, or a body nobody reads any more (the answer is already sent)."""
        their, ours = self.conn.their_state, self.conn.our_state
        partial_head = their is h11.IDLE and bool(self.conn.trailing_data[0])
        discarding = their is h11.SEND_BODY and ours in (h11.DONE, h11.MUST_CLOSE)
        return partial_head or discarding

    def _update(self) -> None:
        if self.transport.is_closing():
            self._disarm()
        elif self._waiting_for_client():
            if self._deadline is None:  # a deadline, not an idle timer: trickling bytes do not extend it
                self._arm()
        elif self.conn.their_state is not h11.IDLE or self.conn.our_state is not h11.IDLE:
            self._disarm()  # a request is being served: the app and limits.py own the time now

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.read_timeout, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        their, ours = self.conn.their_state, self.conn.our_state
        if their is h11.IDLE and ours is h11.IDLE and self.conn.trailing_data[0]:
            log.info("closing a connection that sent no complete request head in %g s", self.read_timeout)
            self._send_408()
        elif (their is h11.IDLE and ours is h11.IDLE) or self._waiting_for_client():
            self.transport.close()  # nothing sent at all, or an abandoned body

    def _send_408(self) -> None:
        headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"connection", b"close")]
        for event in (
            h11.Response(status_code=408, headers=headers, reason=b"Request Timeout"),
            h11.Data(data=b"request head not received in time"),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event))
        self.transport.close()


def protocol_with_read_timeout(read_timeout: float) -> type[H11Protocol]:
    """The H11Protocol subclass uvicorn builds per connection (`uvicorn.Config(http=...)`)."""
    return type("TimedH11Protocol", (TimedH11Protocol,), {"read_timeout": read_timeout})
