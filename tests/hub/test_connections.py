"""GETs in flight per parent: a fixed count, or ``auto`` found by measuring (slow start)."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from types import SimpleNamespace

import pytest

from slerp_plugin.hub import connections as C
from slerp_plugin.hub.client import upload_folder
from slerp_plugin.hub.connections import Connections
from slerp_plugin.hub.ranges import RangeReader
from slerp_plugin.stream import spool as spool_mod
from slerp_plugin.stream.spool import Fetch, ParentHashes, ShardSpool, fetch_spool

PIECE = 1_000_000


class Link:
    """A fake clock and a link on which ``level`` GETs at once move ``rate(level)`` bytes/s."""

    def __init__(self, rate) -> None:
        self.now, self.rate = 0.0, rate

    def clock(self) -> float:
        return self.now

    def round(self, conns: Connections, role: str = "model_1") -> int:
        """One round: as many pieces as the count allows, started together, ended together."""
        n = conns.level
        for _ in range(n):
            assert conns.acquire(role)
        self.now += n * PIECE / self.rate(n)
        for _ in range(n):
            conns.release(role, PIECE)
        return n


def settle(rate, rounds: int = 400, **kw) -> Connections:
    link = Link(rate)
    conns = Connections("auto", PIECE, clock=link.clock, **kw)
    for _ in range(rounds):
        link.round(conns)
    return conns


def test_a_fixed_count_is_the_most_in_flight_per_parent_and_never_changes():
    conns = Connections(3, PIECE)
    assert [conns.acquire("model_1") for _ in range(3)] == [True] * 3
    assert not conns.acquire("model_1", stop=lambda: True)  # a fourth waits (here: told to stop)
    assert conns.acquire("model_2")  # the other parent has its own three
    for _ in range(3):
        conns.release("model_1", PIECE)
    assert conns.level == 3 and conns.most == 3 and conns.settled


def test_auto_doubles_while_the_rate_grows_and_settles_where_it_stops_growing(caplog):
    per_connection, link = 10e6, 80e6  # a CDN's limit per connection, and the link's
    with caplog.at_level(logging.INFO, logger="slerp_plugin"):
        conns = settle(lambda n: min(n * per_connection, link))
    assert conns.settled and conns.level == 8  # 16 would not be faster
    assert conns.best_rate == pytest.approx(link, rel=0.1)
    assert "fetching over 8 connection(s) per parent" in caplog.text


def test_auto_on_a_link_with_no_limit_per_connection_stays_low():
    conns = settle(lambda n: 50e6)
    assert conns.settled and conns.level == C.AUTO_START


def test_auto_goes_no_higher_than_its_most():
    conns = settle(lambda n: n * 1e6, most=16)
    assert conns.level == 16 and conns.settled


def test_auto_does_not_double_a_count_its_fetches_cannot_fill():
    link = Link(lambda n: n * 10e6)  # more connections would always help ...
    conns = Connections("auto", PIECE, clock=link.clock)
    for _ in range(400):  # ... but a fetch never has more than 5 pieces at once
        n = min(conns.level, 5)
        for _ in range(n):
            assert conns.acquire("model_1")
        link.now += n * PIECE / link.rate(n)
        for _ in range(n):
            conns.release("model_1", PIECE)
    assert conns.settled and conns.level == 8  # tried (5 in flight beat 4), then no further


def test_a_429_halves_the_count_and_keeps_it():
    conns = settle(lambda n: min(n * 10e6, 80e6))
    conns.throttled()
    assert conns.level == 4 and conns.settled
    fixed = Connections(8, PIECE)
    fixed.throttled()
    assert fixed.level == 8


def test_time_with_nothing_in_flight_is_not_measured():
    link = Link(lambda n: min(n * 10e6, 80e6))
    conns = Connections("auto", PIECE, clock=link.clock)
    for _ in range(400):
        link.round(conns)
        link.now += 30.0  # waiting for disk budget between rounds
    assert conns.level == 8


def test_waiting_fetches_start_as_others_end():
    conns = Connections(2, PIECE)
    assert conns.acquire("model_1") and conns.acquire("model_1")
    started = threading.Event()
    t = threading.Thread(target=lambda: (conns.acquire("model_1"), started.set()))
    t.start()
    assert not started.wait(0.3)
    conns.release("model_1", PIECE)
    assert started.wait(5)
    t.join()


def test_a_stream_over_connections_limited_by_a_cdn_finds_more_connections(hub, tmp_path, monkeypatch):
    monkeypatch.setattr(spool_mod, "PIECE_BYTES", 200_000)
    monkeypatch.setattr(C, "WINDOW_SECONDS", 0.2)
    data = os.urandom(12_000_016)
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "w.safetensors").write_bytes(data)
    commit = upload_folder(folder, "org/w").commit
    hub.state.per_connection, hub.state.bandwidth["down"] = 2e6, 16e6  # 8 connections fill the link
    files = {"w.safetensors": SimpleNamespace(size=len(data), sha256=hashlib.sha256(data).hexdigest())}
    parent = SimpleNamespace(repo_id="org/w", commit=commit, files=files, heads={"w.safetensors": data[:16]},
                             reader=RangeReader("org/w", commit))
    hashes = ParentHashes({"model_1": parent})
    conns = Connections("auto", 200_000)
    spool = ShardSpool(0, {"model_1": tmp_path / "m1.bin"},
                       {"model_1": [Fetch("w.safetensors", 16, len(data), 16)]}, 0)
    fetch_spool(spool, "model_1", parent, hashes, connections=conns)
    assert (tmp_path / "m1.bin").read_bytes()[16:] == data[16:]
    assert hashes.verify()["model_1"]["w.safetensors"] == files["w.safetensors"].sha256
    assert conns.level >= 4 and hub.state.in_flight_most >= 4

