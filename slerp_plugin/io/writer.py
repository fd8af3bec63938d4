"""Writing one output shard as a stream: header first, then tensor bytes in plan order.

The SHA-256 of the file is computed on the way (no second read), the bytes go to ``<path>.tmp``
(``O_DIRECT`` where the filesystem allows) and the file is fsynced and renamed into place only
when complete. A scratch shard (read once and deleted, as a sweep's work shards are) is neither
hashed, fsynced nor written back early, and is written over the page-cache pages of a spare file.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import OutputWriteError
from .crashpoints import step
from .direct import (
    DirectIORefused,
    align_down,
    align_up,
    aligned_empty,
    is_refused,
    make_buffered,
    open_direct,
)
from .safetensors import OutputTensor, build_header

WRITEBACK_BYTES = 64 * 1024 * 1024


class ShardWriter:
    """Writes one safetensors shard as a stream into ``<path>.tmp`` and renames it when complete.

    The SHA-256 of everything written is computed on the way, so a finished shard's checksum
    needs no second read; pieces of at least ``PARALLEL_HASH_BYTES`` are hashed on a thread of
    the writer's own while they are copied and written (a direct write waits for the disk).
    Use as a context manager; an exception leaves no file at ``path``.
    With ``direct``, bytes are gathered in an aligned staging buffer of ``STAGE_BYTES`` and
    written with ``O_DIRECT`` (the last block padded, then the file truncated to its size), so
    the output neither passes through nor fills the page cache; where the filesystem refuses
    ``O_DIRECT`` the writer continues buffered.

    With ``scratch`` (a path of the caller's own), the shard is a scratch file that nothing resumes
    from or checks: it is neither hashed nor fsynced, its writeback is not started early, and where
    ``scratch`` exists (an earlier scratch shard the caller is done with) it becomes the temporary
    file and is written over in place. Pages already in the page cache are rewritten at the cost of
    a copy; a new file costs the system a page allocation per 4 KB as well (about a second per GB
    on a small VM). ``direct`` does not apply to a scratch shard.
    """

    STAGE_BYTES = 8 << 20
    PARALLEL_HASH_BYTES = 1 << 20

    def __init__(self, path: Path, tensors: Sequence[OutputTensor], *, direct: bool = False,
                 scratch: Path | None = None) -> None:
        self.path = path
        self.scratch = scratch
        # named for this process: an orphaned writer and its retry never share a temporary file
        self.tmp = path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(3)}.tmp")
        self.expected = sum(t.nbytes for t in tensors)
        self._header = build_header(tensors)
        self._sha = hashlib.sha256()
        self._fd: int | None = None
        self._want_direct = direct and scratch is None
        self._direct = False
        self._stage: memoryview | None = None
        self._staged = 0  # bytes waiting in the staging buffer
        self._pos = 0  # file offset of the next write
        self.written = 0
        self._flushed = 0  # bytes whose writeback has been started (buffered mode)
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="slerp-shard-sha256")  # starts on first use

    def __enter__(self) -> ShardWriter:
        step(f"create {self.path.name} (temporary file)")
        try:
            self._fd, self._direct = (
                open_direct(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC) if self._want_direct
                else (os.open(self.tmp, os.O_WRONLY | os.O_CREAT | self._reuse_scratch(), 0o644), False)
            )
        except OSError as e:
            raise OutputWriteError(f"{self.tmp}: cannot create: {e.strerror}", path=self.tmp) from e
        if self._direct:
            self._stage = memoryview(aligned_empty(self.STAGE_BYTES).numpy())
        try:
            self._put(memoryview(self._header))
        except BaseException as e:
            self.__exit__(type(e), e, e.__traceback__)
            raise
        return self

    def _reuse_scratch(self) -> int:
        """Make the spare scratch file the temporary file, where there is one: 0 (written over), else
        ``O_TRUNC``."""
        if self.scratch is None:
            return os.O_TRUNC
        try:
            os.replace(self.scratch, self.tmp)
        except FileNotFoundError:
            return os.O_TRUNC
        return 0

    def _pwrite(self, data: memoryview) -> None:
        assert self._fd is not None
        try:
            while data:
                n = os.pwrite(self._fd, data, self._pos)
                self._pos += n
                data = data[n:]
        except OSError as e:
            if self._direct and is_refused(e):
                raise DirectIORefused from None
            raise OutputWriteError(f"{self.tmp}: write failed: {e.strerror}", path=self.tmp) from e

    def _flush_stage(self, final: bool = False) -> None:
        """Write the staged bytes: the whole blocks, or with ``final`` all of them, padded."""
        assert self._stage is not None and self._fd is not None
        size = self._staged if final else align_down(self._staged)
        padded = align_up(size)
        self._stage[size:padded] = bytes(padded - size)
        start = self._pos
        try:
            self._pwrite(self._stage[:padded])
        except DirectIORefused:  # finish this file buffered
            make_buffered(self._fd)
            self._direct = False
            done = min(self._pos - start, self._staged)
            self._pos = start + done
            self._pwrite(self._stage[done : self._staged])
            self._stage, self._staged = None, 0
            return
        self._pos -= padded - size
        rest = self._staged - size
        self._stage[:rest] = self._stage[size : self._staged]
        self._staged = rest

    def _put(self, data: memoryview) -> None:
        data = data.cast("B")
        if self.scratch is not None:  # read once and discarded: nothing checks it against a SHA-256
            self._store(data)
            return
        if len(data) < self.PARALLEL_HASH_BYTES:
            self._sha.update(data)
            self._store(data)
            return
        hashed = self._hasher.submit(self._sha.update, data)
        try:
            self._store(data)
        finally:
            hashed.result()  # ``data`` is the caller's again once this returns

    def _store(self, data: memoryview) -> None:
        while data and self._stage is not None:
            n = min(len(data), len(self._stage) - self._staged)
            self._stage[self._staged : self._staged + n] = data[:n]
            self._staged += n
            data = data[n:]
            if self._staged == len(self._stage):
                self._flush_stage()
        if data:
            self._pwrite(data)

    def write(self, data: bytes | memoryview) -> None:
        """Append tensor bytes (in plan order)."""
        view = memoryview(data)
        self._put(view)
        self.written += view.nbytes
        if self.scratch is None and not self._direct and self._pos - self._flushed >= WRITEBACK_BYTES:
            # DONTNEED on dirty pages starts their writeback now (asynchronously), so the final
            # fsync does not have to write the whole shard while nothing else happens
            os.posix_fadvise(self._fd, self._flushed, self._pos - self._flushed, os.POSIX_FADV_DONTNEED)
            self._flushed = self._pos

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        assert self._fd is not None
        ok = False
        try:
            if exc_type is None:
                if self.written != self.expected:
                    raise OutputWriteError(
                        f"{self.path}: wrote {self.written} data bytes, plan says {self.expected}"
                    )
                try:
                    if self._stage is not None and self._staged:
                        self._flush_stage(final=True)
                    os.ftruncate(self._fd, self.size)  # drops the padding, or a spare's longer tail
                    if self.scratch is None:
                        step(f"fsync {self.path.name} (temporary file)")
                        os.fsync(self._fd)
                except OSError as e:
                    if isinstance(e, OutputWriteError):
                        raise
                    raise OutputWriteError(f"{self.tmp}: fsync failed: {e.strerror}", path=self.tmp) from e
                ok = True
        finally:
            os.close(self._fd)
            self._hasher.shutdown()
            if not ok:
                self.tmp.unlink(missing_ok=True)
        if ok:
            step(f"rename {self.path.name} into place")
            os.replace(self.tmp, self.path)

    @property
    def sha256(self) -> str:
        """The SHA-256 of the file ("" for a scratch shard, which is not hashed)."""
        return "" if self.scratch is not None else self._sha.hexdigest()

    @property
    def size(self) -> int:
        return len(self._header) + self.written
