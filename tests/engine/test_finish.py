"""Finishing a merge: index, configs, manifest, model card; several workers, one finalize."""

from __future__ import annotations

import json

import pytest
import torch
from model_helpers import assert_matches_kernel, folder_bytes, load_state, read_json, spec_for

from slerp_plugin.engine import finalize, merge_shards
from slerp_plugin.errors import (
    OutputWriteError,
)
from slerp_plugin.formats.manifest import MANIFEST_NAME, Manifest
from slerp_plugin.formats.modelcard import parse_front_matter
from slerp_plugin.io.hashing import sha256_file
from slerp_plugin.kernel import DEFAULT_CHUNK_ELEMENTS
from slerp_plugin.merge import plan_merge, run_merge


def test_manifest_and_model_card(demo_bf16, tmp_path):
    out = tmp_path / "m"
    run_merge(spec_for(demo_bf16, out))
    man = Manifest.read(out)
    assert man.spec["t"] == 0.3 and man.spec["DOT_THRESHOLD"] == 0.9995
    for role in ("model_1", "model_2"):
        files = {f.name: f for f in man.inputs[role].files}
        assert "config.json" in files and "model.safetensors.index.json" in files
        for name, f in files.items():
            assert f.sha256 == sha256_file(demo_bf16[0 if role == "model_1" else 1] / name)
    assert {f.name for f in man.inputs["tokenizer"].files} >= {"tokenizer.json"}
    for shard in man.output.shards:
        assert sha256_file(out / shard.file) == shard.sha256
    assert sum(man.branch_counts.values()) == len(man.tensors) == len(load_state(out))
    assert man.branch_counts["lerp"] >= 1  # identical norm weights
    assert man.branch_counts["slerp"] >= 1
    norm = next(t for t in man.tensors if t.name.endswith("input_layernorm.weight"))
    assert norm.branch == "lerp" and norm.d == pytest.approx(1.0)
    assert {"torch", "safetensors", "slerp_plugin", "python"} <= set(man.versions)
    assert man.timings["merge_s"] >= 0 and man.timings["bytes_written"] > 0
    card = (out / "README.md").read_text()
    front = parse_front_matter(card)
    assert front["base_model"] == [str(demo_bf16[0]), str(demo_bf16[1])]
    assert {"merge", "slerp"} <= set(front["tags"]) and front["library_name"] == "transformers"
    assert "| t | 0.3 |" in card and "DOT_THRESHOLD" in card
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file()
    assert not (out / ".slerp_state").exists()


def test_workers_merge_disjoint_shards_then_finalize(demo_bf16, tmp_path):
    out = tmp_path / "m"
    spec = spec_for(demo_bf16, out, max_shard_size="100KB")
    plan = plan_merge(spec)
    n = len(plan.shards)
    assert n >= 3
    merge_shards(plan, list(range(0, n, 2)))
    with pytest.raises(OutputWriteError, match="not merged yet"):
        finalize(plan)
    assert not out.exists()
    merge_shards(plan_merge(spec), list(range(1, n, 2)))  # a second "worker" with its own plan
    finalize(plan)
    ref = tmp_path / "ref"
    run_merge(spec_for(demo_bf16, ref, max_shard_size="100KB"))
    got, want = folder_bytes(out), folder_bytes(ref)
    assert {k: v for k, v in got.items() if k != MANIFEST_NAME} == {
        k: v for k, v in want.items() if k != MANIFEST_NAME
    }


def test_index_lists_every_tensor_once(demo_bf16, tmp_path):
    out = tmp_path / "m"
    run_merge(spec_for(demo_bf16, out, max_shard_size="100KB"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    state = load_state(out)
    assert set(index["weight_map"]) == set(state)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())


def test_dtype_override_and_config(demo_bf16, tmp_path):
    out = tmp_path / "m"
    run_merge(spec_for(demo_bf16, out, dtype="float32"))
    state = load_state(out)
    assert {t.dtype for t in state.values()} == {torch.float32}
    assert read_json(out / "config.json")["dtype"] == "float32"
    assert_matches_kernel(demo_bf16, out, 0.3, DEFAULT_CHUNK_ELEMENTS, out_dtype=torch.float32)
