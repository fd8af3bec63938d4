"""Block buffers: sizes derived from the dtypes and the memory budget; pooled buffers come back."""

from __future__ import annotations

import threading

import pytest

from slerp_plugin.engine.buffers import READ_AHEAD, BlockLayout, BufferPool, Lease
from slerp_plugin.io.direct import ALIGN


def test_layout_holds_whole_chunks_and_fits_the_budget():
    layout = BlockLayout.for_shard([2, 2], [2], chunk=1024, buffer_memory=192_000_000, io_block_bytes=8 << 20)
    assert layout.block % 1024 == 0 and layout.block * 2 <= 8 << 20
    assert layout.raw_bytes % ALIGN == 0 and layout.raw_bytes >= layout.block * 2
    assert 2 * layout.per_side * layout.raw_bytes <= 192_000_000 + 2 * layout.raw_bytes
    assert layout.hold_blocks == layout.per_side - READ_AHEAD - 2
    tiny = BlockLayout.for_shard([4], [2], chunk=1024, buffer_memory=1, io_block_bytes=8192)
    assert tiny.per_side == READ_AHEAD + 3 and tiny.hold_blocks == 1  # the smallest working pool
    assert tiny.block == 2048 and tiny.out_bytes == 2048 * 2


def test_pool_hands_out_aligned_buffers_and_waits_for_one_to_come_back():
    pool = BufferPool(1, 4096)
    buf = pool.take(100)
    assert buf.numel() == 4096 and buf.data_ptr() % ALIGN == 0
    assert pool.take(10_000).numel() == 10_000  # bigger than pooled: a buffer of its own
    got = []
    waiter = threading.Thread(target=lambda: got.append(pool.take(1)))
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive() and not got
    lease = Lease(pool, buf, holders=2)
    lease.release()
    waiter.join(0.3)
    assert waiter.is_alive()  # one holder left
    lease.release()
    waiter.join(5)
    assert got and got[0].data_ptr() == buf.data_ptr()


def test_a_closed_pool_stops_waiters():
    pool = BufferPool(1, 4096)
    pool.take(1)
    pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        pool.take(1)
