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

from fastapi import Request

from trtllm_peft.server.http_errors import error_response

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/v1/health/live", "/v1/health/ready", "/v2/health/live", "/v2/health/ready"})
REQUEST_ID = re.compile(r"[!-~]{1,128}")


def needs_key(path: str) -> bool:
    return path.startswith(("/v1/", "/v2/")) and path not in OPEN_PATHS


def authorized(header: str | None, key: str) -> bool:
    scheme, _, token = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


def edge_middleware(api_key: str | None):
    """The middleware function for app.middleware("http")."""

    async def edge(request: Request, call_next):
        rid = request.headers.get("x-request-id")
        path = request.url.path
        if rid is not None and not REQUEST_ID.fullmatch(rid):
            message = "X-Request-Id must be 1 to 128 visible ASCII characters"
            return error_response(path, message, 400, "X-Request-Id")
        if api_key and needs_key(path) and not authorized(request.headers.get("authorization"), api_key):
            response = error_response(
                path, "missing or wrong API key: send 'Authorization: Bearer <key>'", 401
            )
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
        if rid is not None:
            log.info("request %s: %s %s", rid, request.method, path)
        response = await call_next(request)
        if rid is not None:
            response.headers["X-Request-Id"] = rid
        return response

    return edge
