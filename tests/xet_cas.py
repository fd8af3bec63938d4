"""The Xet storage behind the test Hub: the CAS API that hf_xet speaks (v1: xorb and shard
uploads, global-dedup queries, file reconstructions), xorbs on disk, and the reconstruction of a
file's bytes for the Hub's own ``resolve``.

Formats (xet-core's spec): a xorb is a run of chunks, each an 8-byte header (version, compressed
size as 3 bytes little-endian, compression type, uncompressed size as 3 bytes) and its data
(0: stored, 1: LZ4 frame, 2: LZ4 frame of the bytes grouped by position mod 4). A shard lists
files (hash, flags, terms of xorb chunk ranges, then optional verification entries and an
optional SHA-256 extension) and then xorbs (hash and chunk count), each list closed by a bookend of
32 0xFF bytes. Hashes print as four little-endian u64 in hex.
"""

from __future__ import annotations

import hashlib
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

ENTRY = 48
BOOKEND = b"\xff" * 32
WITH_VERIFICATION = 1 << 31
WITH_METADATA_EXT = 1 << 30


def hash_hex(raw: bytes) -> str:
    """A 32-byte Xet hash as Xet writes it (each 8-byte word byte-reversed)."""
    return "".join(raw[i:i + 8][::-1].hex() for i in range(0, 32, 8))


@dataclass(frozen=True)
class Term:
    xorb: str
    start: int  # chunk indices [start, end)
    end: int
    size: int  # bytes once unpacked


@dataclass(frozen=True)
class XetFile:
    hash: str
    sha256: str | None
    size: int
    terms: tuple[Term, ...]


class ShardError(ValueError):
    """A shard that cannot be parsed."""


def parse_shard(data: bytes) -> tuple[list[XetFile], dict[str, int]]:
    """The files and the xorbs (hash to chunk count) a serialized shard lists."""
    if len(data) < ENTRY or struct.unpack_from("<Q", data, 32)[0] != 2:
        raise ShardError("not a version-2 shard")
    off, files = ENTRY, []
    while True:
        head = data[off:off + 32]
        if len(head) < 32:
            raise ShardError("truncated file section")
        flags, n = struct.unpack_from("<II", data, off + 32)
        off += ENTRY
        if head == BOOKEND:
            break
        terms = []
        for _ in range(n):
            _, size, start, end = struct.unpack_from("<IIII", data, off + 32)
            terms.append(Term(hash_hex(data[off:off + 32]), start, end, size))
            off += ENTRY
        if flags & WITH_VERIFICATION:
            off += ENTRY * n
        sha256 = None
        if flags & WITH_METADATA_EXT:
            sha256 = hash_hex(data[off:off + 32])
            off += ENTRY
        files.append(XetFile(hash_hex(head), sha256, sum(t.size for t in terms), tuple(terms)))
    xorbs = {}
    while off + ENTRY <= len(data):
        head = data[off:off + 32]
        _, n = struct.unpack_from("<II", data, off + 32)
        off += ENTRY
        if head == BOOKEND:
            break
        xorbs[hash_hex(head)] = n
        off += ENTRY * n
    return files, xorbs


def _ungroup4(data: bytes) -> bytes:
    n = len(data)
    out = bytearray(n)
    pos = 0
    for i in range(4):
        length = n // 4 + (1 if i < n % 4 else 0)
        out[i::4] = data[pos:pos + length]
        pos += length
    return bytes(out)


def unpack_chunk(kind: int, payload: bytes, size: int) -> bytes:
    """A chunk's bytes from its stored form."""
    if kind == 0:
        out = payload
    else:
        import lz4.frame

        out = lz4.frame.decompress(payload)
        if kind == 2:
            out = _ungroup4(out)
        elif kind != 1:
            raise ValueError(f"unknown chunk compression {kind}")
    if len(out) != size:
        raise ValueError(f"chunk unpacked to {len(out)} bytes, not {size}")
    return out


