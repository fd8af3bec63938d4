"""Reusable, aligned block buffers for the merge's reads and writes, and how big they are.

A fixed set of buffers bounds memory, spares the allocator churn across threads, and satisfies
``O_DIRECT``'s alignment. :class:`BlockLayout` derives a shard's block size and pool sizes from
its dtypes and the ``buffer_memory`` budget.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

import torch

from ..io.direct import aligned_empty
from ..io.reader import aligned_capacity
from ..io.streams import WriteBehind

READ_AHEAD = 2  #: (model_1, model_2) block pairs read ahead of the kernel
IO_BLOCK_BYTES = 8 << 20  #: bytes per read (whole kernel chunks) and per write
READ_WORKERS = 2  #: reads in flight, so the disk never waits for a busy CPU


@dataclass(frozen=True)
class BlockLayout:
    """How one output shard moves its bytes.

    ``block``: elements per read and write (whole kernel chunks of ``chunk`` elements, about
    ``io_block_bytes``); ``raw_bytes``: bytes of one input buffer (room for any alignment);
    ``per_side``: input buffers per model; ``hold_blocks``: tensors of at most this many blocks are
    kept between the two SLERP passes (larger ones are read twice); ``out_bytes``: bytes of one
    output buffer.
    """

    chunk: int
    block: int
    raw_bytes: int
    per_side: int
    hold_blocks: int
    out_bytes: int

    @classmethod
    def for_shard(cls, itemsizes: list[int], out_itemsizes: list[int], chunk: int, buffer_memory: int,
                  io_block_bytes: int = IO_BLOCK_BYTES) -> BlockLayout:
        """The layout for a shard whose inputs and outputs have these element sizes (bytes)."""
        itemsize = max([*itemsizes, 1])
        block = chunk * max(1, io_block_bytes // (chunk * itemsize))
        raw_bytes = aligned_capacity(block * itemsize)
        # per side: READ_AHEAD blocks queued, one being read, one being merged or hashed, and the
        # blocks of a tensor held between its two passes with what the memory budget leaves
        per_side = max(READ_AHEAD + 3, buffer_memory // (2 * raw_bytes))
        return cls(chunk, block, raw_bytes, per_side, per_side - READ_AHEAD - 2,
                   block * max([*out_itemsizes, 1]))


class BufferPoolClosed(RuntimeError):
    """A thread waited for a buffer of a pool that was closed (its merge failed elsewhere)."""


class BufferPool:
    """A fixed set of reusable, :data:`~slerp_plugin.io.direct.ALIGN`-aligned byte buffers.

    ``pinned`` buffers are page-locked (asynchronous host↔GPU copies). A buffer given back with a
    CUDA event (an asynchronous copy out of it still running) is handed out again only once that
    event has completed. After :meth:`close`, :meth:`take` raises instead of waiting, so a thread
    waiting for a buffer cannot outlive a failed merge.
    """

    def __init__(self, count: int, nbytes: int, pinned: bool = False) -> None:
        self.nbytes = nbytes
        self._free: queue.Queue[tuple[torch.Tensor, object]] = queue.Queue()
        self._closed = threading.Event()
        for _ in range(count):
            self._free.put((aligned_empty(nbytes, pinned), None))

    def take(self, nbytes: int) -> torch.Tensor:
        """A buffer of at least ``nbytes`` (a larger request gets a buffer of its own, unpooled).

        Raises:
            BufferPoolClosed: the pool was closed while waiting.
        """
        if nbytes > self.nbytes:  # e.g. a float64 tensor in a bf16 model
            return aligned_empty(nbytes)
        while True:
            try:
                buf, pending = self._free.get(timeout=0.1)
                break
            except queue.Empty:
                if self._closed.is_set():
                    raise BufferPoolClosed("buffer pool closed") from None
        if pending is not None:
            pending.synchronize()
        return buf

    def give(self, buf: torch.Tensor, pending: object = None) -> None:
        """Return ``buf``; ``pending`` (a CUDA event) must complete before it is handed out again."""
        if buf.numel() == self.nbytes:
            self._free.put((buf, pending))

    def close(self) -> None:
        self._closed.set()


class Lease:
    """A pool buffer used by ``holders`` threads at once; back to the pool when all let go."""

    def __init__(self, pool: BufferPool, buf: torch.Tensor, holders: int) -> None:
        self.pool, self.buf = pool, buf
        self._holders = holders
        self._pending: object = None
        self._lock = threading.Lock()

    def release(self, pending: object = None) -> None:
        with self._lock:
            self._holders -= 1
            self._pending = pending or self._pending
            last = self._holders == 0
        if last:
            self.pool.give(self.buf, self._pending)


#: output buffers queued behind the kernel: the write-behind's depth, one being filled, one being written
OUT_BUFFERS = WriteBehind.DEPTH + 2
