"""Spool files: each output shard's parent bytes mapped, fetched, hashed, and held within a budget."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from slerp_plugin.engine import ShardPlan, TensorJob
from slerp_plugin.errors import HubIntegrityError, HubUnavailableError
from slerp_plugin.io.direct import ALIGN
from slerp_plugin.io.safetensors import TensorInfo
from slerp_plugin.stream import spool as spool_mod
from slerp_plugin.stream.spool import DiskBudget, Fetch, ParentHashes, ShardSpool, fetch_spool, spool_shard


def info(name: str, file: str, offset: int, nbytes: int) -> TensorInfo:
    return TensorInfo(name, "BF16", (nbytes // 2,), Path(file), offset, nbytes)


def job(name: str, a: TensorInfo, b: TensorInfo) -> TensorJob:
    return TensorJob(name, "merge", a, b, "BF16", 0.5)


def test_back_to_back_tensors_share_one_fetch_at_the_parent_alignment(tmp_path):
    # model_1: x and y back to back in one file, z in another; model_2: x, y, z in one file, y first
    jobs = [job("x", info("x", "a1", 100, 40), info("x", "b1", 5000, 40)),
            job("y", info("y", "a1", 140, 60), info("y", "b1", 4000, 60)),
            job("z", info("z", "a2", 9000, 8), info("z", "b1", 5040, 8))]
    mapped, spool = spool_shard(ShardPlan(2, "out.safetensors", jobs), tmp_path)
    assert spool.files == {"model_1": tmp_path / "model_1-00003.bin",
                           "model_2": tmp_path / "model_2-00003.bin"}
    assert spool.fetches["model_1"] == [Fetch("a1", 100, 200, 100), Fetch("a2", 9000, 9008, 9000 % ALIGN)]
    # x and z are adjacent in b1 but z comes after y in the shard: three runs, in shard order
    assert [(f.name, f.start, f.stop) for f in spool.fetches["model_2"]] == \
        [("b1", 5000, 5040), ("b1", 4000, 4060), ("b1", 5040, 5048)]
    for f in spool.fetches["model_2"]:
        assert f.local % ALIGN == f.start % ALIGN
    runs = spool.fetches["model_2"]
    assert runs[1].local >= runs[0].local + 40 and runs[2].local >= runs[1].local + 60
    a = {j.name: j.a for j in mapped.jobs}
    assert a["y"].file == spool.files["model_1"] and a["y"].offset == a["x"].offset + 40
    assert [j.name for j in mapped.jobs] == ["x", "y", "z"] and mapped.file == "out.safetensors"
    assert spool.input_bytes == 108 + 108 and spool.output_bytes == 108
    assert spool.disk_bytes == 216 + 108


def test_the_budget_holds_fetches_back_until_disk_is_given_back():
    budget = DiskBudget(100)
    assert budget.take(60)
    got = []
    t = threading.Thread(target=lambda: got.append(budget.take(50)))
    t.start()
    time.sleep(0.1)
    assert not got  # 60 + 50 > 100: waits
    budget.give(60)
    t.join(5)
    assert got == [True] and budget.used == 50 and budget.peak == 60
    budget.hold(80)  # already on disk: counted without waiting, even over the limit
    assert budget.used == 130 and budget.peak == 130


def test_a_closed_budget_refuses_waiters():
    budget = DiskBudget(10)
    budget.take(10)
    got = []
    t = threading.Thread(target=lambda: got.append(budget.take(5)))
    t.start()
    time.sleep(0.05)
    budget.close()
    t.join(5)
    assert got == [False]


def test_one_shard_bigger_than_the_budget_still_runs_alone():
    budget = DiskBudget(10)
    assert budget.take(50) and budget.used == 50  # nothing else held: it goes



class FakeReader:
    """A parent file's bytes, served as RangeReader.stream serves them; counts what it sends."""

    def __init__(self, data: bytes) -> None:
        self.data, self.sent = data, 0

    def stream(self, name, start, stop, sink, on_throttled=None):
        for pos in range(start, stop, 1000):
            chunk = memoryview(self.data[pos:min(pos + 1000, stop)])
            self.sent += len(chunk)
            sink(pos, chunk)


