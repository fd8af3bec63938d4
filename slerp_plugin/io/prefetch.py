"""Reading (and hashing) a merge's inputs while the process is still starting.

A merge process spends its first second importing torch and planning, with the disk idle and, on
a small machine, one core idle. :func:`start` (called by the CLI before those imports; this module
imports neither torch nor pydantic) puts both to work on a thread of its own: it asks the kernel
for the small files and safetensors headers the plan needs, then reads the weights front to back,
:data:`STEP` bytes at a time in turn between the models (``posix_fadvise(WILLNEED)`` a few steps
ahead, so the disk gets large requests), and feeds each file's SHA-256 (:class:`StreamHasher`)
as it goes. The returned :class:`Prefetch` is handed to the engine: it takes the hashers over
(:meth:`Prefetch.take_hashers`, which stops the thread) and finds the bytes read so far in the
page cache (:meth:`Prefetch.covers` tells its reader which ranges to copy from there instead of
reading the disk a second time). Its owner calls :meth:`Prefetch.stop` when the merge is over.

At most ``budget`` bytes are read (page cache, not process memory). Everything here is a hint:
an unreadable folder or file is skipped, and the merge reports it.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from .hashing import StreamHasher, has_cached_sha256
from .index import INDEX_NAME, InvalidIndex, shard_names

log = logging.getLogger(__name__)

STEP = 8 << 20  #: bytes per request; the kernel's own read-ahead would read the disk in far smaller ones
DEFAULT_REQUEST = 2 << 20  #: bytes per ``WILLNEED`` call where the device's limit cannot be told
MIN_REQUEST = 128 << 10
LOOKAHEAD = 4  #: requests asked for ahead of the one being read and hashed
DEFAULT_BUDGET = 2 << 30  #: bytes read at most (capped at a quarter of the memory available)
HEAD_BYTES = 1 << 20  #: bytes at the start of each weights file asked for first (its header)
SMALL_FILE_BYTES = 64 << 20  #: other files of a model folder up to this size are asked for first


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder in the order a merge reads them (the index's
    order of first appearance, else the single file); ``[]`` where that cannot be told."""
    index = folder / INDEX_NAME
    try:
        if index.is_file():
            return [folder / n for n in shard_names(index)]
        files = sorted(folder.glob("*.safetensors"))
    except (OSError, InvalidIndex):
        return []
    return files if len(files) == 1 else []


@functools.lru_cache(maxsize=1024)
def _key(path: str) -> str:
    return os.path.realpath(path)


class Prefetch:
    """One read-ahead over several streams (each a list of files read from start to end).

    Streams are served in turn, :data:`STEP` bytes each, so the heads of all models arrive
    together, as the merge needs them; ``first`` files (small ones) are asked for before all.
    Files in ``hash_files`` are hashed as they are read. ``on_stop`` is called once, by the first
    :meth:`stop`.
    """

    def __init__(
        self,
        streams: Sequence[Sequence[Path]],
        budget: int = DEFAULT_BUDGET,
        first: Sequence[Path] = (),
        hash_files: Iterable[Path] = (),
        on_stop: Callable[[], None] | None = None,
    ) -> None:
        self._streams = [[Path(p) for p in s] for s in streams if s]
        self._first = [Path(p) for p in first]
        self.budget = budget
        self._hashers = {_key(str(p)): StreamHasher(Path(p)) for p in hash_files}
        self._read: dict[str, int] = {}  # file → bytes from its start read into the page cache
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slerp-prefetch", daemon=True)
        self.bytes_read = 0
        self._started = 0.0
        self._on_stop = on_stop

    def start(self) -> Prefetch:
        """Start the reading thread; returns ``self``."""
        self._started = time.perf_counter()
        self._thread.start()
        return self

    def _requests(self) -> Iterator[tuple[Path, int, int]]:
        """(file, offset, length) of the weights in the order they are read."""
        cursors = [[list(s), 0] for s in self._streams]  # remaining files, offset in the first
        while cursors:
            for cur in list(cursors):
                files, offset = cur
                size = _size(files[0])
                if offset >= size:
                    files.pop(0)
                    cur[1] = 0
                    if not files:
                        cursors.remove(cur)
                    continue
                yield files[0], offset, min(STEP, size - offset)
                cur[1] = offset + STEP

    def _advise(self, requests: queue.Queue) -> None:
        """Ask the kernel for the weights a few requests ahead of :meth:`_run` (a thread of its
        own: the call blocks while the kernel queues the reads)."""
        asked = 0
        try:
            with _Files() as files:
                for path in self._first:
                    os.posix_fadvise(files.fd(path), 0, 0, os.POSIX_FADV_WILLNEED)
                for path in dict.fromkeys(p for s in self._streams for p in s):
                    os.posix_fadvise(files.fd(path), 0, HEAD_BYTES, os.POSIX_FADV_WILLNEED)
                for request in self._requests():
                    path, offset, length = request
                    if asked >= self.budget or self._stopped.is_set():
                        break
                    # the kernel reads at most its read-ahead limit of the device per request
                    cap = readahead_limit(path)
                    for start in range(offset, offset + length, cap):
                        os.posix_fadvise(files.fd(path), start, min(cap, offset + length - start),
                                         os.POSIX_FADV_WILLNEED)
                    asked += length
                    while not self._stopped.is_set():
                        try:
                            requests.put(request, timeout=0.05)
                            break
                        except queue.Full:
                            pass
        except OSError as e:  # the merge itself reports unreadable inputs
            log.debug("read-ahead stopped: %s", e)
        finally:
            while True:  # the end mark; a stopped reader no longer needs it
                try:
                    requests.put(None, timeout=0.05)
                    break
                except queue.Full:
                    if self._stopped.is_set():
                        break

    def _run(self) -> None:
        requests: queue.Queue[tuple[Path, int, int] | None] = queue.Queue(LOOKAHEAD)
        advisor = threading.Thread(target=self._advise, args=(requests,), name="slerp-prefetch-advise",
                                   daemon=True)
        advisor.start()
        buf = bytearray(STEP)
        view = memoryview(buf)
        try:
            with _Files() as files:
                while (request := requests.get()) is not None and not self._stopped.is_set():
                    path, offset, length = request
                    # waits for the kernel's read, then copies out of the page cache
                    n = os.preadv(files.fd(path), [view[:length]], offset)
                    key = _key(str(path))
                    hasher = self._hashers.get(key)
                    if hasher is not None:
                        hasher.feed(offset, view[:n])
                    with self._lock:
                        self._read[key] = offset + n
                    self.bytes_read += n
        except OSError as e:
            log.debug("read-ahead stopped: %s", e)
        finally:
            self._stopped.set()
            advisor.join()

    def covers(self, path: Path | str, offset: int, nbytes: int) -> bool:
        """Whether bytes ``[offset, offset + nbytes)`` of ``path`` were read into the page cache."""
        key = _key(str(path))
        with self._lock:
            return offset + nbytes <= self._read.get(key, 0)

    def stop(self) -> None:
        """Read no more; returns when the thread has finished its current step."""
        self._stopped.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()
        on_stop, self._on_stop = self._on_stop, None
        if on_stop is not None:
            on_stop()

    def __enter__(self) -> Prefetch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until everything within the budget is read (or :meth:`stop`); whether it is."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def take_hashers(self) -> dict[str, StreamHasher]:
        """Stop, and hand over the hashers (by real path), each advanced over the bytes read."""
        self.stop()
        hashers, self._hashers = self._hashers, {}
        hashed = sum(h.pos for h in hashers.values())
        log.info("read ahead while starting: %.1f MB of inputs in %.2f s (%.1f MB of them hashed)",
                 self.bytes_read / 1e6, time.perf_counter() - self._started, hashed / 1e6)
        return hashers


