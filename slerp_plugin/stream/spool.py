"""The spool of a streaming merge: each output shard's input bytes, fetched by range just before
the shard is merged, deleted just after; all of it within a disk budget.

:func:`spool_shard` maps an output shard's tensors onto one spool file per parent: each run of
tensors that lie back to back in a parent file becomes one ranged GET (:class:`Fetch`), placed in
the spool file at the same alignment as in the parent, so the engine reads the spool exactly as it
reads a local parent. :class:`ParentHashes` hashes every parent file from the bytes as they
arrive, and :class:`DiskBudget` holds fetches back until the disk they need is free.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from ..engine import ShardPlan, TensorJob
from ..engine.plan import format_bytes
from ..errors import HubIntegrityError, OutputWriteError
from ..hub.connections import Connections
from ..io.atomic import write_bytes_atomic
from ..io.crashpoints import step
from ..io.direct import ALIGN
from ..io.hashing import ResumableSha256
from ..io.safetensors import TensorInfo
from .remote import RemoteParent

log = logging.getLogger(__name__)

ROLES = ("model_1", "model_2")


@dataclass(frozen=True)
class Fetch:
    """Bytes ``[start, stop)`` of parent file ``name``, placed at ``local`` in the spool file."""

    name: str
    start: int
    stop: int
    local: int


@dataclass
class ShardSpool:
    """Where one output shard's input bytes go: a spool file per parent and the fetches that fill it."""

    index: int
    files: dict[str, Path]
    fetches: dict[str, list[Fetch]]
    output_bytes: int

    @property
    def input_bytes(self) -> int:
        return sum(f.stop - f.start for fs in self.fetches.values() for f in fs)

    @property
    def disk_bytes(self) -> int:
        """The disk this shard takes at most while it is in flight: its inputs and its output."""
        return self.input_bytes + self.output_bytes

    @property
    def marker(self) -> Path:
        """Where :func:`mark_complete` records that the files hold all their bytes."""
        return next(iter(self.files.values())).with_name(f"shard-{self.index + 1:05d}.complete")

    def remove(self) -> None:
        self.marker.unlink(missing_ok=True)
        for f in self.files.values():
            f.unlink(missing_ok=True)


def spool_shard(shard: ShardPlan, folder: Path) -> tuple[ShardPlan, ShardSpool]:
    """``shard`` with each tensor read from the spool files in ``folder`` instead of the parents,
    and the fetches that fill those files.

    Tensors are taken in the shard's read order; consecutive tensors that lie back to back in the
    same parent file share one fetch.
    """
    files = {role: folder / f"{role}-{shard.index + 1:05d}.bin" for role in ROLES}
    fetches: dict[str, list[Fetch]] = {role: [] for role in ROLES}
    ends = dict.fromkeys(ROLES, 0)
    placed: dict[tuple[str, Path, int], TensorInfo] = {}
    for job in shard.jobs:
        for role, info in zip(ROLES, (job.a, job.b), strict=True):
            key = (role, info.file, info.offset)
            if key in placed:
                continue
            runs = fetches[role]
            last = runs[-1] if runs else None
            if last is not None and last.name == info.file.name and last.stop == info.offset:
                runs[-1] = replace(last, stop=info.offset + info.nbytes)
                local = last.local + info.offset - last.start
            else:  # a new run, at the parent's alignment
                local = ends[role] + (info.offset - ends[role]) % ALIGN
                runs.append(Fetch(info.file.name, info.offset, info.offset + info.nbytes, local))
            ends[role] = local + info.nbytes
            placed[key] = replace(info, file=files[role], offset=local)
    jobs = [TensorJob(j.name, j.action, placed[("model_1", j.a.file, j.a.offset)],
                      placed[("model_2", j.b.file, j.b.offset)], j.out_dtype, j.t) for j in shard.jobs]
    return ShardPlan(shard.index, shard.file, jobs), ShardSpool(shard.index, files, fetches, shard.nbytes)


