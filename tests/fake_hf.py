"""A small, real HTTP fake of the Hugging Face Hub, for tests (stdlib only).

The real ``huggingface_hub`` client talks HTTP to it: point ``HfApi(endpoint=hub.url)`` or
``hf_hub_download(..., endpoint=hub.url)`` at a started :class:`FakeHub`. It answers the endpoints
``huggingface_hub`` 2.4 calls, with the JSON fields, headers and error headers it reads:

* ``GET /api/models``: ``filter`` (repeatable, every value must be in the tags), ``author``,
  ``search`` (case-insensitive substring of the id), ``sort`` (``downloads``, ``likes``,
  ``lastModified``, ``createdAt``: descending; default or anything else: by id), ``limit``;
  ``full``/``expand``/``config``/``cardData`` are accepted and ignored (every field is always sent).
  Pages hold at most ``min(limit, page_size)`` items; a ``Link: <...&cursor=N>; rel="next"`` header
  points at the next page while items remain (``huggingface_hub`` follows it).
* ``GET /api/models/{repo_id}`` and ``.../revision/{rev}``; ``blobs=true`` adds size/blobId/lfs per sibling.
* ``GET /api/models/{repo_id}/tree/{rev}[/{path}]`` with ``recursive`` and ``expand``, paginated likewise.
* ``HEAD``/``GET /{repo_id}/resolve/{rev}/{filename}``: ``ETag`` (quoted sha256 for LFS files, git
  blob sha1 otherwise), ``X-Linked-Etag``/``X-Linked-Size`` (LFS files), ``X-Repo-Commit``,
  ``Content-Length``, ``Accept-Ranges``; ``Range: bytes=A-``, ``bytes=A-B`` and ``bytes=-N`` give 206
  with ``Content-Range``; an unsatisfiable range gives 416. Always 200 with the bytes, never a
  redirect, and no Xet headers (so the client downloads over plain HTTP even with hf_xet installed).

Errors are 404s carrying ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``,
``EntryNotFound``), ``X-Error-Message`` and a JSON ``{"error": ...}`` body, which
``huggingface_hub.utils.hf_raise_for_status`` turns into ``RepositoryNotFoundError``,
``RevisionNotFoundError`` and ``RemoteEntryNotFoundError``.

Valid revisions of a repo are ``"main"`` and its commit ``sha``.

Files given to :meth:`FakeHub.add_repo` as ``bytes`` have real content. Files given as an ``int`` are
*metadata only*: listings, ``model_info`` and ``HEAD`` report the declared size (with a made-up but
stable sha256), while ``GET`` of their content answers 404 ``EntryNotFound`` (so an unintended
download fails loudly), unless ``hub.serve_declared_as_zeros = True``, which streams that many
zero bytes instead (their sha256 then does not match the content: the client does not check it).

Every response carries ``Connection: close``, so a stopped hub refuses every later request at once
(no pooled keep-alive connection survives :meth:`FakeHub.stop`).
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
import traceback
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

__all__ = ["FakeFile", "FakeHub", "FakeRepo"]

LFS_SUFFIXES = (".gguf", ".safetensors", ".bin", ".onnx")
LFS_MIN_SIZE = 1024  # files larger than this are stored with LFS, like the Hub's default .gitattributes
_CHUNK = 256 * 1024
_TRUE = {"1", "true", "yes", "on"}


def _git_blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass(frozen=True)
class FakeFile:
    path: str
    size: int
    content: bytes | None  # None: metadata only (size declared, no content)
    sha256: str
    is_lfs: bool
    blob_id: str  # git oid: of the content, or of the LFS pointer file for LFS files
    pointer_size: int

    @classmethod
    def make(cls, repo_id: str, path: str, data: bytes | int) -> FakeFile:
        if isinstance(data, (bytes, bytearray, memoryview)):
            content: bytes | None = bytes(data)
            size = len(content)
            sha256 = hashlib.sha256(content).hexdigest()
        elif isinstance(data, int) and not isinstance(data, bool) and data >= 0:
            content = None
            size = data
            sha256 = hashlib.sha256(f"fake-hf:{repo_id}:{path}:{size}".encode()).hexdigest()
        else:
            raise TypeError(f"file {path!r}: expected bytes or a non-negative int size, got {data!r}")
        is_lfs = size > LFS_MIN_SIZE or path.lower().endswith(LFS_SUFFIXES)
        if is_lfs:
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()
            blob_id, pointer_size = _git_blob_sha1(pointer), len(pointer)
        elif content is not None:
            blob_id, pointer_size = _git_blob_sha1(content), 0
        else:
            blob_id, pointer_size = hashlib.sha1(sha256.encode()).hexdigest(), 0
        return cls(path, size, content, sha256, is_lfs, blob_id, pointer_size)

    @property
    def etag(self) -> str:
        return self.sha256 if self.is_lfs else self.blob_id

    def lfs_json(self, hash_key: str) -> dict:
        return {hash_key: self.sha256, "size": self.size, "pointerSize": self.pointer_size}


@dataclass
class FakeRepo:
    repo_id: str
    files: dict[str, FakeFile]
    tags: list[str]
    downloads: int
    likes: int
    last_modified: str
    created_at: str
    sha: str
    library_name: str | None
    extra: dict = field(default_factory=dict)

    def model_json(self, *, blobs: bool = False) -> dict:
        author = self.repo_id.split("/", 1)[0] if "/" in self.repo_id else None
        siblings = []
        for f in sorted(self.files.values(), key=lambda f: f.path):
            item: dict = {"rfilename": f.path}
            if blobs:
                item["size"] = f.size
                item["blobId"] = f.blob_id
                if f.is_lfs:
                    item["lfs"] = f.lfs_json("sha256")
            siblings.append(item)
        body = {
            "_id": hashlib.sha1(self.repo_id.encode()).hexdigest()[:24],
            "id": self.repo_id,
            "modelId": self.repo_id,
            "author": author,
            "sha": self.sha,
            "lastModified": self.last_modified,
            "createdAt": self.created_at,
            "private": False,
            "gated": False,
            "disabled": False,
            "downloads": self.downloads,
            "likes": self.likes,
            "tags": list(self.tags),
            "library_name": self.library_name,
            "siblings": siblings,
            "spaces": [],
            "usedStorage": sum(f.size for f in self.files.values()),
        }
        body.update(self.extra)
        return body


class _HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # stop() must not wait for handlers sleeping in delay_s
    allow_reuse_address = True  # restart() binds the same port again

    def __init__(self, address: tuple[str, int], hub: FakeHub):
        self.hub = hub
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.server.hub._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.hub._track(self.connection, False)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # -- plumbing -----------------------------------------------------------------------------

    def _dispatch(self, method: str) -> None:
        self.close_connection = True
        hub = self.server.hub
        split = urlsplit(self.path)
        hub._record(method, unquote(split.path))
        try:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            if hub.delay_s:
                time.sleep(hub.delay_s)
            if hub.fail_status is not None:
                status = int(hub.fail_status)
                raise _HubError(status, None, f"fake_hf: simulated failure {status}")
            params = parse_qsl(split.query, keep_blank_values=True)
            hub._route(self, method, split.path, params)
        except _HubError as err:
            self._send_error(method, err)
        except OSError:
            pass  # client went away, or stop() cut the connection
        except Exception as exc:  # noqa: BLE001 - a bug in the fake: answer 500 rather than drop the connection
            traceback.print_exc()
            try:
                self._send_error(method, _HubError(500, None, f"fake_hf internal error: {exc!r}"))
            except OSError:
                pass

    def _base_url(self) -> str:
        host = self.headers.get("Host")
        return f"http://{host}" if host else self.server.hub.url

    def _send(
        self, method: str, status: int, headers: dict[str, str], body: bytes = b"", *, length: int | None = None
    ) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.send_header("Connection", "close")
        self.end_headers()
        if method != "HEAD" and body:
            self.wfile.write(body)

    def _send_json(self, method: str, obj: object, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(obj).encode()
        self._send(method, 200, {"Content-Type": "application/json; charset=utf-8", **(headers or {})}, body)

    def _send_error(self, method: str, err: _HubError) -> None:
        headers = {"Content-Type": "application/json; charset=utf-8", "X-Error-Message": err.message, **err.headers}
        if err.code:
            headers["X-Error-Code"] = err.code
        self._send(method, err.status, headers, json.dumps({"error": err.message}).encode())


class FakeHub:
    """An HTTP fake of the Hugging Face Hub on ``127.0.0.1``, served from a daemon thread.

    Attributes:
        url: base URL (``http://127.0.0.1:PORT``), set by :meth:`start`.
        requests: ``(method, decoded path without query)`` of every request handled, in order.
        delay_s: seconds slept before answering each request (0: none).
        fail_status: when not None, every request is answered with this status (JSON error body).
        page_size: most items per page of ``/api/models`` and ``/tree`` (default 25).
        serve_declared_as_zeros: GET of a size-only file streams zeros instead of answering 404.
    """

    def __init__(self) -> None:
        self.delay_s: float = 0.0
        self.fail_status: int | None = None
        self.page_size: int = 25
        self.serve_declared_as_zeros: bool = False
        self.bytes_per_s: float = 0.0  # > 0: file downloads are throttled to this rate
        self.bytes_served: dict[str, int] = {}  # file path -> content bytes written to clients
        self.requests: list[tuple[str, str]] = []
        self._repos: dict[str, FakeRepo] = {}
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._port: int = 0

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if not self._port:
            raise RuntimeError("FakeHub is not started")
        return f"http://127.0.0.1:{self._port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> str:
        """Serve (on a free port the first time, on the same port after :meth:`stop`); return the URL."""
        if self._server is not None:
            return self.url
        server = _Server(("127.0.0.1", self._port), self)
        self._port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name=f"fake-hf:{self._port}", daemon=True
        )
        self._thread.start()
        return self.url

    def stop(self) -> None:
        """Stop serving: the port is closed (connections refused) and in-flight requests are cut."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def restart(self) -> str:
        """Serve again on the same port with the same data (stopping first if running)."""
        if not self._port:
            raise RuntimeError("FakeHub was never started")
        self.stop()
        return self.start()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- data ---------------------------------------------------------------------------------

    def add_repo(
        self,
        repo_id: str,
        files: dict[str, bytes | int],
        *,
        tags: list[str] | None = None,
        downloads: int = 0,
        likes: int = 0,
        last_modified: str = "2026-01-01T00:00:00.000Z",
        sha: str | None = None,
        created_at: str | None = None,
        library_name: str | None = None,
        extra: dict | None = None,
    ) -> FakeRepo:
        """Add (or replace) a model repo. ``files`` maps repo paths to content (bytes) or a declared size (int).

        ``tags`` default: ``"gguf"`` if any ``*.gguf`` file, ``"safetensors"`` if any ``*.safetensors``.
        ``library_name`` default: ``"gguf"`` when there are ``*.gguf`` files, else None.
        ``sha`` default: a stable 40-hex commit id derived from the id and the files.
        ``extra``: more top-level JSON fields for the model (e.g. ``{"pipeline_tag": ..., "gguf": {...}}``).
        """
        built = {path.strip("/"): FakeFile.make(repo_id, path.strip("/"), data) for path, data in files.items()}
        names = [p.lower() for p in built]
        has_gguf = any(p.endswith(".gguf") for p in names)
        if tags is None:
            tags = (["gguf"] if has_gguf else []) + (
                ["safetensors"] if any(p.endswith(".safetensors") for p in names) else []
            )
        if sha is None:
            digest = hashlib.sha1(repo_id.encode())
            for path in sorted(built):
                digest.update(f"\0{path}\0{built[path].sha256}".encode())
            sha = digest.hexdigest()
        repo = FakeRepo(
            repo_id=repo_id,
            files=built,
            tags=list(tags),
            downloads=downloads,
            likes=likes,
            last_modified=last_modified,
            created_at=created_at or last_modified,
            sha=sha,
            library_name=library_name if library_name is not None else ("gguf" if has_gguf else None),
            extra=dict(extra or {}),
        )
        with self._lock:
            self._repos[repo_id] = repo
        return repo

    def remove_repo(self, repo_id: str) -> None:
        with self._lock:
            self._repos.pop(repo_id, None)

    def repo(self, repo_id: str) -> FakeRepo:
        with self._lock:
            return self._repos[repo_id]

    # -- request log --------------------------------------------------------------------------

    def count(self, method: str, path_prefix: str = "/") -> int:
        """How many requests with this method had a (decoded) path starting with ``path_prefix``."""
        method = method.upper()
        with self._lock:
            return sum(1 for m, p in self.requests if m == method and p.startswith(path_prefix))

    def clear_requests(self) -> None:
        with self._lock:
            self.requests.clear()

    def _record(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((method, path))

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)

    # -- routing ------------------------------------------------------------------------------

    def _lookup(self, segments: list[str]) -> tuple[FakeRepo, list[str]]:
        """Find the repo named by the first one or two path segments; return it and the rest."""
        with self._lock:
            if len(segments) >= 2 and f"{segments[0]}/{segments[1]}" in self._repos:
                return self._repos[f"{segments[0]}/{segments[1]}"], segments[2:]
            if segments and segments[0] in self._repos:
                return self._repos[segments[0]], segments[1:]
        raise _HubError(404, "RepoNotFound", "Repository not found")

    @staticmethod
    def _check_revision(repo: FakeRepo, revision: str) -> None:
        if revision not in ("main", repo.sha):
            raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")

    def _route(self, h: _Handler, method: str, raw_path: str, params: list[tuple[str, str]]) -> None:
        segments = [unquote(s) for s in raw_path.split("/") if s]
        if method not in ("GET", "HEAD"):
            raise _HubError(405, None, f"fake_hf: {method} is not supported")
        if segments[:2] == ["api", "models"]:
            rest = segments[2:]
            if not rest:
                return self._list_models(h, method, params)
            repo, tail = self._lookup(rest)
            if not tail:
                return self._model_info(h, method, repo, "main", params)
            if tail[0] == "revision" and len(tail) == 2:
                return self._model_info(h, method, repo, tail[1], params)
            if tail[0] == "tree" and len(tail) >= 2:
                return self._tree(h, method, repo, tail[1], "/".join(tail[2:]), params)
            raise _HubError(404, None, "Not Found")
        for i in (2, 1):  # /{namespace}/{name}/resolve/... or /{name}/resolve/...
            if len(segments) > i + 1 and segments[i] == "resolve":
                return self._resolve(h, method, segments[:i], segments[i + 1], "/".join(segments[i + 2 :]))
        raise _HubError(404, None, "Not Found")

    def _paginate(
        self, h: _Handler, method: str, items: list, params: list[tuple[str, str]], page_limit: int | None = None
    ) -> None:
        cursor = 0
        for key, value in params:
            if key == "cursor":
                try:
                    cursor = max(0, int(value))
                except ValueError:
                    raise _HubError(400, None, f"Invalid cursor: {value}") from None
        size = max(1, self.page_size if page_limit is None else min(page_limit, self.page_size))
        page = items[cursor : cursor + size]
        headers = {}
        if cursor + size < len(items):
            query = urlencode([(k, v) for k, v in params if k != "cursor"] + [("cursor", str(cursor + size))])
            path = urlsplit(h.path).path
            headers["Link"] = f'<{h._base_url()}{path}?{query}>; rel="next"'
        h._send_json(method, page, headers)

    def _list_models(self, h: _Handler, method: str, params: list[tuple[str, str]]) -> None:
        filters = [v for k, v in params if k == "filter" and v]
        search = next((v for k, v in params if k == "search"), "").lower()
        author = next((v for k, v in params if k == "author"), "")
        sort = next((v for k, v in params if k == "sort"), "")
        limit: int | None = None
        for key, value in params:
            if key == "limit":
                try:
                    limit = int(value)
                except ValueError:
                    raise _HubError(400, None, f"Invalid limit: {value}") from None
        with self._lock:
            repos = list(self._repos.values())
        repos = [
            r
            for r in repos
            if all(f in r.tags for f in filters)
            and search in r.repo_id.lower()
            and (not author or r.repo_id.split("/", 1)[0] == author)
        ]
        repos.sort(key=lambda r: r.repo_id)
        keys = {"downloads": "downloads", "likes": "likes", "lastModified": "last_modified", "createdAt": "created_at"}
        if sort in keys:
            repos.sort(key=lambda r: getattr(r, keys[sort]), reverse=True)  # stable: ties stay by id
        if limit is not None and limit <= 0:
            limit = None
        self._paginate(h, method, [r.model_json() for r in repos], params, limit)

    def _model_info(self, h: _Handler, method: str, repo: FakeRepo, revision: str, params) -> None:
        self._check_revision(repo, revision)
        blobs = any(k == "blobs" and v.lower() in _TRUE for k, v in params)
        h._send_json(method, repo.model_json(blobs=blobs))

    def _tree(self, h: _Handler, method: str, repo: FakeRepo, revision: str, path: str, params) -> None:
        self._check_revision(repo, revision)
        recursive = any(k == "recursive" and v.lower() in _TRUE for k, v in params)
        expand = any(k == "expand" and v.lower() in _TRUE for k, v in params)
        path = path.strip("/")
        prefix = f"{path}/" if path else ""
        if path and path in repo.files:
            raise _HubError(400, None, f"{path} is a file, not a directory")
        if path and not any(p.startswith(prefix) for p in repo.files):
            raise _HubError(404, "EntryNotFound", f"Path {path} not found")
        last_commit = {"id": repo.sha, "title": "Upload files", "date": repo.last_modified}
        dirs: set[str] = set()
        files: list[FakeFile] = []
        for p, f in repo.files.items():
            if not p.startswith(prefix):
                continue
            parts = p[len(prefix) :].split("/")
            for depth in range(1, len(parts)):
                dirs.add(prefix + "/".join(parts[:depth]))
                if not recursive:
                    break
            if recursive or len(parts) == 1:
                files.append(f)
        entries: list[dict] = []
        for d in sorted(dirs):
            oid = hashlib.sha1(f"{repo.sha}:{d}".encode()).hexdigest()
            entry: dict = {"type": "directory", "oid": oid, "size": 0, "path": d}
            if expand:
                entry["lastCommit"] = last_commit
            entries.append(entry)
        for f in sorted(files, key=lambda f: f.path):
            entry = {"type": "file", "oid": f.blob_id, "size": f.size, "path": f.path}
            if f.is_lfs:
                entry["lfs"] = f.lfs_json("oid")
            if expand:
                entry["lastCommit"] = last_commit
                entry["securityFileStatus"] = {
                    "status": "safe",
                    "avScan": {"virusFound": False, "virusNames": None},
                    "pickleImportScan": None,
                }
            entries.append(entry)
        self._paginate(h, method, entries, params)

    def _resolve(self, h: _Handler, method: str, repo_segments: list[str], revision: str, filename: str) -> None:
        repo, rest = self._lookup(repo_segments)
        if rest:
            raise _HubError(404, "RepoNotFound", "Repository not found")
        self._check_revision(repo, revision)
        commit = {"X-Repo-Commit": repo.sha}
        f = repo.files.get(filename)
        if f is None:
            raise _HubError(404, "EntryNotFound", "Entry not found", commit)
        headers = {
            **commit,
            "ETag": f'"{f.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if f.is_lfs:
            headers["X-Linked-Etag"] = f'"{f.sha256}"'
            headers["X-Linked-Size"] = str(f.size)
        if method == "HEAD":
            return h._send(method, 200, headers, length=f.size)
        if f.content is None and not self.serve_declared_as_zeros:
            raise _HubError(404, "EntryNotFound", "fake_hf: metadata-only file (declared size, no content)", commit)
        start, end = 0, f.size - 1
        status = 200
        range_header = h.headers.get("Range")
        if range_header:
            parsed = _parse_range(range_header, f.size)
            if parsed is None:
                raise _HubError(416, None, "Range Not Satisfiable", {"Content-Range": f"bytes */{f.size}"})
            start, end = parsed
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{f.size}"
        length = max(0, end - start + 1)
        h.send_response(status)
        for key, value in headers.items():
            h.send_header(key, value)
        h.send_header("Content-Length", str(length))
        h.send_header("Connection", "close")
        h.end_headers()
        chunk = min(_CHUNK, max(int(self.bytes_per_s / 20), 1024)) if self.bytes_per_s else _CHUNK
        view = memoryview(f.content)[start : start + length] if f.content is not None else None
        zeros = bytes(min(chunk, length)) if view is None else b""
        for i in range(0, length, chunk):
            n = min(chunk, length - i)
            h.wfile.write(view[i : i + n] if view is not None else zeros[:n])
            with self._lock:
                self.bytes_served[filename] = self.bytes_served.get(filename, 0) + n
            if self.bytes_per_s:
                time.sleep(n / self.bytes_per_s)


def _parse_range(value: str, size: int) -> tuple[int, int] | None:
    """One ``bytes=`` range as inclusive (start, end), clamped to the file; None if unsatisfiable."""
    unit, _, spec = value.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, _, last = spec.strip().partition("-")
    try:
        if first == "":
            n = int(last)
            if n <= 0:
                return None
            return max(0, size - n), size - 1
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if start >= size or end < start:
        return None
    return start, min(end, size - 1)
