"""The spool of a streaming merge: each output shard's input bytes, fetched by range just before
the shard is merged, deleted just after; all of it within a disk budget.

:func:`spool_shard` maps an output shard's tensors onto one spool file per parent: each run of
tensors that lie back to back in a parent file becomes one ranged GET (:class:`Fetch`), placed in
the spool file at the same alignment as in the parent, so the engine reads the spool exactly as it
reads a local parent. :class:`ParentHashes` hashes every parent file from the bytes as they
arrive, and :class:`DiskBudget` holds fetches back until the disk they need is free.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
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

    def pieces_log(self, role: str) -> Path:
        """Where :func:`fetch_spool` lists the pieces ``role``'s file holds (:func:`partial_files`)."""
        return self.files[role].with_suffix(".pieces")

    def remove(self) -> None:
        self.marker.unlink(missing_ok=True)
        for role, f in self.files.items():
            self.pieces_log(role).unlink(missing_ok=True)
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
#: shards whose spools :class:`ShardFetches` fills at once
SHARDS_AT_ONCE = 2
HASH_BLOCK = 2 << 20
#: a stream's spool lists the bytes it holds every this many bytes of a piece (and at its end)
LOGGED_BYTES = 4 << 20


def fetch_spool(spool: ShardSpool, role: str, parent: RemoteParent, hashes: ParentHashes, *,
                write: bool = True, stop: Callable[[], bool] = lambda: False,
                connections: int | Connections = DEFAULT_CONNECTIONS, turn: FetchTurn | None = None,
                key: str | None = None) -> None:
    """Fill ``role``'s spool file of one shard over ranged GETs at once (``connections``: a fixed
    count, or the run's :class:`~slerp_plugin.hub.connections.Connections`), in pieces of
    :data:`PIECE_BYTES` taken in file order; or, without ``write``, only hash its bytes (one GET at
    a time, just the bytes that continue a file's hash). Pieces are hashed in file order as they
    complete, read back from the spool; with a ``turn``, after the fetch of the shard before it
    (:class:`FetchTurn`). ``stop()`` true ends it early (the merge failed elsewhere).

    With the plan's ``key``, the bytes on disk are listed as they land (:meth:`ShardSpool.pieces_log`);
    those a stopped run of the same plan listed are kept, not fetched again (hashed from the file).

    Raises:
        FetchStopped: ``stop()`` became true.
        HubError: the bytes cannot be fetched.
        OutputWriteError: the spool file cannot be written (disk full).
    """
    if not write:
        _hash_only(spool, role, parent, hashes, stop)
        return
    step(f"spool {spool.files[role].name}")
    fd, pieces_log, held, pieces = _open_spool(spool, role, key)
    failed = threading.Event()
    turn = turn or FetchTurn()
    in_order = _InOrder(fd, role, hashes, turn.hash_after)
    for piece in held:
        in_order.done(piece)
    conns = connections if isinstance(connections, Connections) else Connections(connections, PIECE_BYTES)
    begun = itertools.count(1)

    def stopped() -> bool:
        return failed.is_set() or stop()

    def fetch(piece: Fetch) -> None:
        if not _wait(turn.gets_after, stopped) or stopped() or not conns.acquire(role, stopped):
            raise FetchStopped
        if next(begun) == len(pieces):
            turn.gets_started.set()
        received, logged = 0, piece.start

        def sink(pos: int, data: memoryview) -> None:
            nonlocal received, logged
            if failed.is_set() or stop():
                raise FetchStopped
            _pwrite_all(fd, data, piece.local + pos - piece.start)
            received += len(data)
            if pieces_log is not None and pos + len(data) - logged >= LOGGED_BYTES:
                logged = pieces_log.add(fd, piece.name, logged, pos + len(data))
        try:
            try:
                parent.reader.stream(piece.name, piece.start, piece.stop, sink, on_throttled=conns.throttled)
            finally:
                conns.release(role, received)
            if pieces_log is not None and logged < piece.stop:
                pieces_log.add(fd, piece.name, logged, piece.stop)
            in_order.done(piece)
        except BaseException:
            failed.set()
            raise

    try:
        with ThreadPoolExecutor(max(1, min(conns.most, len(pieces))),
                                thread_name_prefix=f"fetch-{role}") as pool:
            futures = [pool.submit(fetch, piece) for piece in pieces]
        _raise_first([f.exception() for f in futures])
        in_order.flush(stop)
    except OSError as e:
        path = spool.files[role]
        raise OutputWriteError(f"{path}: cannot write the spool: {e.strerror or e}", path=path) from e
    finally:
        turn.gets_started.set()
        os.close(fd)
        if pieces_log is not None:
            pieces_log.close()


