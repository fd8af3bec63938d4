"""Structural checks: NaN/Inf named by tensor, missing shards."""

from __future__ import annotations

from model_helpers import rewrite

from slerp_plugin.validate import validate_merge


def test_nan_is_reported_with_the_tensor_name(copy, demo_bf16):
    def poison(state):
        if "model.layers.1.mlp.up_proj.weight" in state:
            state["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    rewrite(copy, poison)
    report = validate_merge(copy, demo_bf16)
    assert not report.passed and not report.structural.passed
    assert any("model.layers.1.mlp.up_proj.weight (1 NaN/Inf)" in p for p in report.structural.problems)
    assert report.functional.status == "skipped"


def test_missing_shard_is_reported(copy, demo_bf16):
    shards = sorted(copy.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[1].unlink()
    report = validate_merge(copy, demo_bf16)
    assert not report.passed
    assert any(shards[1].name in p and "missing" in p for p in report.structural.problems)
