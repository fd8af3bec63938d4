"""Direct I/O (``O_DIRECT``): file bytes moved by DMA between disk and our buffers.

Buffered reads copy every byte from the page cache into the caller's buffer and buffered writes
copy it the other way; on a merge that moves three model sizes of data these copies cost more CPU
than the SLERP arithmetic. ``O_DIRECT`` skips the page cache: no copies, and no input or output
pages in memory. The price is alignment: file offsets, lengths and buffer addresses must be
multiples of the device's block size; :data:`ALIGN` (4 KiB) satisfies every common device.

Filesystems without ``O_DIRECT`` (tmpfs, some network and FUSE filesystems) refuse it with
``EINVAL``, at ``open`` or at the first transfer; the helpers here then fall back to ordinary
buffered I/O on the same descriptor, so callers never fail because of it.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

import torch

#: alignment of offsets, lengths and buffer addresses for direct transfers (bytes)
ALIGN = 4096
_O_DIRECT = getattr(os, "O_DIRECT", 0)


def align_down(n: int) -> int:
    """``n`` rounded down to a multiple of :data:`ALIGN`."""
    return n - n % ALIGN


def align_up(n: int) -> int:
    """``n`` rounded up to a multiple of :data:`ALIGN`."""
    return -(-n // ALIGN) * ALIGN


def aligned_empty(nbytes: int, pinned: bool = False) -> torch.Tensor:
    """An uninitialised uint8 tensor of ``nbytes`` whose first byte is :data:`ALIGN`-aligned.

    ``pinned`` allocates page-locked host memory (asynchronous host↔GPU copies; needs CUDA).
    """
    raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8, pin_memory=pinned)
    skip = -raw.data_ptr() % ALIGN
    return raw[skip : skip + nbytes]


def open_direct(path: Path | str, flags: int, mode: int = 0o644) -> tuple[int, bool]:
    """``os.open(path, flags | O_DIRECT)``, or without ``O_DIRECT`` where the filesystem refuses it.

    Returns the descriptor and whether it is direct. Other errors propagate as ``OSError``.
    """
    if _O_DIRECT:
        try:
            return os.open(path, flags | _O_DIRECT, mode), True
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
    return os.open(path, flags, mode), False


def make_buffered(fd: int) -> None:
    """Clear ``O_DIRECT`` on ``fd`` (after a transfer was refused with ``EINVAL``)."""
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_O_DIRECT)


class DirectIORefused(Exception):
    """A direct transfer was refused (``EINVAL``): the caller retries it buffered."""


def is_refused(e: OSError) -> bool:
    """Whether ``e`` is a filesystem refusing a direct transfer (then retry buffered)."""
    return e.errno == errno.EINVAL
