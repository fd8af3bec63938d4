"""SHA-256 of input files, from the bytes a merge reads anyway or from the file itself.

Torch-free, so the read-ahead (:mod:`slerp_plugin.prefetch`) can hash while the process starts.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path


class StreamHasher:
    """SHA-256 of a file computed from the reads a merge makes anyway.

    Reads that continue exactly where the hash stands are hashed; re-reads and jumps are not.
    :meth:`hexdigest` hashes whatever was never read (from disk), so the result is always the
    file's true SHA-256 — cheap when the merge read the file front to back, as it usually does.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sha = hashlib.sha256()
        self.pos = 0
        self._lock = threading.Lock()

    def feed(self, offset: int, data: memoryview) -> None:
        with self._lock:
            end = offset + len(data)
            if offset <= self.pos < end:
                self._sha.update(data[self.pos - offset:])
                self.pos = end

    def hexdigest(self) -> str:
        with self._lock:
            size = self.path.stat().st_size
            if self.pos < size:
                with open(self.path, "rb", buffering=0) as f:
                    f.seek(self.pos)
                    buf = bytearray(8 << 20)
                    view = memoryview(buf)
                    while n := f.readinto(buf):
                        self._sha.update(view[:n])
                        self.pos += n
            return self._sha.copy().hexdigest()


def sha256_file(path: Path, block: int = 8 << 20) -> str:
    """Hex SHA-256 of a file, read in ``block``-byte pieces."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(block)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()
