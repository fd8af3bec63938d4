"""The manifest: derived counts, JSON round trip, unknown fields refused, inputs described."""

from __future__ import annotations

import hashlib

import pytest
from pydantic import ValidationError

from slerp_plugin.formats.manifest import (
    MANIFEST_NAME,
    InputRecord,
    Manifest,
    ShardRecord,
    TensorRecord,
    describe_input,
)
from slerp_plugin.spec import ModelRef


def sample(tmp_path) -> Manifest:
    tensors = [TensorRecord(name="a", shape=[2, 2], dtype="BF16", shard="m.safetensors", branch="slerp",
                            t=0.3, d=0.5, s0=0.7, s1=0.3),
               TensorRecord(name="b", shape=[2], dtype="F32", shard="m.safetensors", branch="lerp", t=0.3),
               TensorRecord(name="c", shape=[2], dtype="BF16", shard="m.safetensors", branch="lerp", t=0.3)]
    inputs = {r: InputRecord(ref=f"/models/{r}", path=f"/models/{r}")
              for r in ("model_1", "model_2", "tokenizer")}
    return Manifest.create(spec={"t": 0.3}, inputs=inputs,
                           shards=[ShardRecord(file="m.safetensors", size=100, sha256="0" * 64, tensors=3)],
                           total_size=20, tensors=tensors, timings={"merge_s": 1.0}, plan_fingerprint="f")


def test_counts_and_versions_are_derived(tmp_path):
    m = sample(tmp_path)
    assert m.branch_counts == {"slerp": 1, "lerp": 2} and m.output.dtypes == {"BF16": 2, "F32": 1}
    assert m.tool["name"] == "slerp_plugin" and "torch" in m.versions and m.created_at.endswith("+00:00")


def test_round_trip_through_the_file(tmp_path):
    m = sample(tmp_path)
    assert m.write(tmp_path).name == MANIFEST_NAME
    assert Manifest.read(tmp_path) == m


def test_unknown_fields_are_refused(tmp_path):
    doc = sample(tmp_path).model_dump(mode="json") | {"surprise": 1}
    with pytest.raises(ValidationError, match="surprise"):
        Manifest.model_validate(doc)


def test_describe_input_lists_sizes_and_checksums(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    record = describe_input(ModelRef(ref="org/x", revision="v1"), tmp_path, [tmp_path / "config.json"])
    assert (record.ref, record.revision, record.path) == ("org/x", "v1", str(tmp_path))
    assert record.files[0].name == "config.json" and record.files[0].size == 2
    assert record.files[0].sha256 == hashlib.sha256(b"{}").hexdigest()
