"""Errors that belong to HTTP itself (body, size, time, shutdown) and the one place that shapes them.

OpenAI's routes answer with OpenAI's error object (`{"error": {"message", "type", "param", "code"}}`),
Triton's (/v2/...) with Triton's `{"error": "..."}`: a client of either API can parse every error we send.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

from trtllm_peft.errors import TrtllmPeftError
from trtllm_peft.server.schemas import error_body

RETRY_AFTER_S = "1"


class BadRequestError(TrtllmPeftError):
    """A client error (400); `param` names the offending field when there is one."""

    http_status = 400

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class RequestTimeoutError(TrtllmPeftError):
    """The client stopped sending its request body (TRTLLM_PEFT_READ_TIMEOUT)."""

    http_status = 408


class RequestTooLargeError(TrtllmPeftError):
    """The request body is larger than TRTLLM_PEFT_MAX_REQUEST_BYTES (or the Triton limit)."""

    http_status = 413


class DrainingError(TrtllmPeftError):
    """The server got SIGTERM: it finishes running requests and takes no new ones."""

    http_status = 503


def is_triton(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


def error_response(
    path: str, message: str, status: int, param: str | None = None, *, close: bool = False
) -> JSONResponse:
    """The error in the shape of the API that `path` belongs to; 429 and 503 say when to retry."""
    headers = {"Retry-After": RETRY_AFTER_S} if status in (429, 503) else {}
    if close:
        headers["Connection"] = "close"
    body = {"error": message} if is_triton(path) else error_body(message, status, param)
    return JSONResponse(body, status_code=status, headers=headers or None)
