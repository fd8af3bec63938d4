"""Safetensors checkpoints read from their headers and written as a stream.

A safetensors file is ``u64 little-endian N`` + ``N`` bytes of JSON header + the data buffer. The
header maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` relative to
the data buffer, plus an optional ``"__metadata__"`` of strings. This module reads only headers to
plan a merge, reads tensor bytes by offset (``pread``, so no mapping counts against memory), and
writes a shard whose header is computed up front from the plan, then the tensor bytes in order.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from .direct_io import (
    ALIGN,
    DirectIORefused,
    align_down,
    align_up,
    aligned_empty,
    is_refused,
    make_buffered,
    open_direct,
)
from . import prefetch
from .errors import CheckpointError, OutputWriteError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit the safetensors library itself enforces
WRITEBACK_BYTES = 64 * 1024 * 1024
#: how a direct reader uses the page cache for one read (see :meth:`TensorReader.read_aligned`)
PageCache = Literal["bypass", "keep", "drop"]

#: safetensors dtype name → (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
}
TORCH_TO_ST: dict[torch.dtype, str] = {v[0]: k for k, v in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (``torch.bfloat16`` → ``"BF16"``)."""
    try:
        return TORCH_TO_ST[dtype]
    except KeyError:
        raise CheckpointError(f"dtype {dtype} cannot be stored in safetensors") from None


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies: ``file``, absolute byte ``offset`` and ``nbytes``, its dtype/shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int
    nbytes: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][0]

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][1]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def read_header(path: Path) -> tuple[list[TensorInfo], dict[str, str]]:
    """Parse and check one safetensors file's header.

    Returns the tensors in data order and the ``__metadata__`` dict.

    Raises:
        CheckpointError: missing, unreadable, corrupt or truncated file.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", raw_len)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(
                    f"{path}: corrupt or truncated safetensors header "
                    f"(header length {n}, file size {size})"
                )
            header_bytes = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header: not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    data_len = size - data_start
    infos: list[TensorInfo] = []
    for name, entry in header.items():
        try:
            dtype = entry["dtype"]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r}") from None
        if dtype not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
        info = TensorInfo(name, dtype, shape, path, data_start + begin, end - begin)
        if begin < 0 or end < begin or info.numel * info.itemsize != end - begin or any(
            s < 0 for s in shape
        ):
            raise CheckpointError(
                f"{path}: tensor {name!r}: offsets {begin}..{end} do not fit {dtype} {list(shape)}"
            )
        if end > data_len:
            raise CheckpointError(
                f"{path}: truncated: tensor {name!r} ends at byte {end} of the data, "
                f"but the file holds only {data_len} data bytes"
            )
        infos.append(info)
    infos.sort(key=lambda i: i.offset)
    return infos, {str(k): str(v) for k, v in metadata.items()}


@dataclass
class Checkpoint:
    """The tensors of a model folder (single-file or sharded safetensors), from headers only."""

    folder: Path
    files: list[Path]
    tensors: dict[str, TensorInfo] = field(default_factory=dict)

    @classmethod
    def open(cls, folder: Path | str) -> Checkpoint:
        """Read the index (if any) and every shard header of ``folder``.

        Raises:
            CheckpointError: no safetensors weights, a shard missing, or a corrupt file.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: not a directory")
        index_path = folder / INDEX_NAME
        if index_path.is_file():
            return cls._open_indexed(folder, index_path)
        single = folder / SINGLE_NAME
        if single.is_file():
            files = [single]
        else:
            files = sorted(folder.glob("*.safetensors"))
            sharded = [f for f in files if re.fullmatch(r".*-\d{5}-of-\d{5}\.safetensors", f.name)]
            if sharded:
                raise CheckpointError(
                    f"{folder}: sharded weights ({sharded[0].name}, ...) without {INDEX_NAME}"
                )
            if len(files) != 1:
                raise CheckpointError(_no_weights_message(folder, files))
        ckpt = cls(folder, files)
        for info in read_header(files[0])[0]:
            ckpt.tensors[info.name] = info
        return ckpt

    @classmethod
    def _open_indexed(cls, folder: Path, index_path: Path) -> Checkpoint:
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (OSError, ValueError, KeyError, TypeError):
            raise CheckpointError(f"{index_path}: corrupt index (no weight_map)") from None
        file_names = list(dict.fromkeys(weight_map.values()))
        files = []
        for fname in file_names:
            p = folder / fname
            if not p.is_file():
                raise CheckpointError(f"{folder}: shard {fname} listed in {INDEX_NAME} is missing")
            files.append(p)
        ckpt = cls(folder, files)
        for p in files:
            infos = {i.name: i for i in read_header(p)[0]}
            for name, fname in weight_map.items():
                if fname == p.name:
                    if name not in infos:
                        raise CheckpointError(
                            f"{p}: tensor {name!r} listed in {INDEX_NAME} is not in this shard"
                        )
                    ckpt.tensors[name] = infos[name]
        return ckpt

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self.tensors.values())


