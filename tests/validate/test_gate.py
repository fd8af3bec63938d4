"""Validation: a correct merge passes; broken outputs fail with a message naming the problem."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from model_helpers import load_state, write_model
from safetensors.torch import load_file, save_file

from slerp_plugin.merge import run_merge
from slerp_plugin.spec import MergeSpec
from slerp_plugin.errors import ValidationInputError
from slerp_plugin.validate import ValidationReport, validate_merge, write_report
from slerp_plugin.validate.report import REPORT_NAME, SUMMARY_NAME


@pytest.fixture(scope="module")
def merged(demo_bf16, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("val") / "merged"
    run_merge(MergeSpec(model_1=str(demo_bf16[0]), model_2=str(demo_bf16[1]), t=0.4, output=str(out),
                        max_shard_size="120KB"))
    return out


@pytest.fixture
def copy(merged, tmp_path) -> Path:
    return Path(shutil.copytree(merged, tmp_path / "m"))


def rewrite(folder: Path, fn) -> None:
    """Apply ``fn(state)`` to the tensors of every shard, in place (shard layout kept)."""
    for shard in sorted(folder.glob("*.safetensors")):
        state = load_file(shard)
        fn(state)
        save_file(state, shard, metadata={"format": "pt"})


def test_correct_merge_passes(merged, demo_bf16, tmp_path):
    report = validate_merge(merged, demo_bf16)
    assert report.passed, report.summary
    assert report.structural.tensors == len(load_state(merged))
    assert report.spot is not None and len(report.spot.tensors) == report.structural.tensors
    assert all(t.passed and (t.max_ulp or 0) <= 1 for t in report.spot.tensors)
    f = report.functional
    assert f.status == "passed" and set(f.perplexity) == {"merged", "model_1", "model_2"}
    assert f.tokens > 100 and len(f.generations) == 3 and f.threshold > f.perplexity["merged"]
    path = write_report(report, tmp_path)
    again = ValidationReport.model_validate_json(path.read_text())
    assert again == report and json.loads(path.read_text())["schema_version"] == 1
    assert (tmp_path / SUMMARY_NAME).read_text().startswith("PASSED")


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


def test_swapped_tensors_are_caught_by_the_spot_check(copy, demo_bf16):
    a, b = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight"
    everything = load_state(copy)
    assert everything[a].shape == everything[b].shape

    def swap(state):
        for x, y in ((a, b), (b, a)):
            if x in state:
                state[x] = everything[y].clone()
    rewrite(copy, swap)
    report = validate_merge(copy, demo_bf16, skip_functional="testing spot checks")
    assert report.structural.passed and not report.passed
    failed = {t.name for t in report.spot.tensors if not t.passed}
    assert failed == {a, b}
    assert any(a in p and "differs from the recomputed SLERP" in p for p in report.spot.problems)


def test_weights_scaled_by_ten_are_caught(copy, demo_bf16):
    name = "model.layers.1.self_attn.v_proj.weight"

    def scale(state):
        if name in state:
            state[name] = state[name] * 10
    rewrite(copy, scale)
    report = validate_merge(copy, demo_bf16, skip_functional="testing spot checks")
    assert not report.passed
    assert [t.name for t in report.spot.tensors if not t.passed] == [name]
    assert report.functional.status == "skipped" and report.functional.skip_reason == "testing spot checks"
    assert "SKIPPED (testing spot checks)" in report.summary


def test_without_manifest_t_is_required(copy, demo_bf16):
    (copy / "merge_manifest.json").unlink()
    with pytest.raises(ValidationInputError, match="pass --t"):
        validate_merge(copy, demo_bf16)
    report = validate_merge(copy, demo_bf16, t=0.4, skip_functional="quick")
    assert report.passed, report.summary
    report = validate_merge(copy, demo_bf16, t=0.6, skip_functional="quick")
    assert not report.passed


def test_cli_exit_codes(merged, copy, demo_bf16, tmp_path):
    cli = [sys.executable, "-m", "slerp_plugin", "validate"]
    r = subprocess.run([*cli, str(merged), "--parents", *map(str, demo_bf16), "--report", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "PASSED" in r.stdout and (tmp_path / REPORT_NAME).is_file()
    rewrite(copy, lambda s: s.update({k: v * 10 for k, v in s.items() if k.endswith("down_proj.weight")}))
    r = subprocess.run([*cli, str(copy), "--parents", *map(str, demo_bf16), "--skip-functional", "fast"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 6 and "FAILED" in r.stdout
    assert ValidationReport.read(copy).passed is False
    r = subprocess.run([*cli, str(copy), "--parents", "/no/such", str(demo_bf16[1])],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and r.stderr.count("slerp-merge: error:") == 1


@pytest.mark.slow
def test_real_model_smollm2_passes_and_broken_merge_fails(tmp_path_factory):
    from slerp_plugin.demo.smollm2 import smollm2_folder

    a = smollm2_folder()
    root = tmp_path_factory.mktemp("smol")
    g = torch.Generator().manual_seed(1)
    def tuned(v):
        if v.ndim < 2:
            return v
        return v + (0.02 * v.float().std() * torch.randn(v.shape, generator=g)).to(v.dtype)

    state = {k: tuned(v) for k, v in load_state(a).items()}
    b = write_model(root / "b", state, a)
    out = root / "merged"
    run_merge(MergeSpec(model_1=str(a), model_2=str(b), t=0.5, output=str(out)))
    report = validate_merge(out, (a, b), max_tokens=512)
    assert report.passed, report.summary
    ppl = report.functional.perplexity
    assert 5 < ppl["model_1"] < 100  # a real language model on English text
    assert abs(ppl["merged"] - ppl["model_1"]) / ppl["model_1"] < 0.1
    assert all(g.merged.strip() for g in report.functional.generations)

    broken = Path(shutil.copytree(out, root / "broken"))
    rewrite(broken, lambda s: s.update({k: v * 10 for k, v in s.items()
                                        if k.endswith("mlp.down_proj.weight")}))
    report = validate_merge(broken, (a, b), max_tokens=512)
    assert not report.passed and report.functional.status == "failed"
    assert "exceeds the gate" in report.functional.problems[0]
    assert report.functional.perplexity["merged"] > report.functional.threshold


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_spot_comparison_allows_float32_rounding_where_the_terms_cancel(dtype):
    from slerp_plugin.validate.spot import _compare

    want = torch.tensor([1.0, 2.0**-12, 0.5], dtype=dtype)
    scale = torch.tensor([1.0, 64.0, 0.5], dtype=torch.float64)  # |s0·A| + |s1·B|
    three_ulps = torch.tensor([1.0, 2.0**-12 * (1 + 3 * torch.finfo(dtype).eps), 0.5], dtype=dtype)
    res = _compare("w", "reference", three_ulps, want, scale, 3)
    assert res.passed and res.max_ulp == 3 and res.mismatches == 0
    # the same three ulps on an element as large as its terms is a real difference
    bad = torch.tensor([1.0 * (1 + 3 * torch.finfo(dtype).eps), 2.0**-12, 0.5], dtype=dtype)
    res = _compare("w", "reference", bad, want, scale, 3)
    assert not res.passed and res.mismatches == 1
