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

With ``xet=True`` it also stores large files as the Hub does for new repos: the Xet token routes
(``xet-read-token`` / ``xet-write-token``, JSON and headers), a CAS under ``/xet-cas`` that
hf_xet uploads xorbs and shards to and reads file reconstructions from (:mod:`xet_cas`), xorb
bytes behind signed URLs on the second origin (limits, latency and resets apply), and
``X-Xet-Hash`` with a ``xet-auth`` link on ``resolve``. A shard's files are reconstructed on
upload and refused (400) unless their bytes have the SHA-256 the shard claims; ``resolve`` and
the LFS batch then know them by that SHA-256, as for LFS uploads.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import hmac
import json
import os
import re
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from xet_cas import ShardError, XetStore

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
    xet_hash: str | None = None  # stored with Xet (uploaded through the CAS)


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
    #: LFS objects uploaded to this repo (committed or not)
    lfs_objects: set[str] = field(default_factory=set)

    def has_lfs_object(self, oid: str) -> bool:
        """Whether this repo holds LFS object ``oid`` (uploaded to it, or in one of its commits): as on
        the Hub, an object another repo holds is uploaded again."""
        return oid in self.lfs_objects or any(e.lfs and e.sha256 == oid for c in self.commits.values()
                                              for e in c.files.values())

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

    def __init__(self, blob_dir: Path, xet: bool = False) -> None:
        self.repos: dict[str, Repo] = {}
        self.blob_dir = blob_dir
        # Xet storage: the token routes and a CAS that hf_xet uploads to and downloads from
        self.xet = XetStore(blob_dir / "xet-cas") if xet else None
        self.xet_token_ttl = 3600.0  # seconds a Xet access token is valid
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

    async def upload_body(self, request: Request) -> bytes:
        """The body of a large-file upload, counted in :attr:`uploads`, answered no sooner than the
        link (and the connection's own limit) would have carried it: over loopback it arrived at once."""
        with self.lock:
            self.uploads += 1
            self.uploads_most = max(self.uploads_most, self.uploads)
        try:
            started = time.monotonic()
            data = await request.body()
            delay = self.link_delay("up", len(data))
            if self.per_connection:
                delay = max(delay, len(data) / self.per_connection)
            await asyncio.sleep(max(0.0, delay - (time.monotonic() - started)))
            return data
        finally:
            with self.lock:
                self.uploads -= 1

    def _take_reset(self, path: str) -> int | None:
        with self.lock:
            for r in self.resets:
                if r.times > 0 and r.pattern.search(path):
                    r.times -= 1
                    return r.after_bytes
        return None

    @property
    def upload_route(self) -> tuple[str, str]:
        """(method, path regex) of the requests that carry large files' bytes up: LFS PUTs, or xorb
        POSTs to the CAS."""
        return ("POST", r"/xet-cas/v1/xorbs/") if self.xet else ("PUT", r"/lfs-upload/")

    def large_file_gets(self, repo_id: str) -> str:
        """A path regex of the GETs that carry the bytes of ``repo_id``'s large files to
        huggingface_hub: its ``resolve`` URLs, or, with Xet, the xorbs on the transfer origin."""
        return r"^/_xorb/" if self.xet else rf"/{re.escape(repo_id)}/resolve/.*safetensors$"

    def upload_requests(self) -> int:
        """How many requests of :attr:`upload_route` the server has had."""
        method, pattern = self.upload_route
        return sum(1 for m, p, _ in self.requests if m == method and re.search(pattern, p))

    def commit_count(self, repo_id: str, branch: str = "main") -> int:
        repo = self.repos[repo_id]
        return len(repo.history(repo.branches[branch]))

    # -- storage
    def blob_path(self, sha256: str) -> Path:
        return self.blob_dir / sha256

    def store(self, data: bytes) -> str:
        """Keep ``data`` as a blob (thread-safe: the upload routes call it off the event loop, so
        that an upload does not hold up the downloads in flight); its SHA-256."""
        sha = hashlib.sha256(data).hexdigest()
        p = self.blob_path(sha)
        if not p.exists():
            tmp = p.with_name(f"{p.name}.{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            tmp.replace(p)
        return sha

    def seed_folder(self, repo_id: str, folder: Path) -> None:
        """A repo holding ``folder``'s files in one commit, its weight files hard-linked into the
        blob store (no copy: a benchmark's multi-GB parents cost no extra disk)."""
        repo = Repo(repo_id)
        files: dict[str, Entry] = {}
        for f in sorted(folder.iterdir()):
            if not f.is_file():
                continue
            if f.suffix != ".safetensors":
                data = f.read_bytes()
                files[f.name] = Entry(len(data), self.store(data), git_blob_sha1(data), False)
                continue
            sha = hashlib.sha256()
            with open(f, "rb") as fh:
                while block := fh.read(CHUNK * 64):
                    sha.update(block)
            digest, size = sha.hexdigest(), f.stat().st_size
            if not self.blob_path(digest).exists():
                try:
                    os.link(f, self.blob_path(digest))
                except OSError:
                    shutil.copyfile(f, self.blob_path(digest))
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{digest}\nsize {size}\n"
            files[f.name] = Entry(size, digest, git_blob_sha1(pointer.encode()), True)
        with self.lock:
            repo.branches["main"] = self.make_commit(repo, None, files, "seeded").oid
            self.repos[repo_id] = repo

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
            if not repo.has_lfs_object(o["oid"]) and not (state.xet and o["oid"] in state.xet.by_sha256):
                entry["actions"] = {
                    "upload": {"href": f"{base(request)}/lfs-upload/{ns}/{name}/{o['oid']}", "header": {}},
                    "verify": {"href": f"{base(request)}/{ns}/{name}.git/info/lfs/objects/verify"},
                }
            objects.append(entry)
        return JSONResponse({"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                            media_type="application/vnd.git-lfs+json")

    @app.put("/lfs-upload/{ns}/{name}/{oid}")
    async def lfs_put(request: Request, ns: str, name: str, oid: str):
        repo = state.repos.get(f"{ns}/{name}")  # a presigned URL: no Authorization header
        if repo is None:
            return _err(404, "RepoNotFound", f"Repository {ns}/{name} not found")
        data = await state.upload_body(request)
        if await asyncio.to_thread(state.store, data) != oid:
            return _err(400, None, "sha256 mismatch")
        repo.lfs_objects.add(oid)
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
                    xet_hash = state.xet.by_sha256.get(v["oid"]) if state.xet else None
                    files[v["path"]] = Entry(size, v["oid"], git_blob_sha1(pointer.encode()), True, xet_hash)
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

    @app.post("/_test/seed")
    async def seed(request: Request):
        """Test control from another process: ``{"repo_id": ..., "folder": ...}`` makes a repo of a
        local folder, its weight files hard-linked (:meth:`HubState.seed_folder`)."""
        body = await request.json()
        state.seed_folder(body["repo_id"], Path(body["folder"]))
        return {"repo_id": body["repo_id"]}

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
        if e.xet_hash:
            headers["X-Xet-Hash"] = e.xet_hash
            headers["Link"] = f'<{base(request)}/api/models/{repo.id}/xet-read-token/{c.oid}>; rel="xet-auth"'
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

    def serve(request: Request, sha256: str, size: int, headers: dict[str, str],
              blob: Path | None = None) -> Response:
        """The bytes of a blob (or of file ``blob``) that the request's ``Range`` asks for (all of it
        without one)."""
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
        stream = body(blob or state.blob_path(sha256), start, end + 1, state._take_reset(request.url.path),
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

    add_xet_routes(app, state, lookup, base, serve)
    return app


def xet_token(state: HubState, kind: str, expires: int) -> str:
    sig = hmac.new(state.secret, f"xet:{kind}:{expires}".encode(), "sha256").hexdigest()[:32]
    return f"xet_{kind}_{expires}_{sig}"


def add_xet_routes(app: FastAPI, state: HubState, lookup, base, serve) -> None:
    """The Hub's Xet token routes and the CAS (under ``/xet-cas``), as hf_xet calls them."""

    def materialise(xet_hash: str, sha256: str) -> bool:
        """Write a Xet file's bytes as the blob of ``sha256``; False if they do not hash to it."""
        blob = state.blob_path(sha256)
        if blob.exists() and state.xet.by_sha256.get(sha256) == xet_hash:
            return True
        tmp = blob.with_name(f"{blob.name}.{threading.get_ident()}.tmp")
        try:
            if not state.xet.check_sha256(xet_hash, tmp):
                return False
            tmp.replace(blob)
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def token_ok(request: Request, write: bool) -> JSONResponse | None:
        auth = request.headers.get("authorization", "")
        parts = auth[7:].split("_") if auth.startswith("Bearer ") else []
        if len(parts) != 4 or parts[0] != "xet" or not parts[2].isdigit():
            return _err(401, None, "Xet token missing or malformed")
        kind, expires = parts[1], int(parts[2])
        if not hmac.compare_digest(auth[7:], xet_token(state, kind, expires)) or time.time() > expires:
            return _err(401, None, "Xet token invalid or expired")
        if write and kind != "write":
            return _err(403, None, "Xet token has read scope")
        return None

    @app.get("/api/models/{ns}/{name}/xet-{kind}-token/{rev:path}")
    async def xet_token_route(request: Request, ns: str, name: str, kind: str, rev: str):
        if state.xet is None or kind not in ("read", "write"):
            return _err(404, None, "Xet is not enabled for this repo")
        repo, c, err = lookup(request, ns, name, rev if rev != "None" else "main", write=kind == "write")
        if err:
            return err
        expires = int(time.time() + state.xet_token_ttl)
        token, cas = xet_token(state, kind, expires), f"{base(request)}/xet-cas"
        return JSONResponse({"accessToken": token, "exp": expires, "casUrl": cas},
                            headers={"X-Xet-Cas-Url": cas, "X-Xet-Access-Token": token,
                                     "X-Xet-Token-Expiration": str(expires)})

    @app.post("/xet-cas/v1/xorbs/{prefix}/{xorb}")
    async def upload_xorb(request: Request, prefix: str, xorb: str):
        if err := token_ok(request, write=True):
            return err
        data = await state.upload_body(request)
        return {"was_inserted": await asyncio.to_thread(state.xet.put_xorb, xorb, data)}

    @app.post("/xet-cas/v1/shards")
    async def upload_shard(request: Request):
        if err := token_ok(request, write=True):
            return err
        data = await request.body()
        try:
            files = state.xet.put_shard(data)
        except ShardError as e:
            return _err(400, None, str(e))
        for f in files:  # the bytes as the Hub will serve them, checked against the SHA-256 claimed
            if f.sha256 is None or not await asyncio.to_thread(materialise, f.hash, f.sha256):
                return _err(400, None, f"file {f.hash}: its bytes do not have the SHA-256 {f.sha256}")
        return {"result": 1}

    @app.get("/xet-cas/v1/chunks/{prefix}/{chunk}")
    async def dedup_query(request: Request, prefix: str, chunk: str):
        if err := token_ok(request, write=False):
            return err
        return _err(404, None, "chunk not tracked by global deduplication")

    @app.get("/xet-cas/v1/reconstructions/{file_id}")
    async def reconstruction(request: Request, file_id: str):
        if err := token_ok(request, write=False):
            return err
        first, last = 0, None
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", request.headers.get("range", "").strip())
        if m:
            first, last = int(m.group(1)), int(m.group(2)) if m.group(2) else None
        f = state.xet.files.get(file_id)
        if f is None:
            return _err(404, None, f"file {file_id} not found")
        if first >= f.size and f.size:
            return _err(416, None, "range start beyond the end of the file")
        expires = int(time.time() + (state.redirect_ttl or 3600))

        def url(xorb: str) -> str:
            sig = hmac.new(state.secret, f"xorb:{xorb}:{expires}".encode(), "sha256").hexdigest()
            return f"{state.cdn_url}/_xorb/{xorb}?expires={expires}&sig={sig}"

        return await asyncio.to_thread(state.xet.reconstruction, file_id, first, last, url)

    @app.get("/_xorb/{xorb}")
    async def xorb_bytes(request: Request, xorb: str):
        """A presigned URL of a xorb's bytes on the transfer service (on the CDN origin)."""
        try:
            expires = int(request.query_params.get("expires", ""))
        except ValueError:
            expires = 0
        want = hmac.new(state.secret, f"xorb:{xorb}:{expires}".encode(), "sha256").hexdigest()
        if not hmac.compare_digest(request.query_params.get("sig", ""), want) or time.time() > expires:
            return _err(403, None, "Request has expired or is not signed")
        path = state.xet.xorb_path(xorb)
        if not path.exists():
            return _err(404, None, "xorb not found")
        return serve(request, xorb, path.stat().st_size, {"Accept-Ranges": "bytes"}, path)


class HubServer:
    """Runs :func:`create_app` with uvicorn on 127.0.0.1 in a thread: the Hub on one free port, its
    "CDN" (where ``resolve`` redirects to, another origin as on the real Hub) on a second."""

    def __init__(self, blob_dir: Path, xet: bool = False) -> None:
        import uvicorn

        blob_dir.mkdir(parents=True, exist_ok=True)
        self.state = HubState(blob_dir, xet=xet)
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
    """Serve until stdin closes: ``python tests/hub_server.py BLOB_DIR [--xet]`` prints the URL first."""
    import sys

    with HubServer(Path(sys.argv[1]), xet="--xet" in sys.argv[2:]) as server:
        print(server.url, flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
