"""bench/load_http.py: the load test's lean HTTP client against a scripted asyncio server (no real server)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from load_http import Connections, HttpError  # noqa: E402


def _chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
EVENTS = [
    b'data: {"i":0}\n\n',
    b'data: {"i":1}\n\ndata: {"i":2}\n\n',
    b'data: {"i"',
    b":3}\n\n",
    b"data: [DONE]\n\n",
]
REFUSED = b'HTTP/1.1 429 Too Many Requests\r\nretry-after: 1\r\ncontent-length: 13\r\n\r\n{"error":"x"}'

CASES = [  # (name, the server's reply per request, what the client sees: status, events, body, retry-after)
    (
        "stream",
        [SSE_HEAD + _chunked(*EVENTS)],
        (200, ['{"i":0}', '{"i":1}', '{"i":2}', '{"i":3}', "[DONE]"], b"", None),
    ),
    ("refused", [REFUSED], (429, [], b'{"error":"x"}', "1")),
    ("closed while idle, sent again", [None, REFUSED], (429, [], b'{"error":"x"}', "1")),
]


async def _serve(replies: list[bytes | None], seen: list[dict]):
    """A server that answers each request with the next reply (None: close the connection unanswered)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while replies:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(
                next(ln for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length")).split(
                    b":"
                )[1]
            )
            seen.append(json.loads(await reader.readexactly(length)))
            reply = replies.pop(0)
            if reply is None:
                writer.close()
                return
            writer.write(reply)
            await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


@pytest.mark.parametrize("name, replies, want", CASES, ids=[c[0] for c in CASES])
def test_post_stream(name, replies, want):
    async def run():
        seen: list[dict] = []
        server = await _serve(list(replies), seen)
        port = server.sockets[0].getsockname()[1]
        conns = Connections(f"http://127.0.0.1:{port}", timeout=10)
        got: dict = {"events": []}
        try:
            body = await conns.post_stream(
                0,
                "/v1/completions",
                {"p": 1},
                lambda r: got.update(reply=r),
                lambda e: got["events"].append(e.decode()),
            )
        finally:
            await conns.close()
            server.close()
        return got, body, seen

    got, body, seen = asyncio.run(run())
    status, events, want_body, retry_after = want
    assert (got["reply"].status, got["events"], body, got["reply"].headers.get("retry-after")) == (
        status,
        events,
        want_body,
        retry_after,
    )
    assert seen[-1] == {"p": 1}


def test_not_http_is_an_error():
    async def run():
        server = await _serve([b"SSH-2.0-nope\r\n\r\n"], [])
        port = server.sockets[0].getsockname()[1]
        conns = Connections(f"http://127.0.0.1:{port}", timeout=10)
        try:
            with pytest.raises(HttpError):
                await conns.post_stream(0, "/", {}, lambda r: None, lambda e: None)
        finally:
            await conns.close()
            server.close()

    asyncio.run(run())
