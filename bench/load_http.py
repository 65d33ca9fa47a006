"""The load test's HTTP clients (bench/load.py): one keep-alive HTTP/1.1 connection per client on asyncio
streams, POST with a JSON body, the response read as it comes (chunked or Content-Length), a streamed
body cut into SSE events.

Why not httpx: the clients run on the same two cores as the server they measure, and their CPU counts on the
server's side of the comparison (per CPU-second) while the raw executor's clients are plain coroutines in its
process. httpx (httpcore, h11, anyio) spent about as much CPU per streamed token as the server's whole HTTP
layer (s10 serve.md); this client does only what the test needs: the status, Retry-After, the error text, and
every `data:` line of the stream, each parsed and checked as before.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from urllib.parse import urlsplit


class HttpError(Exception):
    """The connection failed or the server's bytes were not an HTTP/1.1 response."""


class Reply:
    """A response's status and the headers the test reads (lower-case names)."""

    def __init__(self, status: int, headers: dict[str, str]):
        self.status, self.headers = status, headers


class Connections:
    """One keep-alive connection per client index to `base_url` (http://host:port), opened on first use."""

    def __init__(self, base_url: str, timeout: float):
        url = urlsplit(base_url)
        self.host, self.port, self.timeout = url.hostname, url.port, timeout
        self._open: dict[int, tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}

    async def post_stream(
        self,
        client: int,
        path: str,
        body: dict,
        on_reply: Callable[[Reply], None],
        on_event: Callable[[bytes], None],
    ) -> bytes:
        """POST `body` as JSON; `on_reply` gets the status and headers once they are in, and a 200's SSE
        events go to `on_event` (the bytes after `data: `) as they arrive. Returns the body of any other
        status. A connection the server closed while idle is opened again once."""
        payload = json.dumps(body).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(payload)}\r\n\r\n"
        ).encode()
        for attempt in (0, 1):
            reader, writer = await self._connection(client)
            writer.write(head + payload)
            try:
                async with asyncio.timeout(self.timeout) as deadline:
                    reply = await _read_head(reader)
                    on_reply(reply)
                    rest = await self._read_body(reader, reply, on_event, deadline)
            except (HttpError, ConnectionError, asyncio.IncompleteReadError) as e:
                self._drop(client)
                if attempt == 0 and isinstance(e, asyncio.IncompleteReadError) and not e.partial:
                    continue  # closed while idle (keep-alive timeout) before any byte of the reply
                raise HttpError(f"{type(e).__name__}: {e}") from None
            except BaseException:
                self._drop(client)
                raise
            if reply.headers.get("connection", "").lower() == "close":
                self._drop(client)
            return rest
        raise AssertionError("unreachable")

    async def _connection(self, client: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if client not in self._open:
            self._open[client] = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), 30.0)
        return self._open[client]

    async def _read_body(self, reader, reply: Reply, on_event, deadline) -> bytes:
        """The body; for a 200 its SSE events go to `on_event` (a hung stream times out per chunk)."""
        chunked = reply.headers.get("transfer-encoding", "").lower() == "chunked"
        stream = reply.status == 200
        buffer, out = b"", []
        loop = asyncio.get_running_loop()
        while True:
            if chunked:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                data = (await reader.readexactly(size + 2))[:size]  # the chunk, then its CRLF
                if size == 0:
                    break
            else:
                data = await reader.readexactly(int(reply.headers.get("content-length", "0")))
            deadline.reschedule(loop.time() + self.timeout)
            if not stream:
                out.append(data)
            else:
                buffer += data
                *events, buffer = buffer.split(b"\n\n")
                for event in events:
                    for line in event.split(b"\n"):
                        if line.startswith(b"data: "):
                            on_event(line[6:])
            if not chunked:
                break
        return b"".join(out)

    def _drop(self, client: int) -> None:
        conn = self._open.pop(client, None)
        if conn is not None:
            conn[1].close()

    async def close(self) -> None:
        for client in list(self._open):
            self._drop(client)


async def _read_head(reader: asyncio.StreamReader) -> Reply:
    lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise HttpError(f"not an HTTP/1.1 status line: {lines[0][:100]!r}")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return Reply(int(parts[1]), headers)
