"""Direct I/O helpers: aligned buffers."""

from __future__ import annotations

from slerp_plugin.io.direct import ALIGN, aligned_empty


def test_aligned_empty_is_aligned():
    for n in (1, ALIGN - 1, ALIGN, 3 * ALIGN + 5):
        buf = aligned_empty(n)
        assert buf.numel() == n and buf.data_ptr() % ALIGN == 0


