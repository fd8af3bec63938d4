"""SHA-256 of input files: streamed from the bytes a merge reads anyway, or read from the file,
and cached by (path, size, mtime, inode) so a re-run does not read an unchanged input again.

The cache lives in ``$SLERP_PLUGIN_CACHE`` or ``~/.cache/slerp_plugin/sha256`` (one small file per
input); an unwritable cache only costs time. Torch-free, so the start-up read-ahead
(:mod:`slerp_plugin.io.prefetch`) can hash while the process is still importing.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path


def cache_root() -> Path:
    """The folder of slerp_plugin's caches: ``$SLERP_PLUGIN_CACHE``, else
    ``$XDG_CACHE_HOME/slerp_plugin`` (``~/.cache/slerp_plugin``)."""
    env = os.environ.get("SLERP_PLUGIN_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "slerp_plugin"


def cache_dir() -> Path:
    """Where cached input checksums live."""
    return cache_root() / "sha256"


def file_identity(path: Path) -> dict[str, int | str]:
    """What identifies a file's content cheaply: resolved path, size, mtime (ns) and inode."""
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def _entry(path: Path) -> Path:
    ident = file_identity(path)
    return cache_dir() / hashlib.sha256(repr(sorted(ident.items())).encode()).hexdigest()


def _lookup(path: Path) -> str | None:
    try:
        value = _entry(path).read_text().strip()
    except OSError:
        return None
    return value if len(value) == 64 else None


def has_cached_sha256(path: Path) -> bool:
    """Whether the cache holds the checksum of ``path`` as it is now."""
    return _lookup(path) is not None


def cached_sha256(path: Path) -> str:
    """Hex SHA-256 of ``path``, from the cache when the file is unchanged since it was hashed."""
    return _lookup(path) or remember_sha256(path, sha256_file(path))


def remember_sha256(path: Path, digest: str) -> str:
    """Store ``digest`` as the checksum of ``path`` as it is now; returns it."""
    entry = _entry(path)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(entry.name + f".{os.getpid()}.tmp")
        tmp.write_text(digest)
        os.replace(tmp, entry)
    except OSError:
        pass
    return digest

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


class ResumableSha256:
    """SHA-256 whose progress can be saved and restored (:meth:`state`, :meth:`from_state`), so a
    resumed download hashes on from where the last run stopped instead of fetching its bytes again.

    Backed by ``rehashes`` (RustCrypto's SHA-256, about as fast as :mod:`hashlib`); a saved state
    is ~104 bytes.
    """

    def __init__(self, data: bytes = b"") -> None:
        import rehashes

        self._sha = rehashes.PySha256()
        if data:
            self.update(data)

    @classmethod
    def from_state(cls, state: bytes) -> ResumableSha256:
        """The hash as :meth:`state` saved it.

        Raises:
            ValueError: ``state`` is not a saved SHA-256 state.
        """
        import rehashes

        out = cls.__new__(cls)
        out._sha = rehashes.PySha256.deserialize(bytes(state))
        return out

    def update(self, data: bytes | memoryview) -> None:
        # whole received chunks are passed as they are; only slices are copied
        if isinstance(data, memoryview):
            whole = isinstance(data.obj, bytes) and data.nbytes == len(data.obj)
            data = data.obj if whole else data.tobytes()
        self._sha.update(data)

    def state(self) -> bytes:
        """The hash so far, for :meth:`from_state`."""
        return bytes(self._sha.serialize())

    def hexdigest(self) -> str:
        """The digest of what was fed so far (the hash itself is left as it was)."""
        return str(self.from_state(self.state())._sha.finalize())
