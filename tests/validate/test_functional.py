"""The perplexity gate: a broken merge fails it; the real SmolLM2-135M passes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from model_helpers import load_state, rewrite, write_model

from slerp_plugin.merge import run_merge
from slerp_plugin.spec import MergeSpec
from slerp_plugin.validate import EvalSettings, validate_merge


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
    report = validate_merge(out, (a, b), settings=EvalSettings(max_tokens=512))
    assert report.passed, report.summary
    ppl = report.functional.perplexity
    assert 5 < ppl["model_1"] < 100  # a real language model on English text
    assert abs(ppl["merged"] - ppl["model_1"]) / ppl["model_1"] < 0.1
    assert all(g.merged.strip() for g in report.functional.generations)
    assert {e.mode for e in report.functional.evaluations.values()} == {"resident"}  # 135M fits 1 GiB

    broken = Path(shutil.copytree(out, root / "broken"))
    rewrite(broken, lambda s: s.update({k: v * 10 for k, v in s.items()
                                        if k.endswith("mlp.down_proj.weight")}))
    report = validate_merge(broken, (a, b), settings=EvalSettings(max_tokens=512, generation_memory=0))
    assert not report.passed and report.functional.status == "failed"
    assert "exceeds the gate" in report.functional.problems[0]
    assert report.functional.perplexity["merged"] > report.functional.threshold
    assert report.functional.evaluations["merged"].mode == "layer-streamed"
    assert report.functional.generations == [] and "no completions: the weights take" in report.summary


def test_models_over_the_generation_memory_are_streamed_without_completions(merged, demo_bf16):
    report = validate_merge(merged, demo_bf16, settings=EvalSettings(max_tokens=64, generation_memory=1000))
    f = report.functional
    assert report.passed and {e.mode for e in f.evaluations.values()} == {"layer-streamed"}
    assert f.generations == [] and all(e.generations == [] for e in f.evaluations.values())
    note = "no completions: the weights take 558.3 kB in float32, over generation_memory 1.0 kB"
    assert note in report.summary
    assert f.device == "cpu" and f.dtype == "float32" and report.timings["functional_s"] > 0
