"""SHA-256 of input files: streamed from the bytes a merge reads anyway, or read from the file,
and cached by (path, size, mtime, inode) so a re-run does not read an unchanged input again.

The cache lives in ``$SLERP_PLUGIN_CACHE`` or ``~/.cache/slerp_plugin/sha256`` (one small file per
input); an unwritable cache only costs time. Torch-free, so the start-up read-ahead
(:mod:`slerp_plugin.io.prefetch`) can hash while the process is still importing.
"""

from __future__ import annotations

import functools
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


#: the start of a state saved by the libcrypto backend (a state without it is a rehashes state)
_OPENSSL_TAG = b"slerp-sha256-openssl-1:"
#: bytes of OpenSSL's ``SHA256_CTX`` (8 + 2 + 16 + 2 32-bit words, unchanged since OpenSSL 0.9.8)
_CTX_BYTES = 112


@functools.cache
def _libcrypto():
    """OpenSSL's libcrypto with the SHA-256 functions (checked against :mod:`hashlib`, a saved and
    restored state included), or None where it cannot be loaded."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):  # macOS aborts a process that loads its libcrypto directly
        return None
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("crypto") or "libcrypto.so.3")
        for name in ("SHA256_Init", "SHA256_Update", "SHA256_Final"):
            getattr(lib, name).restype = ctypes.c_int
        lib.SHA256_Init.argtypes = [ctypes.c_void_p]
        lib.SHA256_Final.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        sample = bytes(range(256)) * 5
        h = _OpenSslSha256(lib)
        h.update(sample[:333])
        resumed = _OpenSslSha256(lib, h.state()[len(_OPENSSL_TAG):])
        resumed.update(sample[333:])
        if resumed.hexdigest() != hashlib.sha256(sample).hexdigest():
            return None
    except (OSError, AttributeError, TypeError, ValueError):
        return None
    return lib


class _OpenSslSha256:
    """SHA-256 by libcrypto through ctypes: the call releases the GIL while it hashes."""

    def __init__(self, lib, ctx: bytes | None = None) -> None:
        import ctypes

        self._lib = lib
        self._ctx = ctypes.create_string_buffer(_CTX_BYTES)
        if ctx is None:
            lib.SHA256_Init(self._ctx)
        elif len(ctx) == _CTX_BYTES:
            ctypes.memmove(self._ctx, ctx, _CTX_BYTES)
        else:
            raise ValueError("not a saved SHA-256 state")

    def update(self, data: bytes | memoryview) -> None:
        import ctypes

        if isinstance(data, memoryview):  # a writable buffer is hashed where it is
            writable = not data.readonly and data.contiguous
            data = (ctypes.c_char * data.nbytes).from_buffer(data) if writable else _bytes_of(data)
        if len(data):
            self._lib.SHA256_Update(self._ctx, data, ctypes.c_size_t(len(data)))

    def state(self) -> bytes:
        return _OPENSSL_TAG + self._ctx.raw

    def hexdigest(self) -> str:
        import ctypes

        ctx = ctypes.create_string_buffer(self._ctx.raw, _CTX_BYTES)  # Final ends the context it is given
        out = ctypes.create_string_buffer(32)
        self._lib.SHA256_Final(out, ctx)
        return out.raw.hex()


def _bytes_of(view: memoryview) -> bytes:
    """The bytes ``view`` shows: the bytes object itself when it shows a whole one, else a copy."""
    whole = isinstance(view.obj, bytes) and view.nbytes == len(view.obj)
    return view.obj if whole else view.tobytes()


class _RehashesSha256:
    """SHA-256 by ``rehashes`` (RustCrypto's; it holds the GIL while it hashes)."""

    def __init__(self, state: bytes | None = None) -> None:
        import rehashes

        self._sha = rehashes.PySha256() if state is None else rehashes.PySha256.deserialize(state)

    def update(self, data: bytes | memoryview) -> None:
        self._sha.update(_bytes_of(data) if isinstance(data, memoryview) else data)

    def state(self) -> bytes:
        return bytes(self._sha.serialize())

    def hexdigest(self) -> str:
        import rehashes

        return str(rehashes.PySha256.deserialize(self.state()).finalize())


class ResumableSha256:
    """SHA-256 whose progress can be saved and restored (:meth:`state`, :meth:`from_state`), so a
    resumed download hashes on from where the last run stopped instead of fetching its bytes again.

    Backed by OpenSSL's libcrypto (the one :mod:`hashlib` uses, through ctypes: other threads run
    while it hashes) where it can be loaded (on Linux), else by ``rehashes`` (RustCrypto's, as fast
    but holding the GIL). A saved state is ≤ 140 bytes, restored by the backend that saved it.
    """

    def __init__(self, data: bytes = b"") -> None:
        lib = _libcrypto()
        self._sha: _OpenSslSha256 | _RehashesSha256 = _OpenSslSha256(lib) if lib else _RehashesSha256()
        if data:
            self.update(data)

    @classmethod
    def from_state(cls, state: bytes) -> ResumableSha256:
        """The hash as :meth:`state` saved it.

        Raises:
            ValueError: ``state`` is not a saved SHA-256 state (or one of OpenSSL's where it cannot
                be loaded).
        """
        state = bytes(state)
        out = cls.__new__(cls)
        if state.startswith(_OPENSSL_TAG):
            lib = _libcrypto()
            if lib is None:
                raise ValueError("a SHA-256 state saved with OpenSSL, which cannot be loaded here")
            out._sha = _OpenSslSha256(lib, state[len(_OPENSSL_TAG):])
        else:
            out._sha = _RehashesSha256(state)
        return out

    def update(self, data: bytes | memoryview) -> None:
        self._sha.update(data)

    def state(self) -> bytes:
        """The hash so far, for :meth:`from_state`."""
        return self._sha.state()

    def hexdigest(self) -> str:
        """The digest of what was fed so far (the hash itself is left as it was)."""
        return self._sha.hexdigest()