def hashed_parent(data: bytes, sha256: str | None = None):
    sha256 = sha256 or hashlib.sha256(data).hexdigest()
    files = {"w.safetensors": SimpleNamespace(size=len(data), sha256=sha256)}
    return SimpleNamespace(repo_id="org/a", commit="c" * 40, files=files, heads={"w.safetensors": data[:16]},
                           reader=FakeReader(data))


def test_parent_hashes_go_on_from_a_snapshot_and_fetch_only_the_rest():
    data = os.urandom(50_000)
    first = ParentHashes({"model_1": hashed_parent(data)})
    first.feed("model_1", "w.safetensors", 16, memoryview(data)[16:30_000])
    first.feed("model_1", "w.safetensors", 40_000, memoryview(data)[40_000:])  # out of order: not hashed
    saved = first.snapshot()

    parent = hashed_parent(data)
    resumed = ParentHashes({"model_1": parent})
    assert resumed.restore(saved) == 30_000 - 16
    assert resumed.position("model_1", "w.safetensors") == 30_000
    resumed.feed("model_1", "w.safetensors", 20_000, memoryview(data)[20_000:35_000])  # overlaps the state
    assert resumed.verify() == {"model_1": {"w.safetensors": hashlib.sha256(data).hexdigest()}}
    assert parent.reader.sent == len(data) - 35_000


@pytest.mark.parametrize("saved", [None, [], {"model_1/w.safetensors": {"pos": 99}},
                                   {"model_1/w.safetensors": {"pos": 10**9, "state": "00"}},
                                   {"model_1/w.safetensors": {"pos": 100, "state": "zz"}}])
def test_a_malformed_snapshot_is_ignored(saved):
    data = os.urandom(5_000)
    hashes = ParentHashes({"model_1": hashed_parent(data)})
    assert hashes.restore(saved) == 0 and hashes.position("model_1", "w.safetensors") == 16
    assert hashes.verify()["model_1"]["w.safetensors"] == hashlib.sha256(data).hexdigest()


def test_bytes_an_earlier_run_merged_from_are_checked_too():
    """The hash taken up covers the bytes the earlier run used: if those were not the Hub's, the
    file fails, even though the bytes fetched now are right."""
    data = os.urandom(20_000)
    first = ParentHashes({"model_1": hashed_parent(data)})
    first.feed("model_1", "w.safetensors", 16, memoryview(b"\0" * 9_984))  # damaged in transit
    hashes = ParentHashes({"model_1": hashed_parent(data)})
    assert hashes.restore(first.snapshot()) == 10_000 - 16
    with pytest.raises(HubIntegrityError, match="do not match the Hub's SHA-256"):
        hashes.verify()

    tampered = ParentHashes({"model_1": hashed_parent(data, sha256="0" * 64)})
    with pytest.raises(HubIntegrityError, match="do not match the Hub's SHA-256"):
        tampered.verify()


