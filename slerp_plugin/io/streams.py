"""Background I/O for the engine: read-ahead worker threads and a write-behind thread.

Both hold a bounded number of chunks, so memory stays bounded while disk and kernel overlap.
``pread``/``write`` and torch kernels release the GIL, so the threads do run in parallel.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable
from typing import Any

_DONE = object()


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class ReadAhead:
    """Runs ``tasks`` in order on ``workers`` threads, at most ``depth`` results ahead of the
    consumer, and yields the results in task order.

    Several workers keep several reads in flight, so the disk is never idle while one worker
    waits for a CPU. A task's exception is raised to the consumer at that task's place.
    """

    def __init__(self, tasks: Iterable[Callable[[], Any]], depth: int = 2, workers: int = 1) -> None:
        self._tasks = iter(tasks)
        self._depth = depth
        self._cond = threading.Condition()
        self._results: dict[int, Any] = {}
        self._issued = 0  # tasks handed to workers
        self._taken = 0  # results handed to the consumer
        self._end: int | None = None  # number of tasks, once known
        self._stop = False
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(workers)]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and self._end is None and self._issued - self._taken >= self._depth:
                    self._cond.wait()
                if self._stop or self._end is not None:
                    return
                index = self._issued
                try:
                    task = next(self._tasks)
                except StopIteration:
                    self._end = index
                    self._cond.notify_all()
                    return
                except BaseException as e:  # the task generator failed: hand it to the consumer
                    self._end = index + 1
                    self._results[index] = _Failure(e)
                    self._cond.notify_all()
                    return
                self._issued += 1
            try:
                result = task()
            except BaseException as e:
                result = _Failure(e)
            with self._cond:
                self._results[index] = result
                self._cond.notify_all()

    def __iter__(self) -> ReadAhead:
        return self

    def __next__(self) -> Any:
        with self._cond:
            while self._taken not in self._results:
                if self._end is not None and self._taken >= self._end:
                    raise StopIteration
                self._cond.wait()
            item = self._results.pop(self._taken)
            self._taken += 1
            self._cond.notify_all()
        if isinstance(item, _Failure):
            raise item.exc
        return item

    def close(self) -> None:
        """Stop reading ahead and wait for the workers (a task already running finishes)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        for t in self._threads:
            t.join()

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class WriteBehind:
    """Calls ``sink(item)`` for each :meth:`put` item on a thread, in order, ``depth`` items queued.

    An error in ``sink`` is raised by the next :meth:`put`, by :meth:`check` or by :meth:`close`; the
    items queued after it are dropped unwritten. ``on_error(error)`` is called on the thread when
    ``sink`` fails, e.g. to wake a producer that waits for what the failed items would have freed.
    """

    DEPTH = 3

    def __init__(self, sink: Callable[[Any], None], depth: int = DEPTH,
                 on_error: Callable[[BaseException], None] | None = None) -> None:
        self._sink = sink
        self._on_error = on_error
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
                    if self._on_error is not None:
                        self._on_error(e)

    def put(self, item: Any) -> None:
        self.check()
        self._q.put(item)

    def check(self) -> None:
        """Raise the sink's error, if it has failed."""
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Wait until everything queued is written; raise the sink's error, if any."""
        self._q.put(_DONE)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def __enter__(self) -> WriteBehind:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        """Close; when the block failed, the sink's own error (a consequence) is not raised."""
        try:
            self.close()
        except BaseException:
            if exc_type is None:
                raise
