"""Range reads of Hub files: exact bytes, resumed after a reset, retried on 5xx/429; permanent errors
at once."""

from __future__ import annotations

import pytest

from slerp_plugin.errors import HubError, HubUnavailableError
from slerp_plugin.hub.client import list_files, upload_folder
from slerp_plugin.hub.ranges import RangeReader


@pytest.fixture
def repo(hub, demo_bf16):
    commit = upload_folder(demo_bf16[0], "org/r").commit
    name = next(f.name for f in list_files("org/r", commit) if f.name.endswith(".safetensors"))
    return RangeReader("org/r", commit), (demo_bf16[0] / name).read_bytes(), name


def test_ranges_are_the_file_s_bytes(repo):
    reader, data, name = repo
    assert reader.read(name, 0, 8) == data[:8]
    assert reader.read(name, 1000, 3000) == data[1000:4000]
    assert reader.read(name, len(data) - 5, 5) == data[-5:]
    assert reader.bytes_read == 8 + 3000 + 5


@pytest.mark.parametrize("read_bytes", [1000, 1 << 20])
def test_a_range_reaches_the_sink_in_reads_of_read_bytes(repo, monkeypatch, read_bytes):
    monkeypatch.setattr("slerp_plugin.hub.ranges.READ_BYTES", read_bytes)
    reader, data, name = repo
    got = []
    reader.stream(name, 10, 5010, lambda pos, chunk: got.append((pos, bytes(chunk))))
    assert b"".join(c for _, c in got) == data[10:5010]
    assert [len(c) for _, c in got] == ([1000] * 5 if read_bytes == 1000 else [5000])
    assert [p for p, _ in got] == list(range(10, 5010, len(got[0][1])))


def test_a_reset_mid_range_resumes_where_it_stopped(hub, repo):
    reader, data, name = repo
    hub.state.reset(rf"/resolve/.*/{name}$", after_bytes=1500, times=3)
    got = []
    reader.stream(name, 100, len(data), lambda pos, chunk: got.append((pos, bytes(chunk))))
    positions = [p for p, _ in got]
    assert positions == sorted(positions) and positions[0] == 100
    assert b"".join(c for _, c in got) == data[100:]  # every byte once, in order
    gets = [p for m, p, _ in hub.state.requests if m == "GET" and p.endswith(name)]
    assert len(gets) == 4  # three resets, then the rest


def test_server_errors_and_rate_limits_are_retried(hub, repo):
    reader, data, name = repo
    hub.state.fail("GET", rf"/resolve/.*/{name}$", status=503, times=2)
    hub.state.fail("GET", rf"/resolve/.*/{name}$", status=429, times=1)
    assert reader.read(name, 0, 100) == data[:100]
    throttled = []  # a 429 is told to the caller (the stream then keeps fewer GETs in flight)
    hub.state.fail("GET", rf"/resolve/.*/{name}$", status=503, times=1)
    hub.state.fail("GET", rf"/resolve/.*/{name}$", status=429, times=2)
    reader.stream(name, 0, 100, lambda pos, chunk: None, on_throttled=lambda: throttled.append(1))
    assert len(throttled) == 2


def test_errors_that_do_not_go_away_are_one_line(hub, repo):
    reader, _, name = repo
    hub.state.fail("GET", rf"/resolve/.*/{name}$", status=503, times=50)
    with pytest.raises(HubUnavailableError, match="unavailable"):
        reader.read(name, 0, 10)
    hub.state.faults.clear()
    with pytest.raises(HubError, match="HTTP 404") as e:
        reader.read("no-such-file.safetensors", 0, 10)
    assert not e.value.transient and "\n" not in str(e.value)


def test_redirects_to_a_cdn_are_followed_and_an_expired_url_is_asked_for_again(hub, repo):
    reader, data, name = repo
    hub.state.cdn_like(per_connection=5e6, latency=0.01, redirect_ttl=60)
    hub.state.expire_redirects(2)
    assert reader.read(name, 100, 5000) == data[100:5100]
    cdn = [path for method, path, _ in hub.state.requests if path.startswith("/_cdn/")]
    resolves = [path for method, path, _ in hub.state.requests if "/resolve/" in path]
    assert len(cdn) == 3 and len(resolves) == 3  # two expired URLs refused, then a fresh one
    hub.state.expire_redirects(100)
    with pytest.raises(HubUnavailableError, match="redirected to was refused"):
        reader.read(name, 0, 10)


@pytest.mark.parametrize("hub_storage", ["lfs"])
def test_a_folder_seeded_into_the_test_hub_is_served_without_a_second_copy(hub, demo_bf16):
    """The benchmarks' multi-GB parents go into the test Hub as hard links (bench/stream.py
    ``test_hub(link=True)``): the same bytes, as LFS files, at no extra disk."""
    folder = demo_bf16[0]
    hub.state.seed_folder("org/seeded", folder)
    files = {f.name: f for f in list_files("org/seeded", "main")}
    assert set(files) == {p.name for p in folder.iterdir() if p.is_file()}
    weights = sorted(p for p in folder.glob("*.safetensors"))
    for path in weights:
        blob = hub.state.blob_path(files[path.name].sha256)
        assert blob.stat().st_ino == path.stat().st_ino  # a hard link, not a copy
        reader = RangeReader("org/seeded", hub.state.repos["org/seeded"].branches["main"])
        assert reader.read(path.name, 0, path.stat().st_size) == path.read_bytes()
