"""The engine's background I/O: ordered read-ahead on several workers, and write-behind."""

from __future__ import annotations

import random
import threading
import time

import pytest

from slerp_plugin.io.streams import ReadAhead, WriteBehind


def _tasks(n, log=None, fail_at=None):
    rng = random.Random(0)
    for i in range(n):
        pause = rng.random() / 500

        def task(i=i, delay=pause):
            time.sleep(delay)  # finish out of order
            if log is not None:
                log.append(i)
            if i == fail_at:
                raise OSError(f"task {i} failed")
            return i
        yield task


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_results_come_in_task_order(workers):
    with ReadAhead(_tasks(200), depth=3, workers=workers) as feed:
        assert list(feed) == list(range(200))


def test_depth_bounds_how_far_workers_run_ahead():
    started: list[int] = []
    feed = ReadAhead(_tasks(50, log=started), depth=3, workers=2)
    time.sleep(0.1)
    assert len(started) <= 3  # nobody consumed yet
    assert next(feed) == 0
    time.sleep(0.1)
    assert len(started) <= 4
    feed.close()


def test_a_failing_task_raises_at_its_place():
    feed = ReadAhead(_tasks(20, fail_at=7), depth=2, workers=2)
    assert [next(feed) for _ in range(7)] == list(range(7))
    with pytest.raises(OSError, match="task 7 failed"):
        next(feed)
    feed.close()


def test_failing_task_generator_is_reported():
    def gen():
        yield lambda: 1
        raise ValueError("plan broke")

    feed = ReadAhead(gen(), workers=2)
    assert next(feed) == 1
    with pytest.raises(ValueError, match="plan broke"):
        next(feed)
    feed.close()


def test_close_stops_workers_without_consuming():
    feed = ReadAhead(_tasks(10_000), depth=2, workers=3)
    time.sleep(0.05)
    feed.close()
    assert not any(t.is_alive() for t in feed._threads)


def test_write_behind_keeps_order_and_reports_errors():
    seen: list[int] = []
    sink = WriteBehind(seen.append)
    for i in range(100):
        sink.put(i)
    sink.close()
    assert seen == list(range(100))

    def broken(item):
        raise OSError("disk full")

    sink = WriteBehind(broken)
    sink.put(1)
    deadline = time.monotonic() + 5
    with pytest.raises(OSError, match="disk full"):
        while time.monotonic() < deadline:
            sink.put(2)
            time.sleep(0.01)
        sink.close()


def test_write_behind_tells_on_error_and_check_raises_it():
    failed = threading.Event()
    errors: list[BaseException] = []

    def broken(item):
        raise OSError("disk full")

    sink = WriteBehind(broken, on_error=lambda e: (errors.append(e), failed.set()))
    sink.check()  # nothing failed yet
    sink.put(1)
    assert failed.wait(5)
    with pytest.raises(OSError, match="disk full"):
        sink.check()
    assert [str(e) for e in errors] == ["disk full"]
    with pytest.raises(OSError, match="disk full"):
        sink.close()
