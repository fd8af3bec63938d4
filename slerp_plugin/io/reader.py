"""Reading tensor bytes by offset: ``pread`` into caller buffers, ``O_DIRECT`` where it pays.

Nothing is mapped, so a read costs no process memory beyond the caller's buffer. With ``direct``
the weights bypass the page cache (:mod:`slerp_plugin.io.direct`); bytes the start-up read-ahead
(:mod:`slerp_plugin.io.prefetch`) already brought into the page cache are copied from there.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch

from ..errors import CheckpointError
from .direct import ALIGN, DirectIORefused, align_down, align_up, is_refused, open_direct
from .safetensors import TensorInfo

#: how a direct reader uses the page cache for one read (see :meth:`TensorReader.read_aligned`)
PageCache = Literal["bypass", "keep", "drop"]
#: ``cached(path, offset, nbytes)``: whether those bytes are already in the page cache
CachedRanges = Callable[[Path, int, int], bool]


class TensorReader:
    """Reads byte ranges of tensors with ``pread``, keeping open descriptors per file.

    With ``direct``, :meth:`read_aligned` reads with ``O_DIRECT`` where the filesystem allows it, so
    input bytes are neither copied nor cached. ``cached`` tells which byte ranges are already in
    the page cache (e.g. :meth:`slerp_plugin.io.prefetch.Prefetch.covers`); those are copied from
    there instead of being read from the disk again.
    """

    def __init__(self, *, direct: bool = False, cached: CachedRanges | None = None) -> None:
        self._fds: dict[Path, int] = {}
        self._direct_fds: dict[Path, int | None] = {}  # None: the filesystem refuses O_DIRECT
        self.direct = direct
        self._cached = cached

    def _open(self, path: Path, direct: bool) -> int | None:
        try:
            if not direct:
                return os.open(path, os.O_RDONLY)
            fd, is_direct = open_direct(path, os.O_RDONLY)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot open: {e.strerror}", path=path) from e
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
                raise CheckpointError(f"{info.file}: read failed: {e.strerror}", path=info.file,
                                      tensor=info.name) from e
            if n == 0:
                raise CheckpointError(f"{info.file}: truncated while reading tensor {info.name!r}",
                                      path=info.file, tensor=info.name)
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

        ``buf`` is an :data:`~slerp_plugin.io.direct.ALIGN`-aligned uint8 tensor of at least
        :func:`aligned_capacity` ``(nbytes)`` bytes. A direct read covers whole blocks, so the
        bytes asked for start at ``pos % ALIGN`` inside ``buf``; a buffered read puts them at 0.

        ``page_cache`` (direct readers only): ``"bypass"`` reads from the disk, unless ``cached``
        says the bytes are in the page cache: then they are copied from there and dropped from it;
        ``"keep"`` reads through the page cache and leaves the bytes there, for a second read soon;
        ``"drop"`` reads through it and then drops them.

        Raises:
            CheckpointError: the file ends early or cannot be read.
        """
        pos = info.offset + start
        fd = self._direct_fd(info.file)
        prefetched = (fd is not None and page_cache != "drop" and self._cached is not None
                      and self._cached(info.file, pos, nbytes))
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
