"""Branch-sensitive tensors: those whose |d| lies within 1e-5 of DOT_THRESHOLD."""

from __future__ import annotations

from slerp_plugin.formats.manifest import Manifest, OutputRecord, TensorRecord
from slerp_plugin.validate.branches import branch_result


def manifest(threshold: float, ds: dict[str, float | str | None]) -> Manifest:
    tensors = [TensorRecord(name=n, shape=[2], dtype="BF16", shard="m.safetensors",
                            branch="lerp" if isinstance(d, float) and abs(d) > threshold else "slerp", d=d)
               for n, d in ds.items()]
    return Manifest(tool={}, created_at="", spec={"t": 0.5, "DOT_THRESHOLD": threshold}, inputs={},
                    output=OutputRecord(shards=[], total_size=0, dtypes={}), tensors=tensors,
                    branch_counts={"lerp": 2, "slerp": 3})


def test_tensors_near_the_threshold_are_listed_closest_first():
    ds = {"far": 0.99, "above": 0.999995, "below": 0.99997, "closest": 0.999989, "anti": -0.999992,
          "nan": "nan", "kept": None}
    result = branch_result(manifest(0.99999, ds))
    assert [s.name for s in result.sensitive] == ["closest", "anti", "above"]
    assert result.sensitive[0].branch == "slerp" and result.counts == {"lerp": 2, "slerp": 3}
    assert result.DOT_THRESHOLD == 0.99999 and result.window == 1e-5


def test_a_merge_s_report_lists_its_branches(merged, demo_bf16):
    from slerp_plugin.validate import validate_merge

    report = validate_merge(merged, demo_bf16, skip_functional="branches only")
    assert report.branches is not None and sum(report.branches.counts.values()) == report.structural.tensors
    counts = ", ".join(f"{k} {v}" for k, v in sorted(report.branches.counts.items()))
    assert f"branches: {counts}" in report.summary
