"""The plan: key and shape checks, shard membership and the order tensors are read in."""

from __future__ import annotations

import pytest
import torch
from model_helpers import assert_matches_kernel, load_state, spec_for, write_model

from slerp_plugin.errors import (
    KeyMismatchError,
)
from slerp_plugin.formats.manifest import MANIFEST_NAME, Manifest
from slerp_plugin.io.hashing import sha256_file
from slerp_plugin.io.safetensors import OutputTensor
from slerp_plugin.io.writer import ShardWriter
from slerp_plugin.kernel import DEFAULT_CHUNK_ELEMENTS
from slerp_plugin.merge import plan_merge, run_merge


def test_shape_mismatch_keeps_model_1_tensor(demo_bf16, tmp_path):
    a_state, b_state = load_state(demo_bf16[0]), load_state(demo_bf16[1])
    key = "model.layers.0.mlp.up_proj.weight"
    b_state[key] = b_state[key][:-1].clone()
    b_dir = write_model(tmp_path / "b", b_state, demo_bf16[1])
    out = tmp_path / "m"
    run_merge(spec_for((demo_bf16[0], b_dir), out))
    m = load_state(out)
    assert torch.equal(m[key], a_state[key])
    man = Manifest.read(out)
    rec = next(t for t in man.tensors if t.name == key)
    assert rec.branch == "shape-kept" and man.branch_counts["shape-kept"] == 1
    assert any(key in w for w in man.warnings)


def test_key_mismatch_names_the_keys(demo_bf16, tmp_path):
    b_state = load_state(demo_bf16[1])
    b_state.pop("model.norm.weight")
    b_state["extra.weight"] = torch.zeros(2)
    b_dir = write_model(tmp_path / "b", b_state, demo_bf16[1])
    out = tmp_path / "m"
    with pytest.raises(KeyMismatchError) as e:
        run_merge(spec_for((demo_bf16[0], b_dir), out))
    msg = str(e.value)
    assert "extra.weight" in msg and "model.norm.weight" in msg and "\n" not in msg
    assert not out.exists() and not (tmp_path / "m.partial").exists()


def test_a_shard_takes_its_input_files_side_by_side(demo_bf16, tmp_path):
    plan = plan_merge(spec_for(demo_bf16, tmp_path / "m", max_shard_size="10GB"))
    (shard,) = plan.shards
    files = [j.a.file for j in shard.jobs]
    assert len(set(files)) > 2
    for f in set(files):  # every input file front to back, so its SHA-256 streams
        offsets = [j.a.offset for j in shard.jobs if j.a.file == f]
        assert offsets == sorted(offsets)
    # all files side by side, not one after the other: every file has begun before any is done
    done = min(max(i for i, g in enumerate(files) if g == f) for f in set(files))
    assert set(files[:done]) == set(files)
    # a big tensor at the front of a file (the embeddings, which the start-up read-ahead caches)
    # is not taken first: the disk reads the other files' tensors that end before it meanwhile
    names = [j.name for j in shard.jobs]
    embed = names.index("model.embed_tokens.weight")
    assert embed > 0 and set(files[:embed]) == set(files) - {shard.jobs[embed].a.file}
    # each output shard of a split merge keeps to the tensors the plain order gives it
    split = plan_merge(spec_for(demo_bf16, tmp_path / "n", max_shard_size="100KB")).shards
    order = list(plan.checkpoints["model_1"].tensors)
    names = [[j.name for j in s.jobs] for s in split]
    assert sorted(n for s in names for n in s) == sorted(order)
    assert [sorted(s, key=order.index) for s in names] == [
        order[sum(map(len, names[:i])) : sum(map(len, names[: i + 1]))] for i in range(len(names))
    ]


def test_model_2_sharded_otherwise_keeps_its_files_front_to_back(demo_bf16, tmp_path):
    a_order = list(plan_merge(spec_for(demo_bf16, tmp_path / "x")).checkpoints["model_1"].tensors)
    b_state = load_state(demo_bf16[1])
    b_dir = write_model(tmp_path / "b", {}, demo_bf16[1])
    (b_dir / "model.safetensors").unlink()
    # one file whose data lies in model_1's order (the writer keeps the order it is given)
    outputs = [OutputTensor(n, "BF16", tuple(b_state[n].shape)) for n in a_order]
    with ShardWriter(b_dir / "model.safetensors", outputs) as w:
        for n in a_order:
            w.write(b_state[n].contiguous().view(torch.uint8).numpy())
    spec = spec_for((demo_bf16[0], b_dir), tmp_path / "m", max_shard_size="10GB")
    (shard,) = plan_merge(spec).shards
    for side in ("a", "b"):
        offsets = {}
        for j in shard.jobs:
            info = getattr(j, side)
            offsets.setdefault(info.file, []).append(info.offset)
        assert all(o == sorted(o) for o in offsets.values()), side
    # model_2 is hashed from the bytes the merge reads, with the right result
    result = run_merge(spec)
    man = Manifest.model_validate_json((result.output / MANIFEST_NAME).read_text())
    files = {f.name: f.sha256 for f in man.inputs["model_2"].files}
    assert files["model.safetensors"] == sha256_file(b_dir / "model.safetensors")
    assert_matches_kernel((demo_bf16[0], b_dir), result.output, 0.3, DEFAULT_CHUNK_ELEMENTS)
