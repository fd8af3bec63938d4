"""Advisory file locks (``flock``) that the kernel releases when their process dies, and that say
who holds them.

A lock file is created beside what it protects and removed by the last holder to let go. An
exclusive holder writes who it is into the file (process id, host, since when, what it does), so a
process that finds the lock taken can name the holder in its error.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger(__name__)

WAIT_LOG_S = 30.0  #: seconds between "still waiting" log lines
_POLL_S = 0.2


class LockBusy(Exception):
    """The lock is held by another process; ``holder`` describes it (one line)."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path} is locked by {holder}")
        self.path = path
        self.holder = holder


class FileLock:
    """An acquired ``flock`` on ``path``, shared or exclusive; :meth:`release` (or the ``with`` block's
    end, or the death of the process) lets it go."""

    def __init__(self, path: Path, fd: int, exclusive: bool) -> None:
        self.path, self._fd, self.exclusive = path, fd, exclusive

    @classmethod
    def acquire(
        cls,
        path: Path,
        *,
        exclusive: bool,
        wait: bool = False,
        what: str = "",
        timeout: float | None = None,
        on_wait: Callable[[str], None] | None = None,
    ) -> FileLock:
        """Lock ``path`` (created if missing). Without ``wait`` a held lock raises :class:`LockBusy`
        at once; with it this waits (up to ``timeout`` seconds), calling ``on_wait(holder)`` when it
        starts waiting and every :data:`WAIT_LOG_S` seconds after. ``what`` says what the holder does
        (shown to others).

        Raises:
            LockBusy: held by another process (without ``wait``, or past ``timeout``).
            OSError: the lock file cannot be created.
        """
        started = time.monotonic()
        last_note = started - WAIT_LOG_S  # the first note as soon as it waits
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                holder = describe_holder(path)
                now = time.monotonic()
                if not wait or (timeout is not None and now - started >= timeout):
                    raise LockBusy(path, holder) from None
                if on_wait is not None and now - last_note >= WAIT_LOG_S:
                    on_wait(holder)
                    last_note = now
                time.sleep(_POLL_S)
                continue
            if _same_file(fd, path):
                lock = cls(path, fd, exclusive)
                if exclusive:
                    lock._write_holder(what)
                return lock
            os.close(fd)  # the file was removed by its last holder meanwhile: lock the new one

    def _write_holder(self, what: str) -> None:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "what": what,
                "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(info).encode(), 0)

    def release(self) -> None:
        """Let go; the last holder removes the lock file."""
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        try:
            if not self.exclusive:
                fcntl.flock(fd, fcntl.LOCK_UN)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    return  # others still hold it
            if _same_file(fd, self.path):
                self.path.unlink(missing_ok=True)
        finally:
            os.close(fd)

    def __enter__(self) -> FileLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def describe_holder(path: Path) -> str:
    """Who holds the lock, as the exclusive holder wrote it: ``pid 12 on host h since T (merging)``."""
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return "another process"
    what = f" ({info['what']})" if info.get("what") else ""
    return f"process {info['pid']} on host {info.get('host', '?')} since {info.get('since', '?')}{what}"
