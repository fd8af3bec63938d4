"""Tensor reader: aligned direct reads give the asked bytes; refusals fall back to buffered reads."""

from __future__ import annotations

import os
import random

import pytest

from slerp_plugin.errors import CheckpointError
from slerp_plugin.io.direct import ALIGN, aligned_empty
from slerp_plugin.io.reader import TensorReader, aligned_capacity
from slerp_plugin.io.safetensors import TensorInfo


def _random_file(tmp_path, size=50_000):
    data = os.urandom(size)
    path = tmp_path / "blob"
    path.write_bytes(data)
    return path, data


@pytest.mark.parametrize(
    ("direct", "page_cache"), [(True, "bypass"), (True, "keep"), (True, "drop"), (False, "bypass")]
)
def test_read_aligned_returns_the_asked_bytes(tmp_path, direct, page_cache):
    path, data = _random_file(tmp_path)
    rng = random.Random(1)
    with TensorReader(direct=direct) as r:
        for _ in range(50):
            offset = rng.randrange(0, len(data) - 1)
            info = TensorInfo("x", "U8", (len(data) - offset,), path, offset, len(data) - offset)
            start = rng.randrange(0, len(data) - offset)
            n = rng.randrange(0, len(data) - offset - start + 1)
            buf = aligned_empty(aligned_capacity(n))
            skew = r.read_aligned(info, start, n, buf, page_cache)
            assert buf[skew : skew + n].numpy().tobytes() == data[offset + start : offset + start + n]
            # only a direct read starts at the block boundary; page-cache reads put the bytes at 0
            assert skew == ((offset + start) % ALIGN if direct and page_cache == "bypass" else 0)


def test_read_aligned_falls_back_when_refused(tmp_path, refuse_direct_transfers):
    path, data = _random_file(tmp_path)
    info = TensorInfo("x", "U8", (len(data) - 3,), path, 3, len(data) - 3)
    with TensorReader(direct=True) as r:
        for start in (0, 777):
            buf = aligned_empty(aligned_capacity(1000))
            skew = r.read_aligned(info, start, 1000, buf)
            assert skew == 0 and buf[:1000].numpy().tobytes() == data[3 + start : 1003 + start]
    assert refuse_direct_transfers["n"] == 1  # the file is read buffered after the first refusal


def test_direct_read_of_truncated_file_is_reported(tmp_path):
    path, data = _random_file(tmp_path, 3 * ALIGN)
    # claims more than the file holds
    info = TensorInfo("w", "U8", (4 * ALIGN - 100,), path, 100, 4 * ALIGN - 100)
    with TensorReader(direct=True) as r, pytest.raises(CheckpointError, match="truncated"):
        r.read_aligned(info, 0, 4 * ALIGN - 100, aligned_empty(aligned_capacity(4 * ALIGN)))