class ParentHashes:
    """SHA-256 of every parent weight file, fed in file order with the bytes fetched.

    Bytes that arrive out of order (parents sharded differently from the output) are not hashed
    then; :meth:`verify` fetches whatever was not hashed and compares every file with the SHA-256
    the Hub gives. The hashes' progress is saved with a streaming merge's journal
    (:meth:`snapshot`) and restored by a resumed run (:meth:`restore`), which then fetches only the
    bytes of the shards still to merge.
    """

    def __init__(self, parents: dict[str, RemoteParent]) -> None:
        self.parents = parents
        self._state: dict[tuple[str, str], _FileHash] = {}
        for role, parent in parents.items():
            for name, head in parent.heads.items():
                self._state[(role, name)] = _FileHash(ResumableSha256(head), len(head))

    def feed(self, role: str, name: str, pos: int, data: memoryview) -> None:
        self._state[(role, name)].feed(pos, data)

    def position(self, role: str, name: str) -> int:
        """How many leading bytes of the file are hashed."""
        return self._state[(role, name)].pos

    def snapshot(self) -> dict[str, dict[str, int | str]]:
        """Each file's progress (``"role/name": {"pos", "state"}``), for :meth:`restore`."""
        out: dict[str, dict[str, int | str]] = {}
        for (role, name), h in self._state.items():
            with h.lock:
                out[f"{role}/{name}"] = {"pos": h.pos, "state": h.sha.state().hex()}
        return out

    def restore(self, saved: object) -> int:
        """Take up the progress :meth:`snapshot` saved, for each file where it is ahead; entries
        that are malformed or name no file are ignored (those files are hashed from where they are).

        Returns the bytes whose hashing was taken up.
        """
        taken = 0
        for (role, name), h in self._state.items():
            entry = saved.get(f"{role}/{name}") if isinstance(saved, dict) else None
            try:
                pos, sha = int(entry["pos"]), ResumableSha256.from_state(bytes.fromhex(entry["state"]))
            except (TypeError, KeyError, ValueError, OverflowError):
                continue
            if h.pos < pos <= self.parents[role].files[name].size:
                with h.lock:
                    taken += pos - h.pos
                    h.sha, h.pos = sha, pos
        return taken

    def verify(self) -> dict[str, dict[str, str]]:
        """Finish each file's hash (fetching what was not hashed) and check it against the Hub. A
        hash taken up from an earlier run covers the bytes that run merged from, so a mismatch then
        is a mismatch of those bytes.

        Returns the SHA-256 of each file by role and name.

        Raises:
            HubIntegrityError: a file's bytes differ from what the Hub says it holds.
            HubError: the missing bytes cannot be fetched.
        """
        out: dict[str, dict[str, str]] = {}
        for (role, name), h in self._state.items():
            parent = self.parents[role]
            expected = parent.files[name].sha256
            digest = self._finish(parent, name, h)
            if expected and digest != expected:
                raise HubIntegrityError(f"{parent.repo_id}@{parent.commit[:12]}: {name}: the bytes received "
                                        f"do not match the Hub's SHA-256 ({digest[:12]} ≠ {expected[:12]}); "
                                        "nothing was published", repo_id=parent.repo_id,
                                        revision=parent.commit)
            out.setdefault(role, {})[name] = digest
        return out

    @staticmethod
    def _finish(parent: RemoteParent, name: str, h: _FileHash) -> str:
        size = parent.files[name].size
        if h.pos < size:
            log.info("%s/%s: hashing the %s this run did not fetch in order", parent.repo_id, name,
                     format_bytes(size - h.pos))
            parent.reader.stream(name, h.pos, size, h.feed)
        return h.sha.hexdigest()


class _FileHash:
    """One parent file's SHA-256 and how many of its leading bytes it covers."""

    def __init__(self, sha: ResumableSha256, pos: int) -> None:
        self.sha, self.pos = sha, pos
        self.lock = threading.Lock()

    def feed(self, pos: int, data: memoryview) -> None:
        with self.lock:
            end = pos + len(data)
            if pos <= self.pos < end:
                self.sha.update(data[self.pos - pos:] if pos < self.pos else data)
                self.pos = end