class SlowFirstReader(FakeReader):
    """Serves later ranges first (the first ones wait), and counts the GETs in flight at once."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.in_flight = self.most = 0
        self.lock = threading.Lock()

    def stream(self, name, start, stop, sink, on_throttled=None):
        with self.lock:
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
        time.sleep(0.2 if start < len(self.data) // 2 else 0.0)
        try:
            super().stream(name, start, stop, sink)
        finally:
            with self.lock:
                self.in_flight -= 1


def test_a_spool_file_is_filled_over_several_connections_and_hashed_in_file_order(tmp_path, monkeypatch):
    monkeypatch.setattr(spool_mod, "PIECE_BYTES", 10_000)
    data = os.urandom(100_016)
    parent = hashed_parent(data)
    parent.reader = SlowFirstReader(data)
    runs = [Fetch("w.safetensors", 16, 60_016, 16), Fetch("w.safetensors", 60_016, 100_016, 70_000)]
    spool = ShardSpool(0, {"model_1": tmp_path / "m1.bin"}, {"model_1": runs}, 0)
    hashes = ParentHashes({"model_1": parent})
    fetch_spool(spool, "model_1", parent, hashes, connections=4)
    written = (tmp_path / "m1.bin").read_bytes()
    assert written[16:60_016] == data[16:60_016] and written[70_000:110_000] == data[60_016:]
    assert parent.reader.most == 4 and hashes.position("model_1", "w.safetensors") == len(data)
    assert hashes.verify()["model_1"]["w.safetensors"] == hashlib.sha256(data).hexdigest()
    assert parent.reader.sent == len(data) - 16  # nothing fetched twice to hash it


def test_a_failed_piece_stops_the_others_and_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(spool_mod, "PIECE_BYTES", 1_000)
    data = os.urandom(50_016)
    parent = hashed_parent(data)

    def stream(name, start, stop, sink, on_throttled=None):
        if start >= 20_016:
            raise HubUnavailableError("network gone")
        time.sleep(0.01)
        FakeReader.stream(parent.reader, name, start, stop, sink)
    parent.reader.stream = stream
    spool = ShardSpool(0, {"model_1": tmp_path / "m1.bin"},
                       {"model_1": [Fetch("w.safetensors", 16, 50_016, 16)]}, 0)
    with pytest.raises(HubUnavailableError, match="network gone"):
        fetch_spool(spool, "model_1", parent, ParentHashes({"model_1": parent}), connections=3)
    assert parent.reader.sent < 25_000


class OverlapReader(FakeReader):
    """Holds the last GET of the first shard (``hold``) until the second shard's first GET has
    ended, and logs every GET's start offset in the order they began."""

    def __init__(self, data: bytes, hold: int, second: int) -> None:
        super().__init__(data)
        self.hold, self.second = hold, second
        self.second_done = threading.Event()
        self.overlapped = False

    def stream(self, name, start, stop, sink, on_throttled=None):
        if start == self.hold:
            self.overlapped = self.second_done.wait(5)
        super().stream(name, start, stop, sink)
        if start == self.second:
            self.second_done.set()


def two_shard_spools(tmp_path: Path, size: int) -> list[ShardSpool]:
    half = 16 + (size - 16) // 2
    return [ShardSpool(i, {r: tmp_path / f"{r}-{i}.bin" for r in ("model_1", "model_2")},
                       {r: [Fetch("w.safetensors", a, b, 16)] for r in ("model_1", "model_2")}, 0)
            for i, (a, b) in enumerate([(16, half), (half, size)])]


def test_the_next_shard_is_fetched_while_the_last_one_ends_and_hashed_after_it(tmp_path, monkeypatch):
    monkeypatch.setattr(spool_mod, "PIECE_BYTES", 10_000)
    data = os.urandom(100_016)
    parents = {role: hashed_parent(data) for role in ("model_1", "model_2")}
    for p in parents.values():
        p.reader = OverlapReader(data, hold=40_016, second=50_016)
    hashes = ParentHashes(parents)
    spools = two_shard_spools(tmp_path, len(data))
    recorded = []

    def record(spool):
        time.sleep(0.3)  # the second shard's pieces arrive meanwhile
        recorded.append([hashes.position(r, "w.safetensors") for r in ("model_1", "model_2")])

    with spool_mod.ShardFetches(parents, hashes, connections=4) as fetches:
        for spool in spools:
            fetches.start(spool)
        assert [fetches.finish(record).index for _ in spools] == [0, 1]
    assert recorded == [[50_016, 50_016], [100_016, 100_016]]  # no byte of the second shard in the first
    for role, p in parents.items():
        assert p.reader.overlapped  # the second shard's GETs ran beside the first's last one
        assert (tmp_path / f"{role}-1.bin").read_bytes()[16:] == data[50_016:]
        assert p.reader.sent == len(data) - 16
    assert hashes.verify()["model_1"]["w.safetensors"] == hashlib.sha256(data).hexdigest()


