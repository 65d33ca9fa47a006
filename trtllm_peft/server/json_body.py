"""Request JSON, read once and checked before any route sees it: UTF-8, JSON, nesting depth, Unicode.

FastAPI answers a body it cannot parse with `{"detail": ...}` (or a 500 for a lone surrogate that reaches
the tokenizer or an error message); here each of those is a 400 that names the problem, in the route's
error shape. The body size is bounded before this runs (server/limits.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from fastapi import Request
from fastapi.routing import APIRoute

from trtllm_peft.server.http_errors import BadRequestError

MAX_DEPTH = 32  # OpenAI bodies nest 4-5 levels (messages → content parts → fields)
# a lone surrogate can only come from a \uD800-\uDFFF escape: strict UTF-8 decoding refuses raw ones
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]", re.ASCII)


def parse_json(raw: bytes) -> Any:
    """The JSON value of a request body; BadRequestError (400) with a precise message otherwise."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequestError(f"the request body is not valid UTF-8 (byte {e.start}: {e.reason})") from None
    try:
        value = json.loads(text)
    except RecursionError:
        raise BadRequestError(f"the request JSON nests deeper than {MAX_DEPTH} levels") from None
    except json.JSONDecodeError as e:
        raise BadRequestError(f"the request body is not valid JSON: {e}") from None
    check_tree(value, surrogates=bool(_SURROGATE_ESCAPE.search(raw)))
    return value


def check_tree(value: Any, *, surrogates: bool = True) -> None:
    """Depth at most MAX_DEPTH; with `surrogates`, every string (keys too) encodable as UTF-8."""
    stack: list[tuple[Any, int, str]] = [(value, 1, "")]
    while stack:
        node, depth, path = stack.pop()
        if isinstance(node, dict):
            children = [(v, f"{path}.{k}" if path else str(k)) for k, v in node.items()]
            if surrogates:
                for k in node:
                    _check_text(k, path or "body")
        elif isinstance(node, list):
            children = [(v, f"{path}[{i}]") for i, v in enumerate(node)]
        else:
            if surrogates and isinstance(node, str):
                _check_text(node, path or "body")
            continue
        if depth > MAX_DEPTH:
            raise BadRequestError(f"the request JSON nests deeper than {MAX_DEPTH} levels (at {path})")
        stack.extend((child, depth + 1, p) for child, p in children if surrogates or _container(child))


def _container(v: Any) -> bool:
    return isinstance(v, dict | list)


def _check_text(s: str, where: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRequestError(
            f"{where}: invalid Unicode (lone surrogate {s[e.start]!r} at index {e.start})", param=where
        ) from None


class JsonRoute(APIRoute):
    """An APIRoute whose POST body is parsed by `parse_json` before FastAPI validates it.

    FastAPI reads the body through `request.json()`, which Starlette caches in `request._json`: setting
    it here makes FastAPI validate this value instead of parsing the body a second time.
    """

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def route(request: Request):
            if request.method == "POST":
                request._json = parse_json(await request.body())
            return await handler(request)

        return route