def _no_weights_message(folder: Path, files: Sequence[Path]) -> str:
    if files:
        return f"{folder}: several safetensors files and no {INDEX_NAME}: {[f.name for f in files]}"
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        return (
            f"{folder}: only pickled PyTorch weights (.bin/.pt); convert them to safetensors "
            "(e.g. transformers save_pretrained) first"
        )
    return f"{folder}: no safetensors weights ({SINGLE_NAME} or {INDEX_NAME})"


class TensorReader:
    """Reads byte ranges of tensors with ``pread``, keeping open descriptors per file.

    With ``direct``, :meth:`read_aligned` reads with ``O_DIRECT`` (see :mod:`slerp_plugin.direct_io`) where the
    filesystem allows it, so input bytes are neither copied nor cached.
    """

    def __init__(self, *, direct: bool = False) -> None:
        self._fds: dict[Path, int] = {}
        self._direct_fds: dict[Path, int | None] = {}  # None: the filesystem refuses O_DIRECT
        self.direct = direct

    def _open(self, path: Path, direct: bool) -> int | None:
        try:
            if not direct:
                return os.open(path, os.O_RDONLY)
            fd, is_direct = open_direct(path, os.O_RDONLY)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot open: {e.strerror}") from None
        if not is_direct:
            os.close(fd)
            return None
        return fd

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = self._open(path, direct=False)
        return fd

    def _direct_fd(self, path: Path) -> int | None:
        if not self.direct:
            return None
        if path not in self._direct_fds:
            self._direct_fds[path] = self._open(path, direct=True)
        return self._direct_fds[path]

    @staticmethod
    def _pread(fd: int, info: TensorInfo, pos: int, out: memoryview, need: int, direct: bool = False) -> None:
        """Read into ``out`` from ``pos`` until at least ``need`` bytes are in."""
        done = 0
        while done < need:
            try:
                n = os.preadv(fd, [out[done:]], pos + done)
            except OSError as e:
                if direct and is_refused(e):
                    raise DirectIORefused from None
                raise CheckpointError(f"{info.file}: read failed: {e.strerror}") from None
            if n == 0:
                raise CheckpointError(f"{info.file}: truncated while reading tensor {info.name!r}")
            done += n

    def read(self, info: TensorInfo, start: int, out: memoryview) -> None:
        """Fill ``out`` with the tensor's bytes from byte ``start`` (relative to the tensor).

        Raises:
            CheckpointError: the file ends early or cannot be read.
        """
        pos = info.offset + start
        self._pread(self._fd(info.file), info, pos, out, len(out))

    def read_aligned(
        self, info: TensorInfo, start: int, nbytes: int, buf: torch.Tensor, page_cache: PageCache = "bypass"
    ) -> int:
        """Read ``nbytes`` of the tensor from byte ``start`` into ``buf``; return where they begin.

        ``buf`` is an :data:`~slerp_plugin.direct_io.ALIGN`-aligned uint8 tensor of at least
        :func:`aligned_capacity` ``(nbytes)`` bytes. A direct read covers whole blocks, so the
        bytes asked for start at ``pos % ALIGN`` inside ``buf``; a buffered read puts them at 0.

        ``page_cache`` (direct readers only): ``"bypass"`` reads from the disk, unless the process's
        read-ahead (:mod:`slerp_plugin.prefetch`) already read the bytes: then they are copied
        from the page cache and dropped from it; ``"keep"`` reads through the page cache and leaves
        the bytes there, for a second read soon; ``"drop"`` reads through it and then drops them.

        Raises:
            CheckpointError: the file ends early or cannot be read.
        """
        pos = info.offset + start
        fd = self._direct_fd(info.file)
        prefetched = fd is not None and page_cache != "drop" and prefetch.covers(info.file, pos, nbytes)
        if fd is not None and page_cache == "bypass" and not prefetched:
            first = align_down(pos)
            view = memoryview(buf[: align_up(pos + nbytes) - first].numpy())
            try:
                self._pread(fd, info, first, view, pos + nbytes - first, direct=True)
            except DirectIORefused:  # e.g. a filesystem wanting other alignment: read buffered
                os.close(fd)
                self._direct_fds[info.file] = fd = None
            else:
                return pos - first
        if fd is not None and page_cache != "bypass" and not prefetched:
            # one large request, where the kernel's own read-ahead would read the disk in small ones
            os.posix_fadvise(self._fd(info.file), pos, nbytes, os.POSIX_FADV_WILLNEED)
        self.read(info, start, memoryview(buf[:nbytes].numpy()))
        if fd is not None and page_cache != "keep":
            os.posix_fadvise(self._fd(info.file), pos, nbytes, os.POSIX_FADV_DONTNEED)
        return 0

    def read_tensor(self, info: TensorInfo, start_elem: int = 0, count: int | None = None) -> torch.Tensor:
        """Elements ``[start_elem, start_elem+count)`` of the flattened tensor, as a new 1-D tensor."""
        if count is None:
            count = info.numel - start_elem
        buf = torch.empty(count * info.itemsize, dtype=torch.uint8)
        if count:
            self.read(info, start_elem * info.itemsize, memoryview(buf.numpy()))
        return buf.view(info.torch_dtype)

    def close(self) -> None:
        for fd in [*self._fds.values(), *self._direct_fds.values()]:
            if fd is not None:
                os.close(fd)
        self._fds.clear()
        self._direct_fds.clear()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def aligned_capacity(nbytes: int) -> int:
    """Bytes a :meth:`TensorReader.read_aligned` buffer needs for ``nbytes`` at any offset."""
    return align_up(nbytes) + ALIGN


