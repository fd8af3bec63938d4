"""Process-wide settings of the ``slerp-merge`` command, and only of it.

A merge called from Python or an Airflow task gets none of these; the command sets them because it
owns its process and lives for one merge:

- ``OPENBLAS_NUM_THREADS=1`` unless set: numpy (imported by torch) would start an OpenBLAS thread
  per CPU, and nothing here uses them;
- the cyclic garbage collector is off while the command runs (importing torch would run it again
  and again; a merge frees its buffers by reference counting); what survives is moved to the
  oldest generation when it comes back, so its first run does not scan it all (about 0.1 s);
- the start-up read-ahead of the inputs (:mod:`slerp_plugin.io.prefetch`) runs while torch is
  imported, with Python's GIL switch interval at :data:`SWITCH_INTERVAL` until the engine takes
  it over (else the importing thread holds the GIL for 5 ms each time the read-ahead needs it);
- the process ends with ``os._exit`` once everything is flushed: an interpreter that imported
  torch takes about half a second to tear down.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..io.prefetch import Prefetch, start

SWITCH_INTERVAL = 0.0005  #: seconds: the GIL switch interval while the read-ahead runs


def limit_blas_threads() -> None:
    """``OPENBLAS_NUM_THREADS=1`` unless the user set it (before numpy is imported)."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


@contextmanager
def cyclic_gc_paused() -> Iterator[None]:
    """Disable the cyclic collector in the block; restore its state after.

    Objects created in the block are moved to the oldest generation before the collector is
    enabled again (``gc.freeze``, then ``gc.unfreeze``): otherwise its first run would scan them
    all at once as soon as the block ends.
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


@contextmanager
def merge_process(models: Iterable[str]) -> Iterator[Prefetch | None]:
    """The process settings of one merge command: the cyclic GC paused, and the read-ahead of the
    local ``models`` started; yields the read-ahead (for :func:`slerp_plugin.merge.run_merge`),
    which is stopped when the block ends, whatever happens in it."""
    saved = sys.getswitchinterval()
    with cyclic_gc_paused():
        sys.setswitchinterval(SWITCH_INTERVAL)
        prefetch = start((Path(m).expanduser() for m in models), on_stop=lambda: sys.setswitchinterval(saved))
        if prefetch is None:
            sys.setswitchinterval(saved)
        try:
            yield prefetch
        finally:
            if prefetch is not None:
                prefetch.stop()


#: the HTTP clients' loggers, which say one line per request (thousands in a streamed 72B merge)
HTTP_LOGGERS = ("httpx", "httpx2", "httpcore", "httpcore2", "urllib3")


def quiet_http_logs() -> None:
    """Keep the HTTP clients' per-request lines out of the command's log (warnings and errors
    still show); ``SLERP_DEBUG=1`` keeps them."""
    if os.environ.get("SLERP_DEBUG") == "1":
        return
    for name in HTTP_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def fast_exit(code: int) -> None:
    """Flush logs and standard streams, then end the process at once with ``code``."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
