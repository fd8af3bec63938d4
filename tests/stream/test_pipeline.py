"""Hub to Hub streaming merges against the local Hub test server: the result, the disk it holds,
resume, and faults."""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from pathlib import Path

import pytest
from model_helpers import spec_for

from slerp_plugin.errors import ConfigError, HubIntegrityError, HubUnavailableError
from slerp_plugin.hub import client as H
from slerp_plugin.merge import run_merge
from slerp_plugin.stream import spool as spool_mod
from slerp_plugin.stream.pipeline import UPLOADS_IN_FLIGHT, stream_merge

SHARD = "200KB"


@pytest.fixture
def parents(hub, demo_bf16):
    a = H.upload_folder(demo_bf16[0], "org/parent-a").commit
    b = H.upload_folder(demo_bf16[1], "org/parent-b").commit
    return a, b


def local_result(demo_bf16, tmp_path: Path, **kw) -> Path:
    return run_merge(spec_for(demo_bf16, tmp_path / "local", **{"max_shard_size": SHARD, **kw})).output


def stream_spec(tmp_path: Path, **kw):
    from slerp_plugin.spec import MergeSpec

    fields = dict(model_1="org/parent-a", model_2="org/parent-b", t=0.3, output=tmp_path / "streamed",
                  max_shard_size=SHARD, stream=True, push_to_hub="org/merged")
    fields.update(kw)
    return MergeSpec.build(**fields)


def published(repo_id: str, tmp_path: Path) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, cache_dir=tmp_path / "check-cache",
                                  endpoint=os.environ["HF_ENDPOINT"]))


def tensor_bytes(folder: Path) -> dict[str, tuple[str, tuple, bytes]]:
    """Every tensor of ``folder``'s weight files: name → (dtype, shape, raw bytes)."""
    from slerp_plugin.io.safetensors import read_header

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        data = f.read_bytes()
        for i in read_header(f)[0]:
            out[i.name] = (i.dtype, tuple(i.shape), data[i.offset:i.offset + i.nbytes])
    return out


def assert_same_weights(a: Path, b: Path) -> None:
    """The same tensors, bit for bit, and an index that lists them all (a gated stream groups them
    into shards in the order the model runs, a local merge in model_1's order)."""
    want, got = tensor_bytes(a), tensor_bytes(b)
    assert want and sorted(want) == sorted(got)
    for name, value in want.items():
        assert got[name] == value, name
    index_a = json.loads((a / "model.safetensors.index.json").read_text())
    index_b = json.loads((b / "model.safetensors.index.json").read_text())
    assert index_a["metadata"] == index_b["metadata"] and sorted(index_a["weight_map"]) == sorted(got)
    assert set(index_b["weight_map"].values()) == {p.name for p in b.glob("*.safetensors")}


def test_streamed_merge_is_bit_identical_and_published_in_one_commit(hub, parents, demo_bf16, tmp_path):
    expected = local_result(demo_bf16, tmp_path)
    before = hub.state.commit_count("org/merged") if "org/merged" in hub.state.repos else 0
    result = run_merge(stream_spec(tmp_path))
    assert result.output is None and result.upload.new_commit
    assert hub.state.commit_count("org/merged") == before + 2  # the repo's initial commit, then ours
    got = published("org/merged", tmp_path)
    assert_same_weights(expected, got)
    for name in ("config.json", "tokenizer.json", "merge_manifest.json", "README.md"):
        assert (got / name).is_file(), name
    manifest = json.loads((got / "merge_manifest.json").read_text())
    assert manifest["inputs"]["model_1"]["commit"] == parents[0]
    weights = [f for f in manifest["inputs"]["model_2"]["files"] if f["name"].endswith(".safetensors")]
    assert weights and all(len(f["sha256"]) == 64 for f in weights)
    timings, out = manifest["timings"], manifest["output"]
    assert timings["stream_uploaded_bytes"] == sum(s["size"] for s in out["shards"])
    assert timings["stream_fetched_bytes"] == 2 * out["total_size"]  # both parents' tensors, once
    assert 0 < timings["stream_peak_disk_bytes"] <= timings["stream_disk_budget_bytes"]
    assert timings["stream_reused_shards"] == 0
    title = hub.state.repos["org/merged"].commits[result.upload.commit].title
    assert title.startswith("SLERP merge of org/parent-a@") and "(t=0.3)" in title
    # nothing kept locally, the Hub cache not filled with the parents
    assert not (tmp_path / "streamed").exists() and not (tmp_path / "streamed.partial").exists()
    assert not list((tmp_path / "hf-cache").glob("models--org--parent-*"))