@dataclass(frozen=True)
class OutputTensor:
    """A tensor of an output shard: name, safetensors dtype and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = DTYPES[self.dtype][1]
        for s in self.shape:
            n *= s
        return n


def build_header(tensors: Iterable[OutputTensor], metadata: dict[str, str] | None = None) -> bytes:
    """The bytes that start a safetensors file holding ``tensors`` in this order.

    The JSON is padded with spaces so the data buffer starts 8-byte aligned, as safetensors does.
    """
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-(8 + len(body)) % 8)
    return struct.pack("<Q", len(body)) + body


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
    """

    STAGE_BYTES = 8 << 20
    PARALLEL_HASH_BYTES = 1 << 20

    def __init__(self, path: Path, tensors: Sequence[OutputTensor], *, direct: bool = False) -> None:
        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")
        self.expected = sum(t.nbytes for t in tensors)
        self._header = build_header(tensors)
        self._sha = hashlib.sha256()
        self._fd: int | None = None
        self._want_direct = direct
        self._direct = False
        self._stage: memoryview | None = None
        self._staged = 0  # bytes waiting in the staging buffer
        self._pos = 0  # file offset of the next write
        self.written = 0
        self._flushed = 0  # bytes whose writeback has been started (buffered mode)
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="slerp-shard-sha256")  # starts on first use

    def __enter__(self) -> ShardWriter:
        try:
            self._fd, self._direct = (
                open_direct(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC) if self._want_direct
                else (os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), False)
            )
        except OSError as e:
            raise OutputWriteError(f"{self.tmp}: cannot create: {e.strerror}") from None
        if self._direct:
            self._stage = memoryview(aligned_empty(self.STAGE_BYTES).numpy())
        try:
            self._put(memoryview(self._header))
        except BaseException as e:
            self.__exit__(type(e), e, e.__traceback__)
            raise
        return self

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
            raise OutputWriteError(f"{self.tmp}: write failed: {e.strerror}") from None

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
        if not self._direct and self._pos - self._flushed >= WRITEBACK_BYTES:
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
                    os.ftruncate(self._fd, self.size)  # drops the padding of the last block
                    os.fsync(self._fd)
                except OSError as e:
                    if isinstance(e, OutputWriteError):
                        raise
                    raise OutputWriteError(f"{self.tmp}: fsync failed: {e.strerror}") from None
                ok = True
        finally:
            os.close(self._fd)
            self._hasher.shutdown()
            if not ok:
                self.tmp.unlink(missing_ok=True)
        if ok:
            os.replace(self.tmp, self.path)

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    @property
    def size(self) -> int:
        return len(self._header) + self.written
