"""What every HTTP request passes first: the optional API key, and `X-Request-Id`.

API key (TRTLLM_PEFT_API_KEY): when set, every route under /v1/ and /v2/ needs `Authorization: Bearer <key>`
(compared in constant time), except the health routes, which probes call without credentials; the root
aliases (/health, /metrics, /version) stay open as vLLM leaves them. Unset: everything is open.
X-Request-Id: a client's id (1-128 visible ASCII characters) is echoed in the response header, prefixes the
response id (`cmpl-<id>`, openai_routes.py) and names the request in the log; a malformed one is a 400.
"""

from __future__ import annotations

import hmac
import logging
import re

from starlette.datastructures import Headers, MutableHeaders

from trtllm_peft.server.http_errors import error_response

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/v1/health/live", "/v1/health/ready", "/v2/health/live", "/v2/health/ready"})
REQUEST_ID = re.compile(r"[!-~]{1,128}")


def needs_key(path: str) -> bool:
    return path.startswith(("/v1/", "/v2/")) and path not in OPEN_PATHS


def authorized(header: str | None, key: str) -> bool:
    scheme, _, token = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


class EdgeMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware): the body-limit and drain middlewares around it see the request
    stream untouched."""

    def __init__(self, app, api_key: str | None = None) -> None:
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers, path = Headers(scope=scope), scope["path"]
        rid = headers.get("x-request-id")
        refusal = None
        if rid is not None and not REQUEST_ID.fullmatch(rid):
            refusal = error_response(
                path, "X-Request-Id must be 1 to 128 visible ASCII characters", 400, "X-Request-Id"
            )
        elif self.api_key and needs_key(path) and not authorized(headers.get("authorization"), self.api_key):
            refusal = error_response(
                path, "missing or wrong API key: send 'Authorization: Bearer <key>'", 401
            )
            refusal.headers["WWW-Authenticate"] = "Bearer"
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        if rid is None:
            await self.app(scope, receive, send)
            return
        log.info("request %s: %s %s", rid, scope["method"], path)

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).append("X-Request-Id", rid)
            await send(message)

        await self.app(scope, receive, send_with_id)