def test_disk_stays_within_the_budget(hub, parents, tmp_path, monkeypatch):
    seen = []
    real_take = spool_mod.DiskBudget.take

    def take(self, n):
        ok = real_take(self, n)
        seen.append(self.used)
        return ok

    monkeypatch.setattr(spool_mod.DiskBudget, "take", take)
    sizes = []
    real_fetch = spool_mod.fetch_spool

    def fetch(spool, role, *a, **kw):  # measure what the working folder really holds
        real_fetch(spool, role, *a, **kw)
        work = tmp_path / "streamed.partial"
        sizes.append(sum(f.stat().st_blocks * 512 for f in work.rglob("*") if f.is_file()))

    monkeypatch.setattr("slerp_plugin.stream.spool.fetch_spool", fetch)
    budget = 1_600_000  # the gate on 64 tokens: its saved points small beside the shards, as for real models
    run_merge(stream_spec(tmp_path, disk_budget=budget, gate_max_tokens=64))
    assert max(seen) <= budget and max(sizes) <= budget + 200_000  # + journal, markers


def test_budget_below_one_shard_is_refused_before_anything_is_fetched(hub, parents, tmp_path):
    with pytest.raises(ConfigError, match="disk_budget: .* less than one output shard"):
        run_merge(stream_spec(tmp_path, disk_budget="100KB"))
    assert "org/merged" not in hub.state.repos


def test_a_tokenizer_folder_without_tokenizer_files_is_refused(hub, parents, tmp_path):
    from slerp_plugin.errors import CheckpointError

    empty = tmp_path / "no-tokenizer"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="^tokenizer: no tokenizer files in"):
        run_merge(stream_spec(tmp_path, tokenizer=str(empty)))
    assert "org/merged" not in hub.state.repos


def test_needs_hub_parents_and_a_target(demo_bf16, tmp_path):
    with pytest.raises(ConfigError, match="push_to_hub"):
        stream_merge(stream_spec(tmp_path, push_to_hub=None))
    with pytest.raises(ConfigError, match="not a Hub id"):
        stream_merge(stream_spec(tmp_path, model_1=str(demo_bf16[0])))


def test_resets_and_server_errors_are_retried(hub, parents, demo_bf16, tmp_path):
    expected = local_result(demo_bf16, tmp_path)
    hub.state.reset(r"parent-a/resolve/.*safetensors$", after_bytes=5000, times=3)
    hub.state.reset(r"parent-b/resolve/.*safetensors$", after_bytes=70_000, times=2)
    hub.state.fail("GET", r"parent-b/resolve/.*safetensors$", status=503, times=2)
    hub.state.fail("GET", r"parent-a/resolve/.*safetensors$", status=429, times=1)
    hub.state.fail(*hub.state.upload_route, status=500, times=2)
    hub.state.fail("POST", r"/commit/", status=502, times=1)
    run_merge(stream_spec(tmp_path))
    assert_same_weights(expected, published("org/merged", tmp_path))


def test_a_parent_that_does_not_match_its_sha256_fails_and_publishes_nothing(hub, parents, tmp_path):
    repo = hub.state.repos["org/parent-b"]
    entry = next(e for p, e in repo.commits[parents[1]].files.items() if p.endswith(".safetensors"))
    blob = hub.state.blob_path(entry.sha256)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF  # the served bytes no longer match the LFS sha256 the Hub lists
    blob.write_bytes(bytes(data))
    with pytest.raises(HubIntegrityError, match="do not match the Hub's SHA-256.*nothing was published"):
        run_merge(stream_spec(tmp_path))
    assert "org/merged" not in hub.state.repos or hub.state.commit_count("org/merged") == 1
    assert not (tmp_path / "streamed.partial").exists()


