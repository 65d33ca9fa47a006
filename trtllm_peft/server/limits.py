"""What one request may cost before it reaches a route: a body-size cap and a read timeout.

ASGI middleware. A declared Content-Length over the cap is refused before one byte of the body is read;
a chunked (or lying) body is counted as it arrives and refused as soon as it passes the cap, so no more
than the cap (plus one network read) is ever buffered. A client that stops sending its body for
TRTLLM_PEFT_READ_TIMEOUT seconds gets 408. Both errors are raised from `receive()`, where the route that
reads the body turns them into its API's error shape; one that escapes is answered here.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from trtllm_peft.errors import TrtllmPeftError
from trtllm_peft.server.http_errors import (
    RequestTimeoutError,
    RequestTooLargeError,
    error_response,
    is_triton,
)

_CLOSE = (b"connection", b"close")


@dataclass(frozen=True)
class Limits:
    max_bytes: int  # OpenAI routes and everything else
    max_triton_bytes: int  # /v2/...: LoRA weights travel in the body (Triton's --http-max-input-size)
    read_timeout: float

    def cap(self, path: str) -> int:
        return self.max_triton_bytes if is_triton(path) else self.max_bytes


class BodyLimitMiddleware:
    def __init__(self, app, limits: Limits):
        self.app, self.limits = app, limits

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, cap = scope["path"], self.limits.cap(scope["path"])
        declared = _content_length(scope)
        if declared is not None and declared > cap:
            return await _refuse(scope, send, _too_large(declared, cap))
        started = False

        async def tracked_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if message["status"] in (408, 413):  # the rest of the body is not worth reading
                    message = {**message, "headers": [*message.get("headers", []), _CLOSE]}
            await send(message)

        try:
            await self.app(scope, _bounded(receive, cap, self.limits.read_timeout), tracked_send)
        except (RequestTooLargeError, RequestTimeoutError) as e:
            if started:
                raise
            await error_response(path, str(e), e.http_status)(scope, receive, tracked_send)


def _bounded(receive, cap: int, timeout: float):
    """`receive` that raises once the body passes `cap` bytes, or when a body read waits `timeout` s."""
    seen, done = 0, False

    async def bounded():
        nonlocal seen, done
        if done:  # the body is complete: what follows is a disconnect, which may come any time
            return await receive()
        try:
            async with asyncio.timeout(timeout):
                message = await receive()
        except TimeoutError:
            raise RequestTimeoutError(
                f"the request body stalled: nothing received for {timeout:g} s (TRTLLM_PEFT_READ_TIMEOUT)"
            ) from None
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            done = not message.get("more_body", False)
            if seen > cap:
                raise _too_large(seen, cap, partial=not done)
        else:
            done = True
        return message

    return bounded


def _content_length(scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # h11 already refuses a malformed Content-Length
    return None


def _too_large(size: int, cap: int, partial: bool = False) -> RequestTooLargeError:
    more = "more than " if partial else ""
    return RequestTooLargeError(
        f"the request body is {more}{size} bytes, more than this server accepts ({cap} bytes)"
    )


async def _refuse(scope, send, error: TrtllmPeftError) -> None:
    async def nothing():
        return {"type": "http.disconnect"}

    await error_response(scope["path"], str(error), error.http_status)(scope, nothing, send)
