"""Background I/O for the engine: a read-ahead thread and a write-behind thread.

Both hold a bounded number of chunks, so memory stays bounded while disk and kernel overlap.
``pread``/``write`` and torch kernels release the GIL, so the threads do run in parallel.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

_DONE = object()


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class ReadAhead:
    """Runs ``tasks`` in order on a thread, at most ``depth`` results ahead of the consumer."""

    def __init__(self, tasks: Iterable[Callable[[], Any]], depth: int = 2) -> None:
        self._q: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(iter(tasks),), daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, tasks: Iterator[Callable[[], Any]]) -> None:
        try:
            for task in tasks:
                if self._stop.is_set() or not self._put(task()):
                    return
            self._put(_DONE)
        except BaseException as e:  # handed to the consumer
            self._put(_Failure(e))

    def __iter__(self) -> ReadAhead:
        return self

    def __next__(self) -> Any:
        item = self._q.get()
        if item is _DONE:
            raise StopIteration
        if isinstance(item, _Failure):
            raise item.exc
        return item

    def close(self) -> None:
        """Stop reading ahead and wait for the thread."""
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class WriteBehind:
    """Calls ``sink(item)`` for each :meth:`put` item on a thread, in order, ``depth`` items queued.

    An error in ``sink`` is raised by the next :meth:`put` or by :meth:`close`.
    """

    DEPTH = 3

    def __init__(self, sink: Callable[[Any], None], depth: int = DEPTH) -> None:
        self._sink = sink
        self._q: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is _DONE:
                return
            if self._error is None:
                try:
                    self._sink(item)
                except BaseException as e:
                    self._error = e

    def put(self, item: Any) -> None:
        if self._error is not None:
            raise self._error
        self._q.put(item)

    def close(self) -> None:
        """Wait until everything queued is written; raise the sink's error, if any."""
        self._q.put(_DONE)
        self._thread.join()
        if self._error is not None:
            raise self._error