@pytest.mark.parametrize("gate", [False, True])
def test_an_interrupted_stream_resumes_without_merging_or_uploading_again(hub, parents, demo_bf16, tmp_path,
                                                                         caplog, monkeypatch, gate):
    """Without the gate nothing is merged again; with it, the shards from the first one the gate's
    evaluation still needs are merged again (all of them when it had not gone past a decoder layer:
    see test_gate_resume.py), and nothing the Hub holds is uploaded again."""
    expected = local_result(demo_bf16, tmp_path, max_shard_size="60KB")
    total = len(list(expected.glob("*.safetensors")))
    spec = stream_spec(tmp_path, max_shard_size="60KB", gate=gate)
    real = spool_mod.fetch_spool

    shards = tmp_path / "streamed.partial" / ".slerp_state" / "shards"

    def network_gone_at_shard_4(spool, role, *a, **kw):
        if kw.get("write", True) and spool.index >= 3:
            deadline = time.monotonic() + 30
            while not list(shards.glob("*.hub.json")) and time.monotonic() < deadline:
                time.sleep(0.01)  # once the first shard is on the Hub
            raise HubUnavailableError("network gone")
        return real(spool, role, *a, **kw)

    monkeypatch.setattr("slerp_plugin.stream.spool.fetch_spool", network_gone_at_shard_4)
    with pytest.raises(HubUnavailableError, match="network gone"):
        run_merge(spec)
    assert total > 4 and hub.state.commit_count("org/merged") == 1  # created, nothing published
    uploaded = len(list(shards.glob("*.hub.json")))
    assert 1 <= uploaded <= 3
    record = shards.parent / "gate-point.json"  # where the gate's evaluation was, if it saved it
    point = json.loads(record.read_text())["shard"] if record.exists() else 0

    monkeypatch.setattr("slerp_plugin.stream.spool.fetch_spool", real)
    puts_before = hub.state.upload_requests()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="slerp_plugin"):
        run_merge(spec)
    puts = hub.state.upload_requests() - puts_before
    total = len(list(published("org/merged", tmp_path).glob("*.safetensors")))  # the stream's own shards
    assert puts == total - uploaded  # the shards the Hub holds are not sent again
    if gate:
        assert caplog.text.count(" written in ") == total - point
        assert "gate passed" in caplog.text
        assert (published("org/merged", tmp_path) / "validation.json").is_file()
    else:
        waiting = int(re.search(r"(\d+) merged and waiting to upload", caplog.text).group(1))
        assert f"{uploaded} already uploaded" in caplog.text
        assert caplog.text.count(" written in ") == total - uploaded - waiting  # nor merged again
    assert_same_weights(expected, published("org/merged", tmp_path))


@pytest.mark.parametrize("hash_record", ["kept", "lost"])
def test_a_resumed_stream_fetches_only_what_it_still_merges(hub, parents, demo_bf16, tmp_path, caplog,
                                                           monkeypatch, hash_record):
    """Interrupted at half the shards, the resumed run takes up the parents' hashes where the first
    run left them: both runs together fetch the parents about once. Without that record, the
    shards it skips are fetched once more, only to hash them, and the result is the same."""
    expected = local_result(demo_bf16, tmp_path, max_shard_size="60KB")
    spec = stream_spec(tmp_path, max_shard_size="60KB", gate=False)
    real = spool_mod.fetch_spool
    shards = tmp_path / "streamed.partial" / ".slerp_state" / "shards"
    total = len(list(expected.glob("*.safetensors")))

    def network_gone_at_half(spool, role, *a, **kw):
        if spool.index >= total // 2:
            deadline = time.monotonic() + 30
            while len(list(shards.glob("*.hub.json"))) < spool.index and time.monotonic() < deadline:
                time.sleep(0.01)  # the shards before it merged and uploaded
            raise HubUnavailableError("network gone")
        return real(spool, role, *a, **kw)

    monkeypatch.setattr("slerp_plugin.stream.spool.fetch_spool", network_gone_at_half)
    with pytest.raises(HubUnavailableError, match="network gone"):
        run_merge(spec)
    assert len(list(shards.glob("*.hub.json"))) == total // 2
    if hash_record == "lost":
        (shards.parent / "parent-hashes.json").unlink()
    monkeypatch.setattr("slerp_plugin.stream.spool.fetch_spool", real)
    with caplog.at_level(logging.INFO, logger="slerp_plugin"):
        run_merge(spec)
    fetched = sum(n for path, n in hub.state.sent_by_path.items() if path.endswith(".safetensors"))
    assert_same_weights(expected, published("org/merged", tmp_path))
    weights = sum(f.stat().st_size for d in demo_bf16 for f in Path(d).glob("*.safetensors"))
    if hash_record == "kept":
        assert "hashed already, not fetched again" in caplog.text
        assert fetched <= 1.05 * weights, (fetched, weights)  # both runs, headers read twice included
    else:
        assert "hashed already" not in caplog.text
        assert 1.3 * weights < fetched <= 1.6 * weights, (fetched, weights)  # the skipped half once more