#: bytes of one ranged GET when a spool file is filled over several connections
PIECE_BYTES = 16 << 20
#: ranged GETs in flight per parent of :func:`fetch_spool` called without a count
DEFAULT_CONNECTIONS = 8
HASH_BLOCK = 2 << 20


def fetch_spool(spool: ShardSpool, role: str, parent: RemoteParent, hashes: ParentHashes, *,
                write: bool = True, stop: Callable[[], bool] = lambda: False,
                connections: int | Connections = DEFAULT_CONNECTIONS) -> None:
    """Fill ``role``'s spool file of one shard over ranged GETs at once (``connections``: a fixed
    count, or the run's :class:`~slerp_plugin.hub.connections.Connections`), in pieces of
    :data:`PIECE_BYTES` taken in file order; or, without ``write``, only hash its bytes (one GET at
    a time, just the bytes that continue a file's hash). Pieces are hashed in file order as they
    complete, read back from the spool. ``stop()`` true ends it early (the merge failed elsewhere).

    Raises:
        FetchStopped: ``stop()`` became true.
        HubError: the bytes cannot be fetched.
        OutputWriteError: the spool file cannot be written (disk full).
    """
    if not write:
        _hash_only(spool, role, parent, hashes, stop)
        return
    step(f"spool {spool.files[role].name}")
    path = spool.files[role]
    pieces = [Fetch(f.name, a, min(a + PIECE_BYTES, f.stop), f.local + a - f.start)
              for f in spool.fetches[role] for a in range(f.start, f.stop, PIECE_BYTES)]
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    except OSError as e:
        raise OutputWriteError(f"{path}: cannot write the spool: {e.strerror or e}", path=path) from e
    failed = threading.Event()
    in_order = _InOrder(fd, role, hashes)
    conns = connections if isinstance(connections, Connections) else Connections(connections, PIECE_BYTES)

    def fetch(piece: Fetch) -> None:
        if failed.is_set() or stop() or not conns.acquire(role, lambda: failed.is_set() or stop()):
            raise FetchStopped
        received = 0

        def sink(pos: int, data: memoryview) -> None:
            nonlocal received
            if failed.is_set() or stop():
                raise FetchStopped
            _pwrite_all(fd, data, piece.local + pos - piece.start)
            received += len(data)
        try:
            try:
                parent.reader.stream(piece.name, piece.start, piece.stop, sink, on_throttled=conns.throttled)
            finally:
                conns.release(role, received)
            in_order.done(piece)
        except BaseException:
            failed.set()
            raise

    try:
        with ThreadPoolExecutor(max(1, min(conns.most, len(pieces))),
                                thread_name_prefix=f"fetch-{role}") as pool:
            futures = [pool.submit(fetch, piece) for piece in pieces]
            errors = [f.exception() for f in futures]
        first = next((e for e in errors if e is not None and not isinstance(e, FetchStopped)), None)
        first = first or next((e for e in errors if e is not None), None)
        if first is not None:
            raise first
    except OSError as e:
        raise OutputWriteError(f"{path}: cannot write the spool: {e.strerror or e}", path=path) from e
    finally:
        os.close(fd)


def _hash_only(spool: ShardSpool, role: str, parent: RemoteParent, hashes: ParentHashes,
               stop: Callable[[], bool]) -> None:
    for f in spool.fetches[role]:
        start = hashes.position(role, f.name)
        if not f.start <= start < f.stop:
            continue

        def sink(pos: int, data: memoryview, f: Fetch = f) -> None:
            if stop():
                raise FetchStopped
            hashes.feed(role, f.name, pos, data)
        parent.reader.stream(f.name, start, f.stop, sink)


