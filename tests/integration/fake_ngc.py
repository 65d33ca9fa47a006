"""NGC's registry on loopback, and the seam that sends ngcsdk's traffic to it.

The seam: ngcsdk 4.37 does all of its HTTP with `requests` (ngcbase.tracing.TracedSession for the API, the
key check and the presigned-URL downloads), and `requests` sends every request through
`HTTPAdapter.send`. `route_ngc_to(fake, monkeypatch)` wraps that one method so that a request for an NGC
host (api.ngc.nvidia.com, authn.nvidia.com, the storage host) goes to the loopback server instead, as
plain HTTP (the SDK forces https:// on any configured URL, so pointing its settings at loopback cannot
work). Nothing else is replaced: auth headers, retries, JSON parsing, pagination, ranged downloads, size
checks and error mapping are all the SDK's own code.

What the fake answers, as NGC does (read from ngcsdk: registry/api/models.py, ngcbase/api/authentication.py,
ngcbase/transfer/async_download.py):

  POST api/v3/keys/get-caller-info              an `nvapi-` key's details (401 for an unknown key)
  GET  authn/token?service=ngc&scope=...        a legacy key (Basic $oauthtoken:KEY) → a bearer token
  GET  api/v2/org/O[/team/T]/models/M           the model
  GET  api/v2/org/O[/team/T]/models/M/versions/V          the version (status UPLOAD_COMPLETE)
  GET  api/v2/org/O[/team/T]/models/M/versions/V/files    the file list: path, sizeInBytes, sha256_base64
  GET  api/v2/org/O[/team/T]/models/M/V/files[?path=P]    presigned download URLs
  GET  storage/<org>/<model>/<version>/<path>             the bytes, by Range (the SDK always sends one)
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

API, AUTH, STORAGE = "api.ngc.nvidia.com", "authn.nvidia.com", "ngc-models.s3.us-west-2.amazonaws.com"


@dataclass
class Logged:
    method: str
    host: str
    path: str
    range: str | None
    authorization: str | None


@dataclass
class FakeNgc:
    models: dict[str, dict[str, dict[str, bytes]]] = field(
        default_factory=dict
    )  # org/[team/]model -> version -> files
    nvapi_keys: set[str] = field(default_factory=set)
    legacy_keys: set[str] = field(default_factory=set)
    log: list[Logged] = field(default_factory=list)
    cuts: dict[str, int] = field(default_factory=dict)  # storage path -> bytes sent before the line drops
    inflate: dict[str, int] = field(default_factory=dict)  # storage path -> bytes sent beyond the Range
    sent: list[int] = field(
        default_factory=list
    )  # bytes an inflated answer got out before the client hung up

    def start(self) -> FakeNgc:
        class Handler(_Handler):
            pass

        Handler.ngc = self
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add_version(self, target: str, version: str, files: dict[str, bytes]) -> None:
        self.models.setdefault(target, {})[version] = dict(files)

    def requests_for(self, part: str) -> list[Logged]:
        return [r for r in self.log if part in r.path]


def route_ngc_to(port: int, monkeypatch) -> None:
    """Send `requests`' traffic for NGC's hosts to 127.0.0.1:`port` (see the module docstring)."""
    from requests.adapters import HTTPAdapter

    original = HTTPAdapter.send

    def send(self, request, **kwargs):
        url = urlsplit(request.url)
        if url.hostname in (API, AUTH, STORAGE):
            request = request.copy()
            request.url = f"http://127.0.0.1:{port}/{url.hostname}{url.path}" + (
                f"?{url.query}" if url.query else ""
            )
            kwargs["proxies"] = {}
        return original(self, request, **kwargs)

    monkeypatch.setattr(HTTPAdapter, "send", send)


def sha256_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


_MODEL = r"v2/org/(?P<org>[^/]+)(?:/team/(?P<team>[^/]+))?/models/(?P<model>[^/]+)"


class _Handler(BaseHTTPRequestHandler):
    ngc: FakeNgc
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self._route()

    def do_POST(self) -> None:
        self._route()

    def _route(self) -> None:
        url = urlsplit(self.path)
        host, _, path = unquote(url.path).lstrip("/").partition("/")
        query = parse_qs(url.query)
        self.ngc.log.append(
            Logged(self.command, host, path, self.headers.get("Range"), self.headers.get("Authorization"))
        )
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if host == AUTH and path == "token":
            return self._token()
        if host == STORAGE:
            return self._storage(path)
        if host == API and path == "v3/keys/get-caller-info":
            return self._caller_info(parse_qs(body.decode()).get("credentials", [""])[0])
        if host != API:
            return self._json(404, {"error": "unknown host"})
        if not self._authorized():
            return self._json(401, {"requestStatus": {"statusCode": "UNAUTHORIZED"}})
        self._api(path, query)

    # -- auth --------------------------------------------------------------------------------------

    def _caller_info(self, key: str) -> None:
        if key not in self.ngc.nvapi_keys:
            return self._json(401, {"requestStatus": {"statusCode": "UNAUTHORIZED"}})
        self._json(200, {"type": "PERSONAL_KEY", "orgName": "nim", "user": {"roles": [{"orgName": "nim"}]}})

    def _token(self) -> None:
        raw = (self.headers.get("Authorization") or "").removeprefix("Basic ")
        key = base64.b64decode(raw).decode().removeprefix("$oauthtoken:") if raw else ""
        if key not in self.ngc.legacy_keys:
            return self._json(401, {"error": "invalid credentials"})
        self._json(200, {"token": f"tok-{key}", "expires_in": 3600})

    def _authorized(self) -> bool:
        token = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
        valid = self.ngc.nvapi_keys | {f"tok-{k}" for k in self.ngc.legacy_keys}
        return token in valid

    # -- the registry ------------------------------------------------------------------------------

    def _api(self, path: str, query: dict) -> None:
        m = re.fullmatch(_MODEL + r"(?:/versions/(?P<v>[^/]+)(?P<list>/files)?|/(?P<dv>[^/]+)/files)?", path)
        if m is None:
            return self._json(404, {"error": "no such endpoint"})
        target = "/".join(p for p in (m["org"], m["team"], m["model"]) if p)
        versions = self.ngc.models.get(target)
        version = m["v"] or m["dv"]
        if versions is None or (version is not None and version not in versions):
            return self._json(404, {"requestStatus": {"statusCode": "NOT_FOUND"}})
        if version is None:
            return self._json(200, {"model": {"name": m["model"], "latestVersionIdStr": max(versions)}})
        files = versions[version]
        if m["dv"]:
            return self._download_urls(target, version, files, query.get("path", [None])[0])
        if m["list"]:
            listed = [
                {"path": p, "sizeInBytes": len(d), "sha256_base64": sha256_b64(d)}
                for p, d in sorted(files.items())
            ]
            page = {"index": 0, "size": 1000, "totalPages": 1, "totalResults": len(listed)}
            return self._json(200, {"modelFiles": listed, "paginationInfo": page})
        self._json(200, {"modelVersion": {"versionId": version, "status": "UPLOAD_COMPLETE"}})

    def _download_urls(self, target: str, version: str, files: dict, path: str | None) -> None:
        names = [path] if path else sorted(files)
        if path and path not in files:
            return self._json(404, {"requestStatus": {"statusCode": "NOT_FOUND"}})
        urls = [f"https://{STORAGE}/{target}/{version}/{n}?X-Amz-Signature=fake" for n in names]
        self._json(200, {"urls": urls, "filepath": names})

    def _storage(self, path: str) -> None:
        parts = path.split("/")
        target = version = name = None
        for split in range(1, len(parts) - 1):  # org/[team/]model / version / file path (may contain '/')
            t, v, n = "/".join(parts[:split]), parts[split], "/".join(parts[split + 1 :])
            if n in self.ngc.models.get(t, {}).get(v, {}):
                target, version, name = t, v, n
                break
        if name is None:
            return self._json(404, {"error": "NoSuchKey"})
        data = self.ngc.models[target][version][name]
        m = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range") or "")
        start, end = (int(m[1]), int(m[2]) + 1) if m else (0, len(data))
        chunk = data[start:end]
        if path in self.ngc.inflate:
            return self._inflated(chunk, self.ngc.inflate[path], partial=bool(m))
        cut = self.ngc.cuts.get(path)
        self.send_response(206 if m else 200)
        self.send_header("Content-Length", str(len(chunk)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if cut is None:
            self.wfile.write(chunk)
            return
        self.wfile.write(chunk[:cut])  # the line drops: the SDK sees a short body, retries, then gives up
        self.wfile.flush()
        self.close_connection = True

    def _inflated(self, chunk: bytes, extra: int, *, partial: bool) -> None:
        """The range, then `extra` more bytes (a storage that ignores the Range, or lies), 1 MiB at a time."""
        self.send_response(206 if partial else 200)
        self.send_header("Content-Length", str(len(chunk) + extra))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        sent = 0
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client stops reading
            for block in [chunk] + [bytes(1 << 20)] * (extra >> 20):
                self.wfile.write(block)
                sent += len(block)
        self.ngc.sent.append(sent)
        self.close_connection = True

    def _json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
