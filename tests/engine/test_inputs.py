"""Input checksums of a merge: streamed from its reads, known ones not recomputed."""

from __future__ import annotations

from model_helpers import spec_for

from slerp_plugin.engine import InputHashes, merge_shards
from slerp_plugin.io.hashing import has_cached_sha256, sha256_file
from slerp_plugin.io.model_files import ResolvedModel
from slerp_plugin.merge import plan_merge


def test_hashes_stream_from_the_merge_and_cover_every_input_file(demo_bf16, tmp_path, monkeypatch):
    monkeypatch.setenv("SLERP_PLUGIN_CACHE", str(tmp_path / "cache"))  # nothing known yet
    plan = plan_merge(spec_for(demo_bf16, tmp_path / "m"))
    hashes = InputHashes.start(plan)
    weights = [f for ck in plan.checkpoints.values() for f in ck.files]
    assert set(hashes.hashers) == set(weights)
    merge_shards(plan, hashes=hashes)
    assert all(hashes.get(f).pos == f.stat().st_size for f in weights)  # read front to back
    done = hashes.finish()
    assert {p.name for p in done} >= {"config.json", "tokenizer.json", weights[0].name}
    assert all(done[f] == sha256_file(f) for f in done)
    assert all(has_cached_sha256(f) for f in weights)  # remembered for the next run
    again = InputHashes.start(plan_merge(spec_for(demo_bf16, tmp_path / "n")))
    assert again.hashers == {}


def test_checksums_the_hub_gave_are_not_recomputed(demo_bf16, tmp_path):
    a, b = demo_bf16
    known = {f: "f" * 64 for f in a.glob("*.safetensors")}
    resolved = {"model_1": ResolvedModel(a.resolve(), "c" * 40, known), "model_2": ResolvedModel(b.resolve())}
    plan = plan_merge(spec_for(demo_bf16, tmp_path / "m"), resolved)
    hashes = InputHashes.start(plan)
    assert not set(hashes.hashers) & set(known)
    assert not set(hashes.finish()) & set(known)
