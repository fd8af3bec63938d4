"""A Hugging Face Hub-compatible server for tests (FastAPI), started on 127.0.0.1 by a fixture.

It implements what huggingface_hub 2.x calls for model repos on the LFS path
(``HF_HUB_DISABLE_XET=1``): repo creation, model info, tree, refs, commits, tags, preupload,
the ndjson commit endpoint (with ``parentCommit``), the LFS batch/upload/verify protocol, and
``resolve`` (HEAD/GET, with single ``Range: bytes=a-b`` requests). Repos, branches, tags and
commits live in memory; blobs on disk. Fault injection: :meth:`HubState.fail` answers a chosen
endpoint with an HTTP status N times (optionally after a delay); :meth:`HubState.reset` drops the
connection of a file download after some bytes; ``bandwidth`` limits downloads (``down``) and LFS
uploads (``up``) in bytes per second, all connections of a direction together, as one network
link does. Private and gated repos need a token from ``tokens``.

Like the real Hub behind its CDN, the server can also limit each connection on its own
(``per_connection``, bytes per second, downloads and LFS uploads), wait a round trip before
answering each request (``latency``, seconds), and answer ``resolve`` of an LFS file with a 302 to
a signed URL on a second origin that expires after ``redirect_ttl`` seconds (403 afterwards).
``in_flight_most`` and ``uploads_most`` are the most downloads and LFS uploads it served at once.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import hmac
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".h5")
LFS_MIN_SIZE = 10 * 1024 * 1024


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Entry:
    size: int
    sha256: str
    oid: str  # git sha1 of the content (regular) or of the LFS pointer
    lfs: bool


@dataclass
class Commit:
    oid: str
    parent: str | None
    files: dict[str, Entry]
    title: str
    message: str
    date: str


@dataclass
class Repo:
    id: str
    private: bool = False
    gated: bool = False
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, rev: str) -> Commit | None:
        oid = self.branches.get(rev) or self.tags.get(rev)
        if oid is None and re.fullmatch(r"[0-9a-f]{40}", rev):
            oid = rev
        return self.commits.get(oid) if oid else None

    def history(self, oid: str) -> list[Commit]:
        out = []
        while oid:
            c = self.commits[oid]
            out.append(c)
            oid = c.parent
        return out


@dataclass
class Fault:
    method: str
    pattern: re.Pattern
    status: int
    times: int
    delay: float = 0.0
    after: bool = False  # let the request take effect, then answer with the error


@dataclass
class Reset:
    pattern: re.Pattern
    after_bytes: int
    times: int


CHUNK = 1 << 20  # bytes per write of a download: large, so the server takes little CPU


class HubState:
    """Everything the server holds; tests reach it as ``hub.state``."""

    def __init__(self, blob_dir: Path) -> None:
        self.repos: dict[str, Repo] = {}
        self.blob_dir = blob_dir
        self.tokens: set[str] = {"hf_test_token_write"}
        self.faults: list[Fault] = []
        self.resets: list[Reset] = []
        self.bandwidth: dict[str, float | None] = {"down": None, "up": None}
        self.per_connection: float | None = None  # bytes/s of one connection (download or upload)
        self.latency = 0.0  # seconds before each answer
        self.redirect_ttl: float | None = None  # resolve of LFS files: 302 to a URL valid this long
        self.cdn_url = ""  # the origin redirects go to (set by HubServer)
        self.stale_redirects = 0  # redirects still to send that have expired already
        self.in_flight = self.in_flight_most = 0
        self.uploads = self.uploads_most = 0  # LFS uploads in progress, and the most at once
        self.secret = hashlib.sha256(str(time.time_ns()).encode()).digest()
        self.bytes_sent = 0
        self.sent_by_path: collections.Counter[str] = collections.Counter()  # download bytes per URL path
        self._link_free = {"down": 0.0, "up": 0.0}  # when each direction's link is next idle
        self.requests: list[tuple[str, str, str]] = []  # (method, path, authorization)
        self.lock = threading.RLock()
        self._counter = 0

    # -- test helpers
    def fail(self, method: str, path_regex: str, status: int = 500, times: int = 1, delay: float = 0.0,
             after: bool = False) -> None:
        """Answer ``method`` requests matching ``path_regex`` with ``status``, ``times`` times
        (after ``delay`` seconds; with ``after``, only once the request has taken effect)."""
        self.faults.append(Fault(method.upper(), re.compile(path_regex), status, times, delay, after))

    def reset(self, path_regex: str, after_bytes: int, times: int = 1) -> None:
        """Drop the connection of the next ``times`` downloads (``resolve`` GETs) whose path matches
        ``path_regex`` once ``after_bytes`` of the body are sent, as a network reset does."""
        self.resets.append(Reset(re.compile(path_regex), after_bytes, times))

    def expire_redirects(self, times: int) -> None:
        """Send the next ``times`` redirects with a URL that has expired already (as when a client
        follows one late)."""
        self.stale_redirects += times

    def cdn_like(self, per_connection: float = 2e6, latency: float = 0.02,
                 redirect_ttl: float = 60.0) -> None:
        """Behave like the real Hub behind its CDN: each download connection limited to
        ``per_connection`` bytes/s, ``latency`` seconds before each answer, LFS files answered with
        a 302 to a signed URL that expires after ``redirect_ttl`` seconds."""
        self.per_connection, self.latency, self.redirect_ttl = per_connection, latency, redirect_ttl

    def link_delay(self, direction: str, nbytes: int) -> float:
        """Seconds to wait before ``nbytes`` more may pass in ``direction`` at its bandwidth: the
        link is shared, so bytes of concurrent requests queue behind each other."""
        bw = self.bandwidth[direction]
        if not bw:
            return 0.0
        with self.lock:
            now = time.monotonic()
            done = max(now, self._link_free[direction]) + nbytes / bw
            self._link_free[direction] = done
        return done - now

    def _take_reset(self, path: str) -> int | None:
        with self.lock:
            for r in self.resets:
                if r.times > 0 and r.pattern.search(path):
                    r.times -= 1
                    return r.after_bytes
        return None

    def commit_count(self, repo_id: str, branch: str = "main") -> int:
        repo = self.repos[repo_id]
        return len(repo.history(repo.branches[branch]))

    # -- storage
    def blob_path(self, sha256: str) -> Path:
        return self.blob_dir / sha256

    def store(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        p = self.blob_path(sha)
        if not p.exists():
            p.write_bytes(data)
        return sha

    def new_oid(self, *parts: str) -> str:
        with self.lock:
            self._counter += 1
            seed = "|".join(parts) + str(self._counter) + str(time.time())
            return hashlib.sha1(seed.encode()).hexdigest()

    def make_commit(self, repo: Repo, parent: str | None, files: dict[str, Entry], title: str,
                    message: str = "") -> Commit:
        c = Commit(self.new_oid(repo.id, title), parent, files, title, message,
                   datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"))
        repo.commits[c.oid] = c
        return c


def _err(status: int, code: str | None, message: str) -> JSONResponse:
    headers = {"X-Error-Message": message}
    if code:
        headers["X-Error-Code"] = code
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def create_app(state: HubState) -> FastAPI:
    app = FastAPI()

    @app.middleware("http")
    async def faults_and_log(request: Request, call_next):
        path = request.url.path
        state.requests.append((request.method, path, request.headers.get("authorization", "")))
        if state.latency:
            await asyncio.sleep(state.latency)
        for f in state.faults:
            if f.times > 0 and f.method == request.method and f.pattern.search(path):
                f.times -= 1
                if f.delay:
                    await asyncio.sleep(f.delay)
                if f.after:
                    await call_next(request)
                if f.status:
                    return _err(f.status, None, f"injected fault {f.status}")
        return await call_next(request)

    def authorised(request: Request) -> bool:
        auth = request.headers.get("authorization", "")
        return auth.startswith("Bearer ") and auth[7:] in state.tokens

    def get_repo(request: Request, repo_id: str, write: bool = False):
        repo = state.repos.get(repo_id)
        if repo is None:
            return None, _err(404, "RepoNotFound", f"Repository {repo_id} not found")
        if (repo.private or write) and not authorised(request):
            return None, _err(401, "RepoNotFound", f"Repository {repo_id} not found or not authorised")
        if repo.gated and not authorised(request):
            return None, _err(403, "GatedRepo",
                              f"Access to {repo_id} is restricted; you must accept its terms")
        return repo, None

    def get_commit(repo: Repo, rev: str):
        c = repo.resolve(rev)
        if c is None:
            return None, _err(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return c, None

    def lookup(request: Request, ns: str, name: str, rev: str, write: bool = False):
        """(repo, commit, None), or (None, None, error response) for an unknown repo or revision."""
        repo, err = get_repo(request, f"{ns}/{name}", write=write)
        if err:
            return None, None, err
        c, err = get_commit(repo, rev)
        return repo, c, err

    base = lambda request: str(request.base_url).rstrip("/")  # noqa: E731

    @app.post("/api/repos/create")
    async def create_repo(request: Request):
        if not authorised(request):
            return _err(401, None, "Invalid credentials in Authorization header")
        body = await request.json()
        repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
        if "/" not in repo_id:
            repo_id = f"testuser/{repo_id}"
        if repo_id in state.repos:
            msg = "You already created this model repo"
            return JSONResponse({"error": msg, "url": f"{base(request)}/{repo_id}"},
                                status_code=409, headers={"X-Error-Message": msg})
        # huggingface_hub 2.x sends "visibility"; older clients "private"
        repo = Repo(repo_id, private=body.get("visibility") == "private" or bool(body.get("private")))
        data = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
        entry = Entry(len(data), state.store(data), git_blob_sha1(data), False)
        c = state.make_commit(repo, None, {".gitattributes": entry}, "initial commit")
        repo.branches["main"] = c.oid
        state.repos[repo_id] = repo
        return {"url": f"{base(request)}/{repo_id}", "name": repo_id, "id": repo_id}

    @app.get("/api/whoami-v2")
    async def whoami(request: Request):
        if not authorised(request):
            return _err(401, None, "Invalid credentials")
        return {"name": "testuser", "type": "user", "orgs": [], "auth": {"type": "access_token"}}

    def info(repo: Repo, c: Commit) -> dict:
        return {
            "_id": repo.id, "id": repo.id, "modelId": repo.id, "author": repo.id.split("/")[0],
            "sha": c.oid, "private": repo.private, "gated": "auto" if repo.gated else False,
            "disabled": False, "lastModified": c.date, "createdAt": c.date, "tags": [],
            "downloads": 0, "likes": 0, "library_name": "transformers",
            "siblings": [{"rfilename": p} for p in sorted(c.files)],
        }

    @app.get("/api/models/{ns}/{name}")
    async def model_info(request: Request, ns: str, name: str):
        repo, c, err = lookup(request, ns, name, "main")
        return err or info(repo, c)

    @app.get("/api/models/{ns}/{name}/revision/{rev:path}")
    async def model_info_rev(request: Request, ns: str, name: str, rev: str):
        repo, c, err = lookup(request, ns, name, rev)
        return err or info(repo, c)

    def tree_entry(path: str, e: Entry) -> dict:
        d = {"type": "file", "oid": e.oid, "size": e.size, "path": path}
        if e.lfs:
            d["lfs"] = {"oid": e.sha256, "size": e.size, "pointerSize": 134}
        return d

    @app.get("/api/models/{ns}/{name}/tree/{rev}")
    @app.get("/api/models/{ns}/{name}/tree/{rev}/{sub:path}")
    async def tree(request: Request, ns: str, name: str, rev: str, sub: str = ""):
        repo, c, err = lookup(request, ns, name, rev)
        if err:
            return err
        recursive = request.query_params.get("recursive") in ("1", "true", "True")
        prefix = sub.strip("/") + "/" if sub.strip("/") else ""
        out, dirs = [], set()
        for path, e in sorted(c.files.items()):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix):]
            if "/" in rest:
                top = prefix + rest.split("/")[0]
                if top not in dirs:
                    dirs.add(top)
                    out.append({"type": "directory", "oid": git_blob_sha1(top.encode()), "size": 0,
                                "path": top})
                if not recursive:
                    continue
            out.append(tree_entry(path, e))
        return out

    @app.post("/api/models/{ns}/{name}/paths-info/{rev}")
    async def paths_info(request: Request, ns: str, name: str, rev: str):
        repo, c, err = lookup(request, ns, name, rev)
        if err:
            return err
        form = await request.form()
        paths = form.getlist("paths")
        return [tree_entry(p, c.files[p]) for p in paths if p in c.files]

    @app.get("/api/models/{ns}/{name}/refs")
    async def refs(request: Request, ns: str, name: str):
        repo, err = get_repo(request, f"{ns}/{name}")
        if err:
            return err
        return {
            "branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": o}
                         for b, o in repo.branches.items()],
            "tags": [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": o} for t, o in repo.tags.items()],
            "converts": [],
        }

    @app.get("/api/models/{ns}/{name}/commits/{rev:path}")
    async def commits(request: Request, ns: str, name: str, rev: str):
        repo, c, err = lookup(request, ns, name, rev)
        if err:
            return err
        return [{"id": x.oid, "title": x.title, "message": x.message, "authors": [{"user": "testuser"}],
                 "date": x.date} for x in repo.history(c.oid)]

    @app.post("/api/models/{ns}/{name}/tag/{rev:path}")
    async def tag(request: Request, ns: str, name: str, rev: str):
        repo, c, err = lookup(request, ns, name, rev, write=True)
        if err:
            return err
        body = await request.json()
        if body["tag"] in repo.tags:
            return _err(409, None, "Tag already exists")
        repo.tags[body["tag"]] = c.oid
        return {}

    @app.post("/api/models/{ns}/{name}/branch/{branch:path}")
    async def create_branch(request: Request, ns: str, name: str, branch: str):
        repo, err = get_repo(request, f"{ns}/{name}", write=True)
        if err:
            return err
        body = {}
        try:
            body = await request.json()
        except Exception:
            pass
        start = body.get("startingPoint") or "main"
        c, err = get_commit(repo, start)
        if err:
            return err
        if branch in repo.branches:
            return _err(409, None, "Branch already exists")
        repo.branches[branch] = c.oid
        return {}

    @app.post("/api/models/{ns}/{name}/preupload/{rev:path}")
    async def preupload(request: Request, ns: str, name: str, rev: str):
        repo, c, err = lookup(request, ns, name, rev, write=True)
        if err:
            return err
        body = await request.json()
        out = []
        for f in body["files"]:
            lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] >= LFS_MIN_SIZE
            existing = c.files.get(f["path"])
            oid = None
            if existing is not None:
                oid = existing.sha256 if lfs else existing.oid
            out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular",
                        "shouldIgnore": False, "oid": oid})
        return {"files": out, "commitOid": c.oid}

    @app.post("/{ns}/{name}.git/info/lfs/objects/batch")
    async def lfs_batch(request: Request, ns: str, name: str):
        repo, err = get_repo(request, f"{ns}/{name}", write=True)
        if err:
            return err
        body = await request.json()
        objects = []
        for o in body["objects"]:
            entry = {"oid": o["oid"], "size": o["size"], "authenticated": True}
            if not state.blob_path(o["oid"]).exists():
                entry["actions"] = {
                    "upload": {"href": f"{base(request)}/lfs-upload/{o['oid']}", "header": {}},
                    "verify": {"href": f"{base(request)}/{ns}/{name}.git/info/lfs/objects/verify"},
                }
            objects.append(entry)
        return JSONResponse({"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                            media_type="application/vnd.git-lfs+json")

    @app.put("/lfs-upload/{oid}")
    async def lfs_put(request: Request, oid: str):
        with state.lock:
            state.uploads += 1
            state.uploads_most = max(state.uploads_most, state.uploads)
        try:
            return await _lfs_put(request, oid)
        finally:
            with state.lock:
                state.uploads -= 1

    async def _lfs_put(request: Request, oid: str):
        started = time.monotonic()
        data = await request.body()
        # the body arrived at once over loopback: the response waits as long as the link (and this
        # connection's own limit) would have taken
        delay = state.link_delay("up", len(data))
        if state.per_connection:
            delay = max(delay, len(data) / state.per_connection)
        await asyncio.sleep(max(0.0, delay - (time.monotonic() - started)))
        if hashlib.sha256(data).hexdigest() != oid:
            return _err(400, None, "sha256 mismatch")
        state.store(data)
        return Response(status_code=200)

    @app.post("/{ns}/{name}.git/info/lfs/objects/verify")
    async def lfs_verify(request: Request, ns: str, name: str):
        body = await request.json()
        p = state.blob_path(body["oid"])
        if not p.exists() or p.stat().st_size != body["size"]:
            return _err(404, None, "object not found")
        return {}

    @app.post("/api/models/{ns}/{name}/commit/{rev:path}")
    async def commit(request: Request, ns: str, name: str, rev: str):
        repo, err = get_repo(request, f"{ns}/{name}", write=True)
        if err:
            return err
        if rev not in repo.branches:
            return _err(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        lines = [json.loads(x) for x in (await request.body()).decode().splitlines() if x.strip()]
        header = next(x["value"] for x in lines if x["key"] == "header")
        with state.lock:
            head = repo.branches[rev]
            parent = header.get("parentCommit")
            if parent and parent != head:
                return _err(412, None, "A commit has happened since. Please refresh and try again.")
            files = dict(repo.commits[head].files)
            for item in lines:
                key, v = item["key"], item["value"]
                if key == "file":
                    data = base64.b64decode(v["content"])
                    files[v["path"]] = Entry(len(data), state.store(data), git_blob_sha1(data), False)
                elif key == "lfsFile":
                    p = state.blob_path(v["oid"])
                    if not p.exists():
                        return _err(422, None, f"LFS object {v['oid']} was not uploaded")
                    size = p.stat().st_size
                    pointer = (f"version https://git-lfs.github.com/spec/v1\noid sha256:{v['oid']}\n"
                               f"size {size}\n")
                    files[v["path"]] = Entry(size, v["oid"], git_blob_sha1(pointer.encode()), True)
                elif key == "deletedFile":
                    files.pop(v["path"], None)
                elif key == "deletedFolder":
                    files = {p: e for p, e in files.items() if not p.startswith(v["path"].rstrip("/") + "/")}
            c = state.make_commit(repo, head, files, header.get("summary", ""), header.get("description", ""))
            repo.branches[rev] = c.oid
        return {"commitUrl": f"{base(request)}/{repo.id}/commit/{c.oid}", "commitOid": c.oid,
                "success": True, "commitMessage": c.title}

    @app.post("/_test/bandwidth")
    async def set_bandwidth(request: Request):
        """Test control from another process (the benchmark): ``{"down": B/s, "up": B/s}``; null: no
        limit."""
        body = await request.json()
        for direction in ("down", "up"):
            if direction in body:
                state.bandwidth[direction] = float(body[direction]) if body[direction] else None
        if "per_connection" in body:
            state.per_connection = float(body["per_connection"]) if body["per_connection"] else None
        if "latency" in body:
            state.latency = float(body["latency"] or 0.0)
        if "redirect_ttl" in body:
            state.redirect_ttl = float(body["redirect_ttl"]) if body["redirect_ttl"] else None
        return {**state.bandwidth, "per_connection": state.per_connection, "latency": state.latency,
                "redirect_ttl": state.redirect_ttl}

    @app.get("/_test/stats")
    async def stats(request: Request):
        """Test control from another process: download bytes sent so far, all and of weight files."""
        weights = sum(n for path, n in state.sent_by_path.items() if path.endswith(".safetensors"))
        return {"bytes_sent": state.bytes_sent, "weight_bytes_sent": weights,
                "in_flight_most": state.in_flight_most}

    @app.post("/api/validate-yaml")
    async def validate_yaml(request: Request):
        return {"errors": [], "warnings": []}

    @app.api_route("/{ns}/{name}/resolve/{rev}/{path:path}", methods=["GET", "HEAD"])
    async def resolve(request: Request, ns: str, name: str, rev: str, path: str):
        repo, c, err = lookup(request, ns, name, rev)
        if err:
            return err
        e = c.files.get(path)
        if e is None:
            return _err(404, "EntryNotFound", f"{path} does not exist at {rev}")
        headers = {"X-Repo-Commit": c.oid, "ETag": f'"{e.oid}"', "Accept-Ranges": "bytes"}
        if e.lfs:
            headers["X-Linked-Etag"] = f'"{e.sha256}"'
            headers["X-Linked-Size"] = str(e.size)
        if e.lfs and state.redirect_ttl:
            expires = int(time.time() + state.redirect_ttl)
            with state.lock:
                if state.stale_redirects > 0:
                    state.stale_redirects -= 1
                    expires = int(time.time()) - 1
            headers["Location"] = f"{state.cdn_url}/_cdn/{e.sha256}/{path}?expires={expires}&sig=" + \
                sign(e.sha256, expires)
            return Response(status_code=302, headers=headers)
        if request.method == "HEAD":
            headers["Content-Length"] = str(e.size)
            return Response(status_code=200, headers=headers)
        return serve(request, e.sha256, e.size, headers)

    def sign(sha256: str, expires: int) -> str:
        return hmac.new(state.secret, f"{sha256}:{expires}".encode(), "sha256").hexdigest()

    @app.api_route("/_cdn/{sha256}/{path:path}", methods=["GET", "HEAD"])
    async def cdn(request: Request, sha256: str, path: str):
        """A signed URL of the storage behind the CDN, valid until ``expires``."""
        try:
            expires = int(request.query_params.get("expires", ""))
        except ValueError:
            expires = 0
        if not hmac.compare_digest(request.query_params.get("sig", ""), sign(sha256, expires)):
            return _err(403, None, "Invalid signature")
        if time.time() > expires:
            return _err(403, None, "Request has expired")
        blob = state.blob_path(sha256)
        size = blob.stat().st_size
        if request.method == "HEAD":
            return Response(status_code=200, headers={"Content-Length": str(size), "Accept-Ranges": "bytes"})
        return serve(request, sha256, size, {"Accept-Ranges": "bytes", "ETag": f'"{sha256}"'})

    def serve(request: Request, sha256: str, size: int, headers: dict[str, str]) -> Response:
        """The bytes of a blob that the request's ``Range`` asks for (all of it without one)."""
        start, end = 0, size - 1
        status = 200
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", request.headers.get("range", "").strip())
        if m and (m.group(1) or m.group(2)):
            if m.group(1):
                start = int(m.group(1))
                end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
            else:  # the last N bytes
                start = max(size - int(m.group(2)), 0)
            if start >= size or start > end:
                return Response(status_code=416, headers={"Content-Range": f"bytes */{size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        headers["Content-Length"] = str(end - start + 1)
        stream = body(state.blob_path(sha256), start, end + 1, state._take_reset(request.url.path),
                      request.url.path)
        return StreamingResponse(stream, status_code=status, headers=headers,
                                 media_type="application/octet-stream")

    async def body(blob: Path, start: int, stop: int, reset_after: int | None, path: str):
        """The bytes [start, stop) of ``blob`` in chunks, at the download bandwidth; a reset ends the
        stream early (the server then drops the connection: fewer bytes than Content-Length)."""
        sent = 0
        own_free = time.monotonic()  # when this connection may send again at its own rate
        with state.lock:
            state.in_flight += 1
            state.in_flight_most = max(state.in_flight_most, state.in_flight)
        try:
            with open(blob, "rb") as f:
                f.seek(start)
                pos = start
                while pos < stop:
                    n = min(CHUNK, stop - pos)
                    if reset_after is not None and sent + n > reset_after:
                        n = reset_after - sent
                        if n > 0:
                            yield f.read(n)
                        raise ConnectionResetError("injected reset")
                    chunk = f.read(n)
                    pos += n
                    sent += n
                    delay = state.link_delay("down", n)  # a chunk leaves no earlier than the link allows
                    if state.per_connection:  # ... nor than this connection's own rate allows
                        now = time.monotonic()
                        own_free = max(now, own_free) + n / state.per_connection
                        delay = max(delay, own_free - now)
                    if delay > 0:
                        await asyncio.sleep(delay)
                    state.bytes_sent += n
                    state.sent_by_path[path] += n
                    yield chunk
        finally:
            with state.lock:
                state.in_flight -= 1

    return app


class HubServer:
    """Runs :func:`create_app` with uvicorn on 127.0.0.1 in a thread: the Hub on one free port, its
    "CDN" (where ``resolve`` redirects to, another origin as on the real Hub) on a second."""

    def __init__(self, blob_dir: Path) -> None:
        import uvicorn

        blob_dir.mkdir(parents=True, exist_ok=True)
        self.state = HubState(blob_dir)
        self.sockets = []
        for _ in range(2):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", 0))
            self.sockets.append(sock)
        self.url, self.state.cdn_url = (f"http://127.0.0.1:{s.getsockname()[1]}" for s in self.sockets)
        config = uvicorn.Config(create_app(self.state), log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": self.sockets}, daemon=True)

    def __enter__(self) -> HubServer:
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("test Hub server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        for sock in self.sockets:
            sock.close()


def main() -> None:
    """Serve until stdin closes: ``python tests/hub_server.py BLOB_DIR`` prints the URL first."""
    import sys

    with HubServer(Path(sys.argv[1])) as server:
        print(server.url, flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
