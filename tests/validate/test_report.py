"""The validation report: its JSON form, the summary a person reads, both files written."""

from __future__ import annotations

import json

from slerp_plugin.validate.report import (
    REPORT_NAME,
    SUMMARY_NAME,
    BranchResult,
    BranchSensitiveTensor,
    FunctionalResult,
    ModelEvaluation,
    SpotResult,
    StructuralResult,
    ValidationReport,
    summarise,
    write_report,
)


def evaluation(ppl: float, **kw) -> ModelEvaluation:
    return ModelEvaluation(perplexity=ppl, tokens=64, device="cpu", dtype="float32", mode="resident",
                           seconds=1.25, **kw)


def report(passed=True) -> ValidationReport:
    functional = FunctionalResult(
        status="passed" if passed else "failed", tokens=64, threshold=600.0, margin=0.1,
        eval_text="the bundled text",
        perplexity={"merged": 500.0, "model_1": 520.0, "model_2": 545.5},
        evaluations={"model_1": evaluation(520.0, cached=True), "model_2": evaluation(545.5, cached=True),
                     "merged": evaluation(500.0)},
        problems=[] if passed else ["merged perplexity too high"])
    branches = BranchResult(counts={"slerp": 2, "lerp": 1}, DOT_THRESHOLD=0.99999, window=1e-5,
                            sensitive=[BranchSensitiveTensor(name="w", d=0.999992, branch="slerp")])
    r = ValidationReport(model="/out/m", parents=["/a", "/b"], created_at="2026-12-01T00:00:00+00:00",
                         passed=passed, summary="", structural=StructuralResult(passed=True, tensors=3),
                         spot=SpotResult(passed=True), functional=functional, branches=branches)
    r.summary = summarise(r)
    return r


def test_summary_says_the_verdict_and_the_figures():
    text = report().summary
    assert text.startswith("PASSED: /out/m")
    assert ("perplexity merged 500.000, model_1 520.000, model_2 545.500 on 64 tokens of the bundled text "
            "(gate ≤ 600.000)") in text
    assert "  model_1: cpu, float32, resident, from the cache" in text
    assert "  merged: cpu, float32, resident, 1.2 s" in text
    assert ("branches: lerp 1, slerp 2; 1 branch-sensitive tensor(s) "
            "(|d| within 1e-05 of DOT_THRESHOLD 0.99999)") in text
    assert "  - w: d=0.999992 (slerp)" in text
    failed = report(passed=False).summary
    assert failed.startswith("FAILED") and "  - merged perplexity too high" in failed
    skipped = ValidationReport(model="m", parents=[], created_at="", passed=True, summary="",
                               structural=StructuralResult(passed=True),
                               functional=FunctionalResult(status="skipped", skip_reason="too big here"))
    assert "functional: SKIPPED (too big here)" in summarise(skipped)


def test_written_as_json_and_text_and_read_back(tmp_path):
    r = report()
    path = write_report(r, tmp_path)
    assert path == tmp_path / REPORT_NAME and json.loads(path.read_text())["passed"] is True
    assert (tmp_path / SUMMARY_NAME).read_text() == r.summary + "\n"
    assert ValidationReport.read(tmp_path) == r
