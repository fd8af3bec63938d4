"""The start-up read-ahead: what it reads, hashes and reports, and that merges using it are unchanged."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from safetensors.torch import load_file

from slerp_plugin.cli import process
from slerp_plugin.cli.main import main
from slerp_plugin.formats.manifest import Manifest
from slerp_plugin.io import prefetch
from slerp_plugin.io.hashing import sha256_file
from slerp_plugin.io.reader import TensorReader


@pytest.fixture(autouse=True)
def _fresh(tmp_path, monkeypatch):
    # no input checksums cached by other tests: every weights file is to be hashed
    monkeypatch.setenv("SLERP_PLUGIN_CACHE", str(tmp_path / "checksums"))


def weights(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def test_weight_files_follow_the_index_order(tmp_path):
    for name in ("b.safetensors", "a.safetensors"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w1": "b.safetensors", "w2": "a.safetensors", "w3": "b.safetensors"}}))
    assert prefetch.weight_files(tmp_path) == [tmp_path / "b.safetensors", tmp_path / "a.safetensors"]
    (tmp_path / "model.safetensors.index.json").write_text("not json")
    assert prefetch.weight_files(tmp_path) == []  # unreadable index: nothing (the merge reports it)
    single = tmp_path / "single"
    single.mkdir()
    (single / "model.safetensors").write_bytes(b"x")
    assert prefetch.weight_files(single) == [single / "model.safetensors"]
    assert prefetch.weight_files(tmp_path / "missing") == []


def test_reads_hashes_and_covers_both_models(demo_bf16):
    from slerp_plugin.io.hashing import cached_sha256

    cached = weights(demo_bf16[1])[-1]
    cached_sha256(cached)  # a file whose checksum is known is read but not hashed again
    stopped = []
    p = prefetch.start(demo_bf16, budget=1 << 30, on_stop=lambda: stopped.append(True))
    assert p is not None and p.wait(timeout=60)
    files = [f for folder in demo_bf16 for f in weights(folder)]
    assert p.bytes_read == sum(f.stat().st_size for f in files)
    for f in files:
        assert p.covers(f, 0, f.stat().st_size)
        assert not p.covers(f, 0, f.stat().st_size + 1)
    assert not stopped
    hashers = p.take_hashers()
    assert stopped == [True]  # once, by the first stop
    p.stop()
    assert stopped == [True]
    assert os.path.realpath(cached) not in hashers
    for f in files:
        if f == cached:
            continue
        hasher = hashers[os.path.realpath(f)]
        assert hasher.pos == f.stat().st_size  # hashed while reading: nothing left for hexdigest
        assert hasher.hexdigest() == sha256_file(f)


def test_budget_bounds_what_is_read(demo_bf16):
    p = prefetch.start(demo_bf16, budget=1)  # one request: the first weights file of model_1
    assert p is not None and p.wait(timeout=60)
    first = prefetch.weight_files(demo_bf16[0])[0]
    assert p.bytes_read == first.stat().st_size
    assert p.covers(first, 0, first.stat().st_size)
    assert not any(p.covers(f, 0, 1) for f in weights(demo_bf16[1]))
    hashers = p.take_hashers()
    for f in weights(demo_bf16[1]):  # not read yet: hexdigest reads the file itself
        assert hashers[os.path.realpath(f)].hexdigest() == sha256_file(f)


def test_nothing_to_read_ahead(tmp_path):
    assert prefetch.start(["org/not-a-folder", tmp_path]) is None


def test_covered_ranges_are_read_from_the_page_cache(demo_bf16):
    from slerp_plugin.io.direct import aligned_empty
    from slerp_plugin.io.reader import aligned_capacity
    from slerp_plugin.io.safetensors import Checkpoint

    ckpt = Checkpoint.open(demo_bf16[0])
    p = prefetch.start([demo_bf16[0]], budget=1 << 30)
    assert p.wait(timeout=60)
    with TensorReader(direct=True, cached=p.covers) as reader:
        for info in list(ckpt.tensors.values())[:20]:
            buf = aligned_empty(aligned_capacity(info.nbytes))
            skew = reader.read_aligned(info, 0, info.nbytes, buf)
            assert skew == 0  # copied from the page cache, not read by a direct (aligned) read
            with open(info.file, "rb") as f:
                f.seek(info.offset)
                assert buf[: info.nbytes].numpy().tobytes() == f.read(info.nbytes)


def write_cfg(path: Path, a: Path, b: Path) -> Path:
    path.write_text(f"merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {a}\n  - model: {b}\n"
                    "parameters:\n  t: 0.4\ndtype: bfloat16\n")
    return path


def test_cli_merge_with_read_ahead_equals_merge_without(demo_bf16, tmp_path, monkeypatch):
    cfg = write_cfg(tmp_path / "cfg.yml", *demo_bf16)
    taken = []
    take = prefetch.Prefetch.take_hashers

    def spy(self):  # let the read-ahead finish first: the merge then reads only from the page cache
        assert self.wait(timeout=60)
        taken.append(self)
        return take(self)

    monkeypatch.setattr(prefetch.Prefetch, "take_hashers", spy)
    assert main(["mergekit", str(cfg), str(tmp_path / "with")]) == 0
    assert len(taken) == 1 and taken[0].bytes_read > 0
    assert not taken[0]._thread.is_alive()  # stopped once the command is done
    monkeypatch.setattr(process, "start", lambda *a, **k: None)
    assert main(["mergekit", str(cfg), str(tmp_path / "without")]) == 0
    with_ = load_file(tmp_path / "with" / "model.safetensors")
    without = load_file(tmp_path / "without" / "model.safetensors")
    assert with_.keys() == without.keys() and all(with_[k].equal(without[k]) for k in with_)
    manifest = Manifest.read(tmp_path / "with")
    for role, folder in zip(("model_1", "model_2"), demo_bf16, strict=True):
        files = {f.name: f.sha256 for f in manifest.inputs[role].files}
        for f in weights(folder):
            assert files[f.name] == sha256_file(f)


def test_requests_respect_the_device_read_ahead_limit(demo_bf16, monkeypatch, tmp_path):
    assert prefetch.MIN_REQUEST <= prefetch.readahead_limit(weights(demo_bf16[0])[0]) <= prefetch.STEP
    assert prefetch.readahead_limit(tmp_path / "missing") == prefetch.DEFAULT_REQUEST
    calls = []
    fadvise = os.posix_fadvise

    def spy(fd, offset, length, advice):
        if advice == os.POSIX_FADV_WILLNEED:
            calls.append(length)
        return fadvise(fd, offset, length, advice)

    monkeypatch.setattr(prefetch, "readahead_limit", lambda path: 8192)
    monkeypatch.setattr(os, "posix_fadvise", spy)
    p = prefetch.start(demo_bf16, budget=1 << 30)
    assert p.wait(timeout=60)
    files = [f for folder in demo_bf16 for f in weights(folder)]
    assert p.bytes_read == sum(f.stat().st_size for f in files)
    weight_calls = calls[len(calls) - sum(-(-f.stat().st_size // 8192) for f in files):]
    assert weight_calls and max(weight_calls) <= 8192
    hashers = p.take_hashers()
    assert all(hashers[os.path.realpath(f)].hexdigest() == sha256_file(f) for f in files)
