"""Spot re-computation: swapped tensors caught; rounding where the terms cancel allowed."""

from __future__ import annotations

import pytest
import torch
from model_helpers import load_state, rewrite

from slerp_plugin.validate import validate_merge


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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_spot_comparison_allows_float32_rounding_where_the_terms_cancel(dtype):
    from slerp_plugin.validate.spot import _compare, fixed_scale

    want = torch.tensor([1.0, 2.0**-12, 0.5], dtype=dtype)
    scale = torch.tensor([1.0, 64.0, 0.5], dtype=torch.float64)  # |s0·A| + |s1·B|
    three_ulps = torch.tensor([1.0, 2.0**-12 * (1 + 3 * torch.finfo(dtype).eps), 0.5], dtype=dtype)
    res = _compare("w", "reference", three_ulps, want, fixed_scale(scale), 3)
    assert res.passed and res.max_ulp == 3 and res.mismatches == 0
    # the same three ulps on an element as large as its terms is a real difference
    bad = torch.tensor([1.0 * (1 + 3 * torch.finfo(dtype).eps), 2.0**-12, 0.5], dtype=dtype)
    res = _compare("w", "reference", bad, want, fixed_scale(scale), 3)
    assert not res.passed and res.mismatches == 1
