"""A Hugging Face Hub on loopback, speaking the part of the Hub's HTTP API that huggingface_hub uses to
download files, so that the real client code runs against it (HF_ENDPOINT / `endpoint=`).

What it answers, as huggingface.co does (huggingface_hub 2.4: hf_api.model_info, file_download.
get_hf_file_metadata / http_get, utils/_http.hf_raise_for_status):

  GET  /api/models/{repo}[/revision/{rev}][?blobs=True]  model info: `sha` (the commit), `siblings`
  HEAD /{repo}/resolve/{rev}/{file}   git file: 200 + ETag (git blob sha1), X-Repo-Commit, Content-Length
                                      LFS file: 302 to the CDN + X-Linked-Etag (sha256), X-Linked-Size
  GET  /{repo}/resolve/{rev}/{file}   the bytes (Range honoured), or the same 302 for LFS files
  GET  /cdn/{sha256}                  the CDN, on host `localhost` (a different host from 127.0.0.1, so the
                                      client keeps the token from it, as from a real signed CDN URL)

Errors carry the Hub's headers: X-Error-Code RepoNotFound / RevisionNotFound / EntryNotFound, and 401
`X-Error-Message: Invalid credentials in Authorization header` for a bad token. Faults for tests: a CDN
transfer can be cut after N bytes, then fail with 503 (`die`) or hang until `release()` (`hang`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin")


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]]  # sha -> files
    branches: dict[str, str]  # name -> sha
    token: str | None = None  # private: only this token may read it


@dataclass
class Fault:
    after: int  # bytes sent before the connection breaks
    mode: str  # "die": later requests get 503 until heal(); "hang": block until release(), then break;
    # "inflate": the body is `after` bytes longer than the HEAD announced (and its Content-Length says so)
    tripped: bool = False


@dataclass
class Logged:
    method: str
    host: str
    path: str
    range: str | None
    authorization: str | None


@dataclass
class FakeHub:
    repos: dict[str, Repo] = field(default_factory=dict)
    log: list[Logged] = field(default_factory=list)
    faults: dict[str, Fault] = field(default_factory=dict)  # sha256 of a blob -> fault
    _release: threading.Event = field(default_factory=threading.Event)

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        self._release.set()
        self.server.shutdown()
        self.server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add_repo(
        self, repo_id: str, files: dict[str, bytes], *, token: str | None = None, branch: str = "main"
    ) -> str:
        """Commit `files` to `branch` of `repo_id` (created if new); returns the commit sha."""
        commit = hashlib.sha1(repr(sorted((k, sha256(v)) for k, v in files.items())).encode()).hexdigest()
        repo = self.repos.setdefault(repo_id, Repo({}, {}, token))
        repo.commits[commit] = dict(files)
        repo.branches[branch] = commit
        return commit

    def cut(self, data: bytes, *, after: int, mode: str = "die") -> None:
        self.faults[sha256(data)] = Fault(after, mode)

    def inflate(self, data: bytes, *, extra: int) -> None:
        """The CDN serves `data` with `extra` more bytes than its HEAD announced (a lying mirror)."""
        self.faults[sha256(data)] = Fault(extra, "inflate")

    def heal(self) -> None:
        self.faults.clear()
        self._release.set()

    def requests_for(self, path_part: str) -> list[Logged]:
        return [r for r in self.log if path_part in r.path]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


def is_lfs(name: str) -> bool:
    return name.endswith(LFS_SUFFIXES)


_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/?]+))?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_CDN = re.compile(r"^/cdn/(?P<sha>[0-9a-f]{64})$")


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._route(body=False)

    def do_GET(self) -> None:
        self._route(body=True)

    def _route(self, body: bool) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path)
        self.hub.log.append(
            Logged(
                self.command,
                self.headers.get("Host", ""),
                path,
                self.headers.get("Range"),
                self.headers.get("Authorization"),
            )
        )
        if m := _CDN.match(path):
            return self._cdn(m["sha"], body)
        if m := _INFO.match(path):
            return self._info(m["repo"], unquote(m["rev"] or "main"), "blobs" in parse_qs(url.query))
        if m := _RESOLVE.match(path):
            return self._resolve(m["repo"], unquote(m["rev"]), m["file"], body)
        self._error(404, None, "Not Found")

    # -- the Hub's API -----------------------------------------------------------------------------

    def _repo_and_commit(self, repo_id: str, rev: str) -> tuple[Repo, str] | None:
        token = (self.headers.get("Authorization") or "").removeprefix("Bearer ").strip() or None
        valid = {r.token for r in self.hub.repos.values() if r.token}
        if token is not None and token not in valid:
            self._error(401, None, "Invalid credentials in Authorization header")
            return None
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.token and token != repo.token):
            # the Hub answers 401 to anonymous callers for private and missing repos alike
            self._error(404 if token or repo is None else 401, "RepoNotFound", "Repository not found")
            return None
        commit = repo.branches.get(rev) or (rev if rev in repo.commits else None)
        if commit is None:
            self._error(404, "RevisionNotFound", "Invalid rev id")
            return None
        return repo, commit

    def _info(self, repo_id: str, rev: str, blobs: bool) -> None:
        found = self._repo_and_commit(repo_id, rev)
        if found is None:
            return
        repo, commit = found
        siblings = []
        for name, data in sorted(repo.commits[commit].items()):
            sib: dict = {"rfilename": name}
            if blobs:
                sib.update(size=len(data), blobId=git_blob_sha1(data))
                if is_lfs(name):
                    sib["lfs"] = {"sha256": sha256(data), "size": len(data), "pointerSize": 134}
            siblings.append(sib)
        info = {
            "_id": commit[:24],
            "id": repo_id,
            "sha": commit,
            "private": bool(repo.token),
            "siblings": siblings,
        }
        self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body=True)

    def _resolve(self, repo_id: str, rev: str, name: str, body: bool) -> None:
        found = self._repo_and_commit(repo_id, rev)
        if found is None:
            return
        repo, commit = found
        data = repo.commits[commit].get(name)
        if data is None:
            return self._error(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": commit})
        headers = {"X-Repo-Commit": commit}
        if is_lfs(name):
            host = f"localhost:{self.hub.port}"
            headers.update(
                {
                    "Location": f"http://{host}/cdn/{sha256(data)}",
                    "X-Linked-Etag": f'"{sha256(data)}"',
                    "X-Linked-Size": str(len(data)),
                    "ETag": f'"{git_blob_sha1(data)}"',  # of the pointer file, as on the Hub
                }
            )
            return self._send(302, b"", headers, body=body)
        headers["ETag"] = f'"{git_blob_sha1(data)}"'
        self._send_range(data, headers, body)

    def _cdn(self, digest: str, body: bool) -> None:
        blobs = (d for r in self.hub.repos.values() for files in r.commits.values() for d in files.values())
        data = next((d for d in blobs if sha256(d) == digest), None)
        if data is None:
            return self._error(404, None, "NoSuchKey")
        fault = self.hub.faults.get(digest)
        if fault is not None and fault.tripped and fault.mode == "die":
            return self._error(503, None, "Service Unavailable")
        self._send_range(data, {"ETag": f'"{digest}"'}, body, fault=fault)

    # -- HTTP plumbing -----------------------------------------------------------------------------

    def _send_range(self, data: bytes, headers: dict, body: bool, fault: Fault | None = None) -> None:
        start, status = 0, 200
        if body and (m := re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")):
            start, status = int(m[1]), 206
            if start >= len(data):
                return self._error(416, None, "Range Not Satisfiable")
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        headers.update({"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"})
        chunk = data[start:]
        if fault is None or not body:
            return self._send(status, chunk, headers, body=body)
        fault.tripped = True
        if fault.mode == "inflate":
            self._send_headers(status, len(chunk) + fault.after, headers)
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client stops reading
                self.wfile.write(chunk + bytes(fault.after))
            self.close_connection = True
            return
        self._send_headers(status, len(chunk), headers)
        self.wfile.write(chunk[: max(0, fault.after - start)])
        self.wfile.flush()
        if fault.mode == "hang":
            self.hub._release.wait()
        self.close_connection = True  # the rest never comes: the client sees a short body

    def _error(self, status: int, code: str | None, message: str, extra: dict | None = None) -> None:
        headers = {"X-Error-Message": message, "Content-Type": "application/json", **(extra or {})}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, json.dumps({"error": message}).encode(), headers, body=self.command != "HEAD")

    def _send(self, status: int, payload: bytes, headers: dict, *, body: bool) -> None:
        self._send_headers(status, len(payload), headers)
        if body:
            self.wfile.write(payload)

    def _send_headers(self, status: int, length: int, headers: dict) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(length))
        self.end_headers()