def _raise_first(errors: list[BaseException | None]) -> None:
    """Raise the first error that is not a :class:`FetchStopped` (which the others caused), else
    the first."""
    first = next((e for e in errors if e is not None and not isinstance(e, FetchStopped)), None)
    first = first or next((e for e in errors if e is not None), None)
    if first is not None:
        raise first


def _open_spool(spool: ShardSpool, role: str, key: str | None
                ) -> tuple[int, _PieceLog | None, list[Fetch], list[Fetch]]:
    """Open ``role``'s spool file (and with ``key``, its pieces log): what a stopped run of plan
    ``key`` left in it is kept, the rest emptied. Returns the file descriptor, the log, the pieces
    of :data:`PIECE_BYTES` in file order (or their leading parts) the file holds, and those to fetch."""
    path = spool.files[role]
    pieces = [Fetch(f.name, a, min(a + PIECE_BYTES, f.stop), f.local + a - f.start)
              for f in spool.fetches[role] for a in range(f.start, f.stop, PIECE_BYTES)]
    held, todo = _PieceLog.split(spool, role, key, pieces) if key else ([], pieces)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | (0 if held else os.O_TRUNC), 0o644)
        pieces_log = _PieceLog(spool, role, key, fresh=not held) if key else None
    except OSError as e:
        raise OutputWriteError(f"{path}: cannot write the spool: {e.strerror or e}", path=path) from e
    if held:
        log.info("%s: %s of %s kept from a stopped run, not fetched again", path.name,
                 format_bytes(sum(p.stop - p.start for p in held)),
                 format_bytes(sum(p.stop - p.start for p in pieces)))
    return fd, pieces_log, held, todo


class _PieceLog:
    """The parent bytes one spool file holds, so that a run stopped in the middle of a shard keeps
    them: a header line (the plan's key and the file's fetches), then a line ``[name, start, stop]``
    per range of parent file ``name`` once its bytes are on disk (synced first), every
    :data:`LOGGED_BYTES` of a piece and at its end. Appended through one file descriptor: each line
    is one write."""

    def __init__(self, spool: ShardSpool, role: str, key: str, *, fresh: bool) -> None:
        path = spool.pieces_log(role)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if fresh else 0), 0o644)
        if fresh:
            os.write(self.fd, (json.dumps(_piece_header(spool, role, key)) + "\n").encode())

    def add(self, spool_fd: int, name: str, start: int, stop: int) -> int:
        """List bytes ``[start, stop)`` of ``name``, once the spool file is synced; returns ``stop``."""
        os.fdatasync(spool_fd)
        os.write(self.fd, (json.dumps([name, start, stop]) + "\n").encode())
        return stop

    def close(self) -> None:
        os.close(self.fd)

    @staticmethod
    def split(spool: ShardSpool, role: str, key: str,
              planned: list[Fetch]) -> tuple[list[Fetch], list[Fetch]]:
        """The leading bytes of each ``planned`` piece that a stopped run of plan ``key`` listed and
        the file holds, and the rest of the pieces; nothing held if the log is missing, damaged or
        made for another plan."""
        try:
            lines = spool.pieces_log(role).read_text().splitlines()
            size = spool.files[role].stat().st_size
        except (OSError, UnicodeDecodeError):
            return [], planned
        if not lines or _json_line(lines[0]) != _piece_header(spool, role, key):
            return [], planned
        covered = _covered(map(_json_line, lines[1:]))
        held, todo = [], []
        for p in planned:
            listed = next((b for a, b in covered.get(p.name, ()) if a <= p.start < b), p.start)
            reached = max(p.start, min(p.stop, p.start + size - p.local, listed))
            if reached > p.start:
                held.append(Fetch(p.name, p.start, reached, p.local))
            if reached < p.stop:
                todo.append(Fetch(p.name, reached, p.stop, p.local + reached - p.start))
        return held, todo


