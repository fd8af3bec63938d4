"""The feed between a streaming merge and an evaluator: the evaluator waits for what it needs, the
merge learns when the evaluator has gone as far as the offered tensors take it."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from slerp_plugin.errors import ValidationInputError
from slerp_plugin.io.safetensors import TensorInfo
from slerp_plugin.validate.weights import FeedClosed, FolderWeights, TensorFeed


def info(name: str, file: str = "a") -> TensorInfo:
    return TensorInfo(name, "F32", (2,), Path(file), 0, 8)


def run_modules(feed: TensorFeed, modules: list[list[str]], log: list) -> threading.Thread:
    """An evaluator that runs ``modules`` in order, noting each as it runs."""
    def body():
        try:
            for names in modules:
                feed.acquire(names)
                log.append(tuple(names))
                feed.release(names)
        except FeedClosed:
            log.append("closed")
        finally:
            feed.finish()
    readers: dict[str, int] = {}
    for names in modules:
        for n in names:
            readers[n] = readers.get(n, 0) + 1
    feed.expect(readers)
    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread


def test_the_evaluator_runs_as_far_as_the_offers_take_it():
    feed, log = TensorFeed(), []
    thread = run_modules(feed, [["embed"], ["l0.a", "l0.b"], ["l1.a"], ["embed"]], log)
    feed.offer({"embed": info("embed"), "l0.a": info("l0.a")})
    feed.settle()
    assert log == [("embed",)]  # l0 waits for l0.b
    assert feed.still_needed(["embed", "l0.a"]) == ["embed", "l0.a"]  # the tied head reads embed last
    feed.offer({"l0.b": info("l0.b")})
    feed.settle()
    assert log[-1] == ("l0.a", "l0.b") and feed.still_needed(["l0.a", "l0.b"]) == []
    feed.withdraw(["l0.a", "l0.b"])
    feed.offer({"l1.a": info("l1.a")})
    feed.settle()
    thread.join(5)
    assert feed.finished and log[-1] == ("embed",)


def test_a_withdrawn_tensor_read_again_is_a_clear_error():
    feed = TensorFeed()
    feed.offer({"x": info("x")})
    feed.withdraw(["x"])
    with pytest.raises(ValidationInputError, match="x is read again after its shard was deleted"):
        feed.acquire(["x"])
    feed.offer({"x": info("x", "kept")})  # a copy kept aside can be offered again
    assert feed.acquire(["x"])[0].file == Path("kept")


def test_closing_ends_a_waiting_evaluator_and_settle_returns():
    feed, log = TensorFeed(), []
    thread = run_modules(feed, [["never"]], log)
    feed.offer({})
    feed.settle()
    feed.close()
    thread.join(5)
    assert log == ["closed"] and feed.finished
    feed.settle()  # returns at once


def test_a_folder_has_everything_at_once():
    weights = FolderWeights({"a": info("a")})
    assert weights.acquire(["a"]) == [info("a")]
    weights.release(["a"])
