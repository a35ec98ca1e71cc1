"""A loopback HTTP server that answers like the Hugging Face Hub, for the real huggingface_hub client.

Endpoints (what huggingface_hub 2.x calls for model_info / hf_hub_download / snapshot_download):
    GET  /api/models/ORG/NAME[/revision/REV][?blobs=true]  -> JSON: id, sha, gated, siblings
    GET  /api/models/ORG/NAME/tree/REV[?recursive=true]    -> JSON list of files (and folders)
    HEAD|GET /ORG/NAME/resolve/REV/PATH
         regular file -> 200 with X-Repo-Commit, ETag (git blob sha1), Content-Length
         LFS file     -> 302 to the "CDN" (a second server on another port, so the client treats
                         it as a foreign host) with X-Repo-Commit, X-Linked-Etag (sha256),
                         X-Linked-Size
         errors       -> X-Error-Code RepoNotFound / RevisionNotFound / EntryNotFound / GatedRepo
    GET  (CDN) /blobs/SHA256  with Range support (206 + Content-Range)

Faults for tests: `cut[path] = n` sends n bytes of the file then drops the connection (once);
`fail_after_cut = True` makes a cut also set `failing`, which answers 503 to every later CDN
GET until the test clears it (a network that stays down, so the client gives up).
Every request is recorded in `log` as (method, path, headers).
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

LFS_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class FakeRepo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> {path: bytes}
    refs: dict[str, str] = field(default_factory=dict)                  # branch/tag -> sha
    gated: bool = False
    allowed_tokens: set[str] = field(default_factory=set)

    def add_commit(self, files: dict[str, bytes], ref: str = "main") -> str:
        h = hashlib.sha1(json.dumps(sorted((p, git_blob_sha1(b)) for p, b in files.items())).encode())
        h.update(str(len(self.commits)).encode())
        sha = h.hexdigest()
        self.commits[sha] = dict(files)
        self.refs[ref] = sha
        return sha

    def resolve(self, rev: str) -> str | None:
        if rev in self.commits:
            return rev
        return self.refs.get(rev)


class FakeHub:
    def __init__(self):
        self.repos: dict[str, FakeRepo] = {}
        self.log: list[tuple[str, str, dict]] = []
        self.cut: dict[str, int] = {}
        self.fail_after_cut = False
        self.failing = False  # set by a cut when fail_after_cut; clear it to "restore the network"
        self._cut_names: dict[str, str] = {}
        self._blobs: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._closed = False
        self.hub = ThreadingHTTPServer(("127.0.0.1", 0), self._handler(cdn=False))
        self.cdn = ThreadingHTTPServer(("127.0.0.1", 0), self._handler(cdn=True))
        for server in (self.hub, self.cdn):
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.hub.server_address[1]}"

    @property
    def cdn_url(self) -> str:
        return f"http://127.0.0.1:{self.cdn.server_address[1]}"

    def add_repo(self, repo_id: str, files: dict[str, bytes] | Path, **kw) -> FakeRepo:
        if isinstance(files, Path):
            files = {str(p.relative_to(files)): p.read_bytes() for p in sorted(files.rglob("*")) if p.is_file()}
        repo = self.repos.setdefault(repo_id, FakeRepo(**kw))
        repo.add_commit(files)
        return repo

    def requests(self, method: str | None = None, contains: str = "") -> list[tuple[str, str, dict]]:
        with self._lock:
            return [r for r in self.log if (method is None or r[0] == method) and contains in r[1]]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for server in (self.hub, self.cdn):
            server.shutdown()
            server.server_close()

    # --- request handling ----------------------------------------------------------------------

    def _handler(self, cdn: bool):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                hub._record(self)
                (hub._cdn if cdn else hub._route)(self, head=False)

            def do_HEAD(self):
                hub._record(self)
                (hub._cdn if cdn else hub._route)(self, head=True)

        return Handler

    def _record(self, h) -> None:
        with self._lock:
            self.log.append((h.command, h.path, {k.lower(): v for k, v in h.headers.items()}))

    @staticmethod
    def _send(h, status: int, headers: dict | None = None, body: bytes = b"", head: bool = False) -> None:
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, str(v))
        if "Content-Length" not in (headers or {}):
            h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if body and not head:
            h.wfile.write(body)

    def _error(self, h, status: int, code: str, message: str, head: bool, extra: dict | None = None) -> None:
        body = json.dumps({"error": message}).encode()
        self._send(h, status, {"X-Error-Code": code, "X-Error-Message": message,
                               "Content-Type": "application/json", **(extra or {})}, body, head)

    def _authorized(self, h, repo: FakeRepo) -> tuple[bool, int]:
        if not repo.gated:
            return True, 200
        auth = h.headers.get("authorization", "")
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
        if token is None:
            return False, 401
        return token in repo.allowed_tokens, 403

    def _route(self, h, head: bool) -> None:
        url = urlparse(h.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        if parts[:2] == ["api", "models"]:
            return self._api_model(h, parts[2:], parse_qs(url.query), head)
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve(h, "/".join(parts[:2]), parts[3], "/".join(parts[4:]), head)
        self._send(h, 404, body=b"not found", head=head)

    def _api_model(self, h, parts: list[str], query: dict, head: bool) -> None:
        repo_id = "/".join(parts[:2])
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._error(h, 404, "RepoNotFound", "Repository not found", head)
        rev = parts[3] if len(parts) >= 4 and parts[2] in ("revision", "tree") else "main"
        sha = repo.resolve(rev)
        if sha is None:
            return self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
        if parts[2:3] == ["tree"]:
            return self._tree(h, repo.commits[sha], query, head)
        blobs = query.get("blobs", ["false"])[0].lower() == "true"
        siblings = []
        for path, data in sorted(repo.commits[sha].items()):
            entry = {"rfilename": path}
            if blobs:
                entry.update(size=len(data), blobId=git_blob_sha1(data))
                if path.endswith(LFS_SUFFIXES):
                    entry["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
                                    "pointerSize": 134}
            siblings.append(entry)
        body = json.dumps({"_id": sha[:24], "id": repo_id, "modelId": repo_id, "sha": sha,
                           "private": False, "gated": "manual" if repo.gated else False,
                           "disabled": False, "tags": [], "siblings": siblings}).encode()
        self._send(h, 200, {"Content-Type": "application/json"}, body, head)

    def _tree(self, h, files: dict[str, bytes], query: dict, head: bool) -> None:
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        entries, folders = [], set()
        for path, data in sorted(files.items()):
            if "/" in path:
                folders.add(path.split("/")[0])
                if not recursive:
                    continue
            entry = {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": path}
            if path.endswith(LFS_SUFFIXES):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        entries += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": f} for f in sorted(folders)]
        self._send(h, 200, {"Content-Type": "application/json"}, json.dumps(entries).encode(), head)

    def _resolve(self, h, repo_id: str, rev: str, path: str, head: bool) -> None:
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._error(h, 404, "RepoNotFound", "Repository not found", head)
        ok, status = self._authorized(h, repo)
        if not ok:
            return self._error(h, status, "GatedRepo",
                               f"Access to model {repo_id} is restricted. You must have access to it "
                               "and be authenticated to access it. Please log in.", head)
        sha = repo.resolve(rev)
        if sha is None:
            return self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
        data = repo.commits[sha].get(path)
        if data is None:
            return self._error(h, 404, "EntryNotFound", f"{path} does not exist", head,
                               {"X-Repo-Commit": sha})
        common = {"X-Repo-Commit": sha, "Accept-Ranges": "bytes"}
        if path.endswith(LFS_SUFFIXES):
            digest = hashlib.sha256(data).hexdigest()
            with self._lock:
                self._blobs[digest] = data
                self._cut_names[digest] = path
            location = f"{self.cdn_url}/blobs/{digest}?sig=test"
            return self._send(h, 302, {**common, "Location": location, "X-Linked-Etag": f'"{digest}"',
                                       "X-Linked-Size": len(data), "ETag": f'"{git_blob_sha1(data)[:20]}"'},
                              head=head)
        self._send(h, 200, {**common, "ETag": f'"{git_blob_sha1(data)}"'}, data, head)

    def _cdn(self, h, head: bool) -> None:
        parts = urlparse(h.path).path.strip("/").split("/")
        with self._lock:
            data = self._blobs.get(parts[-1]) if parts[0] == "blobs" else None
        if data is None:
            return self._send(h, 404, body=b"no such blob", head=head)
        name = self._cut_names.get(parts[-1], "")
        if self.failing and not head:
            return self._send(h, 503, body=b"service unavailable", head=head)
        start, status, headers = 0, 200, {"ETag": f'"{parts[-1]}"', "Accept-Ranges": "bytes"}
        rng = h.headers.get("Range")
        if rng and rng.startswith("bytes="):
            start = int(rng[len("bytes="):].split("-")[0])
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        headers["Content-Length"] = len(body)
        if not head and name in self.cut:
            n = self.cut.pop(name)
            h.send_response(status)
            for k, v in headers.items():
                h.send_header(k, str(v))
            h.end_headers()
            h.wfile.write(body[:n])
            h.wfile.flush()
            self.failing = self.fail_after_cut
            h.close_connection = True
            try:
                h.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        self._send(h, status, headers, body, head)
