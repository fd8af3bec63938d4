import gc
import weakref

import pytest

from slerp_plugin.cli.process import cyclic_gc_paused


class Node:
    def __init__(self) -> None:
        self.me = self


@pytest.fixture
def gc_enabled():
    was = gc.isenabled()
    gc.enable()
    yield
    if not was:
        gc.disable()


def test_collector_is_off_in_the_block_and_restored(gc_enabled):
    with cyclic_gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    with cyclic_gc_paused():
        assert not gc.isenabled()
    assert not gc.isenabled()


def test_objects_of_the_block_go_to_the_oldest_generation_and_stay_collectable(gc_enabled):
    with cyclic_gc_paused():
        kept = [Node() for _ in range(2000)]
        dropped = weakref.ref(Node())  # a reference cycle nobody holds
    # the first collection after the block does not rescan what the block created
    assert gc.get_count()[0] < 100
    assert any(o is kept[0] for o in gc.get_objects(generation=2))
    assert dropped() is not None
    gc.collect()
    assert dropped() is None  # not frozen for good: a full collection still frees the cycle


def test_state_is_restored_when_the_block_raises(gc_enabled):
    with pytest.raises(RuntimeError), cyclic_gc_paused():
        raise RuntimeError("boom")
    assert gc.isenabled()