def test_bytes_fetched_but_not_merged_before_a_stop_are_not_fetched_again(hub, parents, demo_bf16, tmp_path,
                                                                          caplog, monkeypatch):
    from slerp_plugin.engine.execute import ShardMerge

    expected = local_result(demo_bf16, tmp_path, max_shard_size="60KB")
    spec = stream_spec(tmp_path, max_shard_size="60KB", gate=False)
    real = ShardMerge.run
    spool = tmp_path / "streamed.partial" / "spool"

    def merge_stops_at_the_second(self):
        if self.shard.index >= 1:
            deadline = time.monotonic() + 30
            while len(list(spool.glob("*.complete"))) < 3 and time.monotonic() < deadline:
                time.sleep(0.01)  # the fetcher has filled the spools the budget allows
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(ShardMerge, "run", merge_stops_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        run_merge(spec)
    kept = len(list(spool.glob("*.complete")))
    assert kept >= 2
    monkeypatch.setattr(ShardMerge, "run", real)
    with caplog.at_level(logging.INFO, logger="slerp_plugin"):
        run_merge(spec)
    assert f"{kept} shard(s)' parent bytes are on disk from the last run" in caplog.text
    fetched = sum(n for path, n in hub.state.sent_by_path.items() if path.endswith(".safetensors"))
    assert_same_weights(expected, published("org/merged", tmp_path))
    weights = sum(f.stat().st_size for d in demo_bf16 for f in Path(d).glob("*.safetensors"))
    assert fetched <= 1.05 * weights, (fetched, weights)


class CountingReader:
    """A parent's reader that counts its GETs and, with ``fail_at``, fails that one (the network goes)."""

    def __init__(self, reader, fail_at: int | None = None) -> None:
        self.reader, self.fail_at, self.gets, self.asked = reader, fail_at, 0, 0
        self.lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self.reader, name)

    def stream(self, name, start, stop, *a, **kw):
        with self.lock:
            self.gets += 1
            self.asked += stop - start
            fail = self.gets == self.fail_at
        if fail:
            time.sleep(0.2)  # the other pieces in flight land
            raise HubUnavailableError("network gone")
        return self.reader.stream(name, start, stop, *a, **kw)


def test_a_shard_stopped_halfway_through_its_fetch_keeps_the_pieces_it_has(hub, parents, demo_bf16, tmp_path,
                                                                           caplog, monkeypatch):
    """The pieces of a shard's spool that landed before a stop are not fetched again."""
    import dataclasses

    monkeypatch.setattr(spool_mod, "PIECE_BYTES", 8_192)
    expected = local_result(demo_bf16, tmp_path, max_shard_size="60KB")
    spec = stream_spec(tmp_path, max_shard_size="60KB", gate=False, connections=2)
    real = spool_mod.fetch_spool
    readers: dict[int, CountingReader] = {}
    size = {}

    def through(fail_at):
        def fetch(spool, role, parent, *a, **kw):
            if spool.index != 2 or role != "model_1":
                return real(spool, role, parent, *a, **kw)
            size[2] = sum(f.stop - f.start for f in spool.fetches[role])
            readers[spool.index] = CountingReader(parent.reader, fail_at)
            return real(spool, role, dataclasses.replace(parent, reader=readers[spool.index]), *a, **kw)
        return fetch

    monkeypatch.setattr(spool_mod, "fetch_spool", through(fail_at=4))
    with pytest.raises(HubUnavailableError, match="network gone"):
        run_merge(spec)
    monkeypatch.setattr(spool_mod, "fetch_spool", through(fail_at=None))
    with caplog.at_level(logging.INFO, logger="slerp_plugin"):
        run_merge(spec)
    assert "model_1-00003.bin: " in caplog.text and " kept from a stopped run" in caplog.text
    assert readers[2].asked <= size[2] - 3 * 8_192  # the pieces that had landed were not fetched again
    assert_same_weights(expected, published("org/merged", tmp_path))