def _covered(entries: Iterable[object]) -> dict[str, list[tuple[int, int]]]:
    """The ranges ``[start, stop)`` of each file that ``[name, start, stop]`` entries cover, merged;
    entries of another form are ignored."""
    ranges: dict[str, list[tuple[int, int]]] = {}
    for e in entries:
        if (isinstance(e, list) and len(e) == 3 and isinstance(e[0], str)
                and all(type(v) is int for v in e[1:]) and 0 <= e[1] < e[2]):
            ranges.setdefault(e[0], []).append((e[1], e[2]))
    out: dict[str, list[tuple[int, int]]] = {}
    for name, spans in ranges.items():
        merged: list[tuple[int, int]] = []
        for a, b in sorted(spans):
            if merged and a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        out[name] = merged
    return out


def partial_files(spool: ShardSpool, key: str) -> list[Path]:
    """The files of ``spool`` a stopped run of plan ``key`` left part-filled that :func:`fetch_spool`
    can go on from (each with its pieces log)."""
    out: list[Path] = []
    for role, path in spool.files.items():
        log_path = spool.pieces_log(role)
        try:
            first = log_path.read_text().partition("\n")[0]
        except (OSError, UnicodeDecodeError):
            continue
        if path.is_file() and _json_line(first) == _piece_header(spool, role, key):
            out += [path, log_path]
    return out


def _piece_header(spool: ShardSpool, role: str, key: str) -> dict:
    return {"key": key, "piece_bytes": PIECE_BYTES,
            "fetches": [[f.name, f.start, f.stop, f.local] for f in spool.fetches[role]]}


def _json_line(line: str) -> object:
    try:
        return json.loads(line)
    except ValueError:
        return None


def _set() -> threading.Event:
    event = threading.Event()
    event.set()
    return event


@dataclass
class FetchTurn:
    """How one parent's fetch of a shard follows the same parent's fetch of the shard before it
    (:class:`ShardFetches`); the defaults follow nothing."""

    #: set once the earlier fetch's GETs have all started: this fetch's start after it
    gets_after: threading.Event = field(default_factory=_set)
    #: set once the earlier shard is recorded: this fetch's bytes are hashed after it
    hash_after: threading.Event = field(default_factory=_set)
    #: set by this fetch once its own GETs have all started (or it ended)
    gets_started: threading.Event = field(default_factory=threading.Event)


def _wait(event: threading.Event, stop: Callable[[], bool]) -> bool:
    """Wait until ``event`` is set (True) or ``stop()`` is true (False)."""
    while not event.wait(0.1):
        if stop():
            return False
    return True