def test_a_later_shard_waits_behind_an_earlier_one_for_connections(tmp_path, monkeypatch):
    monkeypatch.setattr(spool_mod, "PIECE_BYTES", 10_000)
    data = os.urandom(100_016)
    parents = {role: hashed_parent(data) for role in ("model_1", "model_2")}
    for p in parents.values():
        p.reader = SlowFirstReader(data)
        p.reader.began = []
        p.reader.stream = (lambda r: lambda name, a, b, sink, on_throttled=None: (
            r.began.append(a), SlowFirstReader.stream(r, name, a, b, sink)))(p.reader)
    hashes = ParentHashes(parents)
    with spool_mod.ShardFetches(parents, hashes, connections=1) as fetches:
        for spool in two_shard_spools(tmp_path, len(data)):
            fetches.start(spool)
        fetches.finish(), fetches.finish()
    for p in parents.values():
        assert p.reader.began == list(range(16, 100_016, 10_000)) and p.reader.most == 1


def test_a_failed_shard_stops_the_next_one_in_flight(tmp_path, monkeypatch):
    monkeypatch.setattr(spool_mod, "PIECE_BYTES", 1_000)
    data = os.urandom(100_016)
    parents = {role: hashed_parent(data) for role in ("model_1", "model_2")}

    def slow(reader, fails_at=None):
        def stream(name, start, stop, sink, on_throttled=None):
            if start == fails_at:
                raise HubUnavailableError("network gone")
            time.sleep(0.01)
            FakeReader.stream(reader, name, start, stop, sink)
        return stream
    parents["model_1"].reader.stream = slow(parents["model_1"].reader, fails_at=30_016)
    parents["model_2"].reader.stream = slow(parents["model_2"].reader)
    hashes = ParentHashes(parents)
    with pytest.raises(HubUnavailableError, match="network gone"):
        with spool_mod.ShardFetches(parents, hashes, connections=2) as fetches:
            for spool in two_shard_spools(tmp_path, len(data)):
                fetches.start(spool)
            fetches.finish()
    assert parents["model_2"].reader.sent < len(data) - 16  # the second shard did not run to its end


def test_try_take_never_waits():
    budget = DiskBudget(100)
    assert budget.try_take(60) and not budget.try_take(50) and budget.used == 60
    budget.give(60)
    assert budget.try_take(500)  # nothing else held: one shard bigger than the budget runs alone
    budget.close()
    assert not budget.try_take(0)


class FailsAt(FakeReader):
    """Fails the GET that starts at ``fail_at`` (once its sibling pieces had their time to land)."""

    def __init__(self, data: bytes, fail_at: int | None) -> None:
        super().__init__(data)
        self.fail_at, self.gets = fail_at, 0

    def stream(self, name, start, stop, sink, on_throttled=None):
        self.gets += 1
        if start == self.fail_at:
            time.sleep(0.2)
            raise HubUnavailableError("network gone")
        super().stream(name, start, stop, sink)


def one_file_spool(tmp_path: Path, size: int) -> ShardSpool:
    return ShardSpool(0, {"model_1": tmp_path / "model_1-00001.bin"},
                      {"model_1": [Fetch("w.safetensors", 16, size, 16)]}, 0)


def test_a_stopped_fetch_goes_on_from_the_pieces_it_listed(tmp_path, monkeypatch):
    monkeypatch.setattr(spool_mod, "PIECE_BYTES", 10_000)
    data = os.urandom(100_016)
    parent = hashed_parent(data)
    parent.reader = FailsAt(data, fail_at=50_016)
    spool = one_file_spool(tmp_path, len(data))
    with pytest.raises(HubUnavailableError):
        fetch_spool(spool, "model_1", parent, ParentHashes({"model_1": parent}), connections=2, key="plan-1")
    assert spool_mod.partial_files(spool, "plan-1") == [spool.files["model_1"], spool.pieces_log("model_1")]
    assert spool_mod.partial_files(spool, "plan-2") == []

    parent.reader = FakeReader(data)
    hashes = ParentHashes({"model_1": parent})
    fetch_spool(spool, "model_1", parent, hashes, connections=2, key="plan-1")
    assert parent.reader.sent <= len(data) - 16 - 50_000  # the first five pieces were not fetched again
    assert spool.files["model_1"].read_bytes()[16:] == data[16:]
    assert hashes.verify()["model_1"]["w.safetensors"] == hashlib.sha256(data).hexdigest()
    spool.remove()
    assert not spool.pieces_log("model_1").exists()