class _InOrder:
    """Feeds the pieces of a spool file to the parents' hashes in file order as they complete,
    reading each back from the spool (from the page cache): pieces fetched at once finish in any
    order, a hash takes its bytes in one."""

    def __init__(self, fd: int, role: str, hashes: ParentHashes) -> None:
        self.fd, self.role, self.hashes = fd, role, hashes
        self._done: dict[str, list[Fetch]] = {}
        self._lock = threading.Lock()

    def done(self, piece: Fetch) -> None:
        with self._lock:
            waiting = self._done.setdefault(piece.name, [])
            waiting.append(piece)
            while True:
                pos = self.hashes.position(self.role, piece.name)
                nxt = next((p for p in waiting if p.start <= pos < p.stop), None)
                if nxt is None:
                    return
                waiting.remove(nxt)
                _hash_back(self.fd, self.role, nxt, pos, self.hashes)


def _hash_back(fd: int, role: str, f: Fetch, pos: int, hashes: ParentHashes) -> None:
    """Feed ``hashes`` the bytes ``[pos, f.stop)`` of parent file ``f.name``, read back from the
    spool file ``fd`` holds."""
    for a in range(pos, f.stop, HASH_BLOCK):  # small blocks: the hash holds the GIL
        n = min(HASH_BLOCK, f.stop - a)
        data = os.pread(fd, n, f.local + a - f.start)
        if len(data) != n:
            raise OutputWriteError(f"spool of {f.name}: {len(data)} of {n} bytes read back")
        hashes.feed(role, f.name, a, memoryview(data))


def mark_complete(spool: ShardSpool, key: str) -> None:
    """Record that ``spool``'s files hold all their bytes (synced first), so that a run of the same
    plan (``key``) stopped before merging the shard takes them instead of fetching them again."""
    for path in spool.files.values():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    write_bytes_atomic(spool.marker, json.dumps(_record(spool, key)).encode(), crash_points=False)


def is_complete(spool: ShardSpool, key: str) -> bool:
    """Whether an earlier run of the plan ``key`` filled ``spool``'s files (:func:`mark_complete`)."""
    try:
        doc = json.loads(spool.marker.read_text())
    except (OSError, ValueError):
        return False
    ends = {role: max((f.local + f.stop - f.start for f in fs), default=0)
            for role, fs in spool.fetches.items()}
    return doc == _record(spool, key) and all(
        p.is_file() and p.stat().st_size >= ends[role] for role, p in spool.files.items())


def hash_spooled(spool: ShardSpool, role: str, hashes: ParentHashes) -> None:
    """Feed ``hashes`` the bytes of ``role``'s complete spool file that continue a file's hash, read
    back from the file (so the hash covers exactly the bytes the shard is merged from)."""
    fd = os.open(spool.files[role], os.O_RDONLY)
    try:
        for f in spool.fetches[role]:
            pos = hashes.position(role, f.name)
            if f.start <= pos < f.stop:
                _hash_back(fd, role, f, pos, hashes)
    finally:
        os.close(fd)


def _record(spool: ShardSpool, key: str) -> dict:
    return {"key": key, "fetches": {role: [[f.name, f.start, f.stop, f.local] for f in fs]
                                    for role, fs in sorted(spool.fetches.items())}}


def _pwrite_all(fd: int, data: memoryview, pos: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, pos)
        data, pos = data[n:], pos + n


class FetchStopped(Exception):
    """A fetch ended early because the merge stopped."""


class DiskBudget:
    """Bytes of disk a streaming merge may hold at once; :meth:`take` waits until they are free."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0
        self._cond = threading.Condition()
        self._closed = False

    def take(self, n: int) -> bool:
        """Wait until ``n`` more bytes fit (or nothing else is held), then hold them; False once
        :meth:`close` was called."""
        with self._cond:
            self._cond.wait_for(lambda: self._closed or self.used == 0 or self.used + n <= self.limit)
            if self._closed:
                return False
            self.used += n
            self.peak = max(self.peak, self.used)
            return True

    def hold(self, n: int) -> None:
        """Count ``n`` bytes already on disk, without waiting."""
        with self._cond:
            self.used += n
            self.peak = max(self.peak, self.used)

    def give(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()

    def close(self) -> None:
        """Wake every waiter with a refusal (the merge stops)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
