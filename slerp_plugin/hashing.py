"""SHA-256 of input files, cached by (path, size, mtime, inode) so a re-run does not re-read them.

The cache lives in ``$SLERP_PLUGIN_CACHE`` or ``~/.cache/slerp_plugin/sha256`` (one small file per
input); an unwritable cache only costs time.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .stream_hash import sha256_file


def cache_dir() -> Path:
    """Where cached input checksums live."""
    env = os.environ.get("SLERP_PLUGIN_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "slerp_plugin"
    return base / "sha256"


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
