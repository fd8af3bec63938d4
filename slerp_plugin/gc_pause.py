"""Pausing Python's cyclic garbage collector over a merge.

A merge frees its blocks, tensors and buffers by reference counting; the cyclic collector would
only rescan the process's objects (hundreds of thousands once torch is imported) again and again.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def cyclic_gc_paused() -> Iterator[None]:
    """Disable the cyclic collector in the block; restore its state after.

    Objects created in the block are moved to the oldest generation before the collector is
    enabled again (``gc.freeze``, then ``gc.unfreeze``): otherwise its first run would scan them
    all at once (about 0.1 s after importing torch) as soon as the block ends.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.freeze()
            gc.unfreeze()
            gc.enable()