def start(
    folders: Iterable[Path | str], budget: int | None = None, on_stop: Callable[[], None] | None = None
) -> Prefetch | None:
    """Start reading ahead the model ``folders`` (local ones; others are skipped).

    ``budget`` (bytes) defaults to :data:`DEFAULT_BUDGET`, at most a quarter of the memory the
    kernel reports available; ``on_stop`` is called when the read-ahead stops. Returns the running
    read-ahead (the caller stops it), or ``None`` if no folder has weights to read.
    """
    dirs = [Path(f) for f in dict.fromkeys(str(f) for f in folders) if Path(f).is_dir()]
    streams = [weight_files(d) for d in dirs]
    if not any(streams) or not hasattr(os, "posix_fadvise"):
        return None
    weights = {p for s in streams for p in s}
    small = [p for d in dirs for p in sorted(d.iterdir())
             if p not in weights and p.is_file() and _size(p) <= SMALL_FILE_BYTES]
    to_hash = [p for p in weights if not has_cached_sha256(p)]
    return Prefetch(streams, default_budget() if budget is None else budget, small, to_hash, on_stop).start()


def default_budget() -> int:
    """:data:`DEFAULT_BUDGET`, capped at a quarter of ``MemAvailable``."""
    available = mem_available()
    return DEFAULT_BUDGET if available is None else min(DEFAULT_BUDGET, available // 4)


def mem_available() -> int | None:
    """Bytes of memory the kernel reports available (``MemAvailable``); ``None`` where it cannot be told."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


@functools.lru_cache(maxsize=64)
def _device_limit(device: int) -> int:
    sys_dev = Path(f"/sys/dev/block/{os.major(device)}:{os.minor(device)}")
    for queue_dir in (sys_dev / "queue", sys_dev / ".." / "queue"):  # a disk, or a partition's disk
        try:
            kib = max(int((queue_dir / name).read_text()) for name in ("read_ahead_kb", "max_sectors_kb"))
            return max(kib << 10, MIN_REQUEST)
        except (OSError, ValueError):
            continue
    return DEFAULT_REQUEST


def readahead_limit(path: Path) -> int:
    """Bytes one ``posix_fadvise(WILLNEED)`` call reads at most on the device holding ``path``: the
    larger of its read-ahead window and its largest request (the kernel's cap; sysfs), else
    :data:`DEFAULT_REQUEST`."""
    try:
        return min(_device_limit(path.stat().st_dev), STEP)
    except OSError:
        return DEFAULT_REQUEST


class _Files:
    """Read-only descriptors opened on first use, closed together."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}

    def fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def __enter__(self) -> _Files:
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self._fds.values():
            os.close(fd)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