def test_a_cdn_like_hub_is_read_over_several_connections_per_parent(hub, parents, demo_bf16, tmp_path,
                                                                    monkeypatch):
    """Each connection limited, a round trip per request, 302s to signed URLs, some of them expired
    by the time they are followed: the stream keeps several ranged GETs in flight per parent and
    several uploads, and publishes the same bytes."""
    monkeypatch.setattr(spool_mod, "PIECE_BYTES", 8_000)
    # each connection so slow that a shard's upload outlasts the next shard's merge, even on a busy host
    hub.state.cdn_like(per_connection=2e5, latency=0.005, redirect_ttl=60)
    hub.state.expire_redirects(3)
    hub.state.uploads_most = hub.state.in_flight_most = 0  # the parents' own upload
    expected = local_result(demo_bf16, tmp_path, max_shard_size="60KB")
    result = run_merge(stream_spec(tmp_path, gate=False, connections=3, max_shard_size="60KB"))
    assert 4 <= hub.state.in_flight_most <= 6  # both parents, three each
    # several shards uploaded at once; how many depends on how far the merge got ahead of the link
    # within the disk budget, and the budget held
    assert 2 <= hub.state.uploads_most <= UPLOADS_IN_FLIGHT
    got = published("org/merged", tmp_path)
    timings = json.loads((got / "merge_manifest.json").read_text())["timings"]
    assert result.upload.new_commit
    assert 0 < timings["stream_peak_disk_bytes"] <= timings["stream_disk_budget_bytes"]
    assert sum(1 for _, path, _ in hub.state.requests if path.startswith("/_cdn/")) > 10
    assert_same_weights(expected, got)


def test_a_shard_that_fails_its_spot_check_is_not_published(hub, parents, tmp_path, monkeypatch):
    from slerp_plugin.engine.execute import ShardMerge
    from slerp_plugin.errors import ValidationGateError
    from slerp_plugin.io.safetensors import read_header
    from slerp_plugin.stream.pipeline import spot_names

    real_run = ShardMerge.run

    def run_then_damage(self):
        outcome = real_run(self)
        if self.shard.index == 0:  # a merged value changed after the kernel wrote it
            path = self.plan.partial / self.shard.file
            checked = [i for i in read_header(path)[0] if i.name in spot_names(self.shard, seed=0)]
            with open(path, "r+b") as f:
                f.seek(checked[-1].offset)
                f.write(b"\x80\x7f")  # its first element becomes +inf (bf16)
        return outcome

    monkeypatch.setattr(ShardMerge, "run", run_then_damage)
    with pytest.raises(ValidationGateError, match="spot re-computation failed.*nothing was published"):
        run_merge(stream_spec(tmp_path))
    assert hub.state.commit_count("org/merged") == 1
    journal = tmp_path / "streamed.partial" / ".slerp_state" / "shards"
    assert not list(journal.glob("model-00001-*"))  # merged again by the next run


def test_the_command_line_contract(hub, parents, demo_bf16, tmp_path):
    from model_helpers import run_cli, seed_args

    expected = local_result(demo_bf16, tmp_path)
    pair = (f"org/parent-a@{parents[0]}", "org/parent-b@main")
    r = run_cli(seed_args(pair, "method.t=0.3", "method.stream=true", f"method.max_shard_size={SHARD}",
                          f"method.model_save_path={tmp_path / 'cli'}", "+push_to_hub=org/cli-merged"),
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "published: " in r.stdout and "merged model:" not in r.stdout
    log = r.stdout + r.stderr
    assert "spot re-computation" in log and "deleted locally" in log
    assert "HTTP Request:" not in log  # one line per range read would be thousands at 72B
    assert re.search(r"shard 1/\d+ \S+: \d+ tensors \((lerp|slerp) \d+", log), log
    assert_same_weights(expected, published("org/cli-merged", tmp_path))
    bad = run_cli(seed_args(pair, "method.t=0.3", "method.stream=true"), cwd=tmp_path)
    assert bad.returncode == 2 and "+push_to_hub=org/name" in bad.stderr.strip().splitlines()[-1]
