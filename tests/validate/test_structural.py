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


def test_a_tokenizer_that_does_not_load_fails_the_structure_and_skips_the_gate(copy, demo_bf16):
    (copy / "tokenizer.json").write_text("{ not json")
    report = validate_merge(copy, demo_bf16)
    assert not report.passed and not report.structural.passed
    assert any(p.startswith("config/tokenizer do not load: ") for p in report.structural.problems)
    assert report.spot is not None and report.spot.passed
    assert report.functional.status == "skipped"
    assert report.functional.skip_reason == "structural checks failed"


def test_huge_finite_values_are_not_taken_for_inf(tmp_path):
    import torch
    from safetensors.torch import save_file

    from slerp_plugin.validate.structural import check_tensors

    huge = torch.full((8,), 3e38)  # finite, but their float32 sum overflows
    inf = torch.ones(8, dtype=torch.bfloat16)
    inf[2] = float("inf")
    save_file({"huge": huge, "inf": inf, "ok": torch.ones(4, dtype=torch.float16)},
              str(tmp_path / "model.safetensors"))
    expected = {"huge": ((8,), "F32"), "inf": ((8,), "BF16"), "ok": ((4,), "F16")}
    result = check_tensors(tmp_path, expected, chunk_elements=4)
    assert result.problems == ["non-finite values in 1 tensor(s): inf (1 NaN/Inf)"]