@pytest.mark.parametrize("damage", ["other plan", "garbled log", "ranges not of this file", "file cut short"])
def test_a_pieces_log_that_does_not_hold_up_is_not_trusted(tmp_path, monkeypatch, damage):
    monkeypatch.setattr(spool_mod, "PIECE_BYTES", 10_000)
    data = os.urandom(100_016)
    parent = hashed_parent(data)
    spool = one_file_spool(tmp_path, len(data))
    fetch_spool(spool, "model_1", parent, ParentHashes({"model_1": parent}), connections=2, key="plan-1")
    log_file, spooled = spool.pieces_log("model_1"), spool.files["model_1"]
    lines = log_file.read_text().splitlines()
    assert len(lines) == 11
    key = "plan-1"
    if damage == "other plan":
        key = "plan-2"
    elif damage == "garbled log":
        log_file.write_text("{not json\n" + "\n".join(lines[1:]) + "\n")
    elif damage == "ranges not of this file":
        log_file.write_text("\n".join([lines[0], '["x", 16, 100016]', '["w.safetensors", 10016, 16]',
                                       '["w.safetensors", "16", 10016]', '["w.safetensors", true, 10016]',
                                       '{"w.safetensors": [16, 10016]}']) + "\n")
    else:
        os.truncate(spooled, 50_000)
    spooled.write_bytes(b"\0" * 20_000 + spooled.read_bytes()[20_000:])  # what it holds is not used
    parent.reader = FakeReader(data)
    hashes = ParentHashes({"model_1": parent})
    fetch_spool(spool, "model_1", parent, hashes, connections=2, key=key)
    if damage == "file cut short":  # the bytes beyond the end are fetched, the others kept
        assert parent.reader.sent == len(data) - 50_000
        with pytest.raises(HubIntegrityError):  # and the damage to those kept is caught
            hashes.verify()
    else:
        assert parent.reader.sent == len(data) - 16
        assert spooled.read_bytes()[16:] == data[16:]
        assert hashes.verify()["model_1"]["w.safetensors"] == hashlib.sha256(data).hexdigest()


def test_a_piece_stopped_halfway_keeps_the_bytes_it_listed(tmp_path, monkeypatch):
    monkeypatch.setattr(spool_mod, "PIECE_BYTES", 40_000)
    monkeypatch.setattr(spool_mod, "LOGGED_BYTES", 5_000)
    data = os.urandom(100_016)
    parent = hashed_parent(data)

    def cut(name, start, stop, sink, on_throttled=None):  # the connection drops after 23 KB
        FakeReader.stream(parent.reader, name, start, min(stop, start + 23_000), sink)
        raise HubUnavailableError("network gone")
    parent.reader.stream = cut
    spool = one_file_spool(tmp_path, len(data))
    with pytest.raises(HubUnavailableError):
        fetch_spool(spool, "model_1", parent, ParentHashes({"model_1": parent}), connections=1, key="plan")

    parent.reader = FakeReader(data)
    hashes = ParentHashes({"model_1": parent})
    fetch_spool(spool, "model_1", parent, hashes, connections=1, key="plan")
    assert parent.reader.sent == len(data) - 16 - 20_000  # all but the 20 KB listed (every 5 KB)
    assert spool.files["model_1"].read_bytes()[16:] == data[16:]
    assert hashes.verify()["model_1"]["w.safetensors"] == hashlib.sha256(data).hexdigest()