class ShardFetches:
    """The spool fetches of consecutive shards (both parents at once), the next shard's GETs started
    while the last GETs of the one before are in flight, so that no connection idles at a shard's end.

    At most :data:`SHARDS_AT_ONCE` shards are in flight. A parent's GETs for a shard start once its
    GETs for the shard before have all started, and its bytes are hashed only once :meth:`finish`
    has recorded the shard before: a hash snapshot taken then holds no byte of a later shard. Use
    it as a context manager: leaving it stops and joins whatever is still in flight.

    Args:
        parents: the Hub parents by role.
        hashes: the parents' hashes the fetched bytes feed.
        connections: a fixed count of GETs per parent, or the run's
            :class:`~slerp_plugin.hub.connections.Connections` (shared by the shards in flight).
        stop: true when the merge failed elsewhere; the fetches then end early.
        key: the plan's key: each spool lists its pieces, and goes on from a stopped run's
            (:func:`fetch_spool`).
    """

    def __init__(self, parents: dict[str, RemoteParent], hashes: ParentHashes, *,
                 connections: int | Connections = DEFAULT_CONNECTIONS,
                 stop: Callable[[], bool] = lambda: False, key: str | None = None) -> None:
        self.parents, self.hashes, self.key = parents, hashes, key
        self.connections = (connections if isinstance(connections, Connections)
                            else Connections(connections, PIECE_BYTES))
        self._stop = stop
        self._failed = threading.Event()
        self._pool = ThreadPoolExecutor(SHARDS_AT_ONCE * len(ROLES), thread_name_prefix="spool-fetch")
        self._in_flight: deque[tuple[ShardSpool, list[Future], dict[str, FetchTurn]]] = deque()

    def __enter__(self) -> ShardFetches:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._in_flight:
            self._failed.set()
        self._pool.shutdown(wait=True)

    @property
    def pending(self) -> int:
        """Shards started and not yet finished."""
        return len(self._in_flight)

    def start(self, spool: ShardSpool) -> None:
        """Start filling ``spool``'s files; with :data:`SHARDS_AT_ONCE` shards in flight, call
        :meth:`finish` first."""
        if self.pending >= SHARDS_AT_ONCE:
            raise RuntimeError("finish the oldest shard before starting another")
        if self._in_flight:  # after the shard before: both parents' bytes hashed once it is recorded
            last, recorded = self._in_flight[-1][2], threading.Event()
            turns = {role: FetchTurn(last[role].gets_started, recorded) for role in ROLES}
        else:
            turns = {role: FetchTurn() for role in ROLES}
        futures = [self._pool.submit(fetch_spool, spool, role, self.parents[role], self.hashes,
                                     stop=self._stopped, connections=self.connections, turn=turns[role],
                                     key=self.key)
                   for role in ROLES]
        self._in_flight.append((spool, futures, turns))

    def finish(self, record: Callable[[ShardSpool], None] = lambda spool: None) -> ShardSpool:
        """Wait until the oldest shard's files are filled and its bytes hashed, call ``record`` with
        it, then let the next shard's bytes be hashed. Returns that shard's spool.

        Raises:
            HubError, OutputWriteError, FetchStopped: as :func:`fetch_spool`; the other fetches
                in flight then stop.
        """
        spool, futures, _ = self._in_flight[0]
        try:
            for f in futures:
                f.result()
            record(spool)
        except BaseException:
            self._failed.set()
            raise
        self._in_flight.popleft()
        if self._in_flight:
            next(iter(self._in_flight[0][2].values())).hash_after.set()
        return spool

    def _stopped(self) -> bool:
        return self._failed.is_set() or self._stop()


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
    order, a hash takes its bytes in one; none before ``after`` is set."""

    def __init__(self, fd: int, role: str, hashes: ParentHashes, after: threading.Event) -> None:
        self.fd, self.role, self.hashes, self.after = fd, role, hashes, after
        self._done: dict[str, list[Fetch]] = {}
        self._buffer = bytearray(HASH_BLOCK)  # used under the lock
        self._lock = threading.Lock()

    def done(self, piece: Fetch) -> None:
        with self._lock:
            self._done.setdefault(piece.name, []).append(piece)
            if self.after.is_set():
                self._drain(piece.name)

    def flush(self, stop: Callable[[], bool]) -> None:
        """Hash every completed piece that continues a file's hash once ``after`` is set.

        Raises:
            FetchStopped: ``stop()`` became true while waiting.
        """
        if not _wait(self.after, stop):
            raise FetchStopped
        with self._lock:
            for name in self._done:
                self._drain(name)

    def _drain(self, name: str) -> None:
        waiting = self._done[name]
        while True:
            pos = self.hashes.position(self.role, name)
            nxt = next((p for p in waiting if p.start <= pos < p.stop), None)
            if nxt is None:
                return
            waiting.remove(nxt)
            _hash_back(self.fd, self.role, nxt, pos, self.hashes, self._buffer)


def _hash_back(fd: int, role: str, f: Fetch, pos: int, hashes: ParentHashes, buffer: bytearray) -> None:
    """Feed ``hashes`` the bytes ``[pos, f.stop)`` of parent file ``f.name``, read back from the
    spool file ``fd`` holds into ``buffer`` (:data:`HASH_BLOCK` bytes).

    The blocks are read into one buffer rather than returned as new bytes: with the gate's
    evaluators the process maps every block of a MB or more afresh
    (:func:`~slerp_plugin.validate.fed.return_large_blocks`), and its page faults cost more CPU
    than the hash."""
    view = memoryview(buffer)
    for a in range(pos, f.stop, HASH_BLOCK):  # small blocks: the rehashes fallback holds the GIL
        n = min(HASH_BLOCK, f.stop - a)
        got = os.preadv(fd, [view[:n]], f.local + a - f.start)
        if got != n:
            raise OutputWriteError(f"spool of {f.name}: {got} of {n} bytes read back")
        hashes.feed(role, f.name, a, view[:n])


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
    buffer = bytearray(HASH_BLOCK)
    try:
        for f in spool.fetches[role]:
            pos = hashes.position(role, f.name)
            if f.start <= pos < f.stop:
                _hash_back(fd, role, f, pos, hashes, buffer)
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

    def try_take(self, n: int) -> bool:
        """Hold ``n`` more bytes if they fit now (or nothing else is held); never waits."""
        with self._cond:
            if self._closed or not (self.used == 0 or self.used + n <= self.limit):
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
