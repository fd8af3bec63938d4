"""A sweep's report: the best-t rule, the table, and the files written."""

from __future__ import annotations

import csv
import io
import math

from slerp_plugin.sweep.result import SweepPoint, SweepResult, best_t, relative_change
from slerp_plugin.validate.report import ModelEvaluation


def point(t, ppl, status="passed", **kw):
    return SweepPoint(t=t, perplexity=ppl, status=status, **kw)


def evaluation(ppl):
    return ModelEvaluation(perplexity=ppl, tokens=100, device="cpu", dtype="float32", mode="resident",
                           seconds=1)


def test_lowest_passing_perplexity_wins_ties_go_nearer_one_half_then_lower():
    assert best_t([point(0.1, 30), point(0.5, 25), point(0.9, 27)]) == 0.5
    assert best_t([point(0.1, 20, "failed"), point(0.5, 25), point(0.9, 27)]) == 0.5  # failed t never wins
    assert best_t([point(0.2, 25), point(0.6, 25), point(0.9, 30)]) == 0.6  # tie: nearer 0.5
    assert best_t([point(0.3, 25), point(0.7, 25 * (1 + 1e-12))]) == 0.3  # equally near: the smaller t
    assert best_t([point(0.3, 25, "failed"), point(0.7, None, "failed")]) is None


def test_relative_change_against_each_parent():
    change = relative_change(110.0, {"model_1": evaluation(100.0), "model_2": evaluation(110.0)})
    assert math.isclose(change["model_1"], 0.10) and change["model_2"] == 0.0
    assert relative_change(math.inf, {"model_1": evaluation(100.0)}) == {}


def result(best=0.5):
    points = [point(0.1, 26.0, change={"model_1": 0.04, "model_2": 0.02},
                    branch_counts={"slerp": 3, "lerp": 1}),
              point(0.5, 25.5, change={"model_1": 0.02, "model_2": 0.0}, branch_counts={"slerp": 4}),
              point(0.9, None, "failed", problems=["the merged model cannot be evaluated: boom"])]
    return SweepResult(models={"model_1": "a", "model_2": "b"},
                       parents={"model_1": evaluation(25.0), "model_2": evaluation(25.5)}, points=points,
                       best_t=best, margin=0.1, tokens=100, eval_text="the bundled text", device="cpu",
                       dtype="float32", seconds=3.0)


def test_table_marks_the_best_t_and_states_the_rule():
    lines = result().lines()
    assert lines[0].split() == ["t", "perplexity", "vs", "model_1", "vs", "model_2", "gate", "branches"]
    assert lines[2].split()[:5] == ["0.5", "25.5000", "+2.00%", "+0.00%", "passed"] and lines[2].endswith("*")
    assert "—" in lines[3] and "failed" in lines[3]
    assert "model_1 (t=0) 25.0000" in lines[4] and "+ 10%" in lines[4]
    assert lines[5].startswith("best t: 0.5 (*: the lowest perplexity among the t that pass the gate")
    assert result(None).lines()[-1] == "no t passes the gate"


def test_files_written_read_back(tmp_path):
    r = result()
    r.write(tmp_path)
    assert SweepResult.read(tmp_path) == r
    rows = list(csv.DictReader(io.StringIO((tmp_path / "sweep.csv").read_text())))
    assert [(row["t"], row["model"]) for row in rows] == [
        ("0", "model_1"), ("0.1", "merged"), ("0.5", "merged"), ("0.9", "merged"), ("1", "model_2")]
    assert rows[2]["best"] == "yes" and rows[1]["branches"] == "lerp=1;slerp=3"
    assert (tmp_path / "sweep.txt").read_text().splitlines() == r.lines()
    assert (tmp_path / "sweep.png").read_bytes().startswith(b"\x89PNG")
    assert "chosen (t=0.5)" in (tmp_path / "sweep.svg").read_text()