class XetStore:
    """Xorbs in ``root``, and the files the uploaded shards described (by Xet hash and SHA-256)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.files: dict[str, XetFile] = {}
        self.by_sha256: dict[str, str] = {}
        self.chunk_counts: dict[str, int] = {}
        self._layouts: dict[str, list[tuple[int, int, int, int]]] = {}
        self.lock = threading.Lock()

    def xorb_path(self, xorb: str) -> Path:
        return self.root / xorb

    def put_xorb(self, xorb: str, data: bytes) -> bool:
        """Store a xorb; False when it was there already."""
        path = self.xorb_path(xorb)
        if path.exists():
            return False
        tmp = path.with_name(f"{path.name}.{threading.get_ident()}.tmp")  # the same xorb may come twice
        tmp.write_bytes(data)
        tmp.replace(path)
        return True

    def put_shard(self, data: bytes) -> list[XetFile]:
        """Register the files and xorbs of an uploaded shard; its files.

        Raises:
            ShardError: it cannot be parsed, or names a xorb that was never uploaded.
        """
        files, xorbs = parse_shard(data)
        with self.lock:
            self.chunk_counts.update(xorbs)
            for f in files:
                for t in f.terms:
                    if not self.xorb_path(t.xorb).exists():
                        raise ShardError(f"xorb {t.xorb} was not uploaded")
                self.files[f.hash] = f
        return files

    def check_sha256(self, file_hash: str, dest: Path) -> bool:
        """Reconstruct a file into ``dest`` and tell whether its bytes have the SHA-256 its shard
        claimed; when they do, the file is known by that SHA-256 from now on."""
        f = self.files[file_hash]
        digest = self.write_file(file_hash, dest)
        if f.sha256 != digest:
            return False
        with self.lock:
            self.by_sha256[digest] = file_hash
        return True

    def layout(self, xorb: str) -> list[tuple[int, int, int, int]]:
        """Per chunk of ``xorb``: (byte offset of its header, stored size, compression, unpacked size)."""
        with self.lock:
            if xorb in self._layouts:
                return self._layouts[xorb]
            count = self.chunk_counts.get(xorb)
        out = []
        with open(self.xorb_path(xorb), "rb") as f:
            data = f.read()
        off = 0
        while off + 8 <= len(data) and (count is None or len(out) < count):
            version, kind = data[off], data[off + 4]
            stored = int.from_bytes(data[off + 1:off + 4], "little")
            size = int.from_bytes(data[off + 5:off + 8], "little")
            if version != 0 or off + 8 + stored > len(data):
                break  # the xorb's footer
            out.append((off, stored, kind, size))
            off += 8 + stored
        with self.lock:
            self._layouts[xorb] = out
        return out

    def reconstruction(self, file_hash: str, first: int, last: int | None, url) -> dict | None:
        """The v1 reconstruction of bytes [first, last] (inclusive; None: to the end) of a file,
        with ``url(xorb)`` where each xorb's bytes are fetched. None: unknown file."""
        f = self.files.get(file_hash)
        if f is None:
            return None
        last = f.size - 1 if last is None else min(last, f.size - 1)
        terms, fetch, pos, skip = [], {}, 0, 0
        for t in f.terms:
            chunks = self.layout(t.xorb)[t.start:t.end]
            begin = pos
            pos += t.size
            if pos <= first or begin > last:
                continue
            lo, hi = 0, len(chunks)  # the chunks of this term that hold bytes [first, last]
            at = begin
            for i, (_, _, _, size) in enumerate(chunks):
                if at + size <= first:
                    lo = i + 1
                if at <= last:
                    hi = i + 1
                at += size
            if not terms:
                skip = first - (begin + sum(c[3] for c in chunks[:lo]))
            sel = chunks[lo:hi]
            start, end = t.start + lo, t.start + hi
            terms.append({"hash": t.xorb, "unpacked_length": sum(c[3] for c in sel),
                          "range": {"start": start, "end": end}})
            fetch.setdefault(t.xorb, []).append({
                "range": {"start": start, "end": end}, "url": url(t.xorb),
                "url_range": {"start": sel[0][0], "end": sel[-1][0] + 8 + sel[-1][1] - 1}})
        return {"offset_into_first_range": skip, "terms": terms, "fetch_info": fetch}

    def write_file(self, file_hash: str, dest: Path) -> str:
        """Reconstruct a file's bytes into ``dest``; their SHA-256."""
        f = self.files[file_hash]
        digest = hashlib.sha256()
        with open(dest, "wb") as out:
            for t in f.terms:
                data = self.xorb_path(t.xorb).read_bytes()
                for off, stored, kind, size in self.layout(t.xorb)[t.start:t.end]:
                    chunk = unpack_chunk(kind, data[off + 8:off + 8 + stored], size)
                    digest.update(chunk)
                    out.write(chunk)
        return digest.hexdigest()
