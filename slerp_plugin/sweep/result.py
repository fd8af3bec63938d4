"""What a sweep found: one row per t, the parents, the chosen t; written as ``sweep.json``,
``sweep.txt``, ``sweep.csv`` and the plot (``sweep.png``, ``sweep.svg``)."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from ..io.atomic import write_json_atomic
from ..validate.report import ModelEvaluation
from .plot import plot_sweep

ROLES = ("model_1", "model_2")

SWEEP_NAME = "sweep.json"
#: how the best t is chosen (reports state it)
BEST_RULE = ("the lowest perplexity among the t that pass the gate; perplexities equal to 1e-9 relative "
             "go to the t nearer 0.5, then to the smaller t")


class SweepPoint(BaseModel):
    """The merge at one t."""

    t: float
    perplexity: float | None = Field(description="of the merge at t (None: it could not be evaluated)")
    status: Literal["passed", "failed"] = Field(description="the perplexity gate of slerp-merge validate")
    problems: list[str] = Field(default_factory=list, description="why it failed")
    change: dict[str, float] = Field(default_factory=dict,
                                     description="model_1 / model_2 → perplexity / the parent's − 1")
    branch_counts: dict[str, int] = Field(default_factory=dict, description="SLERP branch → tensors")
    seconds: float = Field(0.0, description="evaluating it")


class SweepResult(BaseModel):
    """A sweep of t: each t's merge evaluated against the parents, and the t chosen by :data:`BEST_RULE`."""

    schema_version: Literal[1] = 1
    models: dict[str, str] = Field(description="model_1 / model_2 → the reference given")
    parents: dict[str, ModelEvaluation] = Field(description="model_1 / model_2 → their evaluation")
    points: list[SweepPoint] = Field(description="one per t, ascending")
    best_t: float | None = Field(description="the chosen t (None: no t passes the gate)")
    rule: str = BEST_RULE
    margin: float = Field(description="the gate's margin over the worse parent's perplexity")
    tokens: int = Field(description="evaluation tokens")
    eval_text: str = Field(description="the evaluation text's name")
    device: str
    dtype: str = Field(description="the evaluation's compute dtype")
    seconds: float = Field(description="wall time of the sweep")
    bytes_read: int = Field(0, description="bytes of the parents read")
    report: str | None = Field(None, description="the folder the sweep was written to")

    @property
    def passed(self) -> bool:
        """Whether some t passes the gate."""
        return self.best_t is not None

    def lines(self) -> list[str]:
        """The table, the parents and the choice, as printed."""
        ppl = {r: e.perplexity for r, e in self.parents.items()}
        rows = [f"{'t':>6}  {'perplexity':>12}  {'vs model_1':>10}  {'vs model_2':>10}  {'gate':6}  branches"]
        for p in self.points:
            value = f"{p.perplexity:12.4f}" if p.perplexity is not None else f"{'—':>12}"
            change = [f"{p.change[r]:+10.2%}" if r in p.change else f"{'—':>10}" for r in ROLES]
            branches = ", ".join(f"{k} {v}" for k, v in sorted(p.branch_counts.items()))
            mark = " *" if p.t == self.best_t else ""
            rows.append(f"{p.t:>6g}  {value}  {change[0]}  {change[1]}  {p.status:6}  {branches}{mark}")
        rows.append(f"parents: model_1 (t=0) {ppl['model_1']:.4f}, model_2 (t=1) {ppl['model_2']:.4f}; "
                    f"gate: at most the worse parent's + {self.margin:.0%}; {self.tokens} tokens of "
                    f"{self.eval_text}")
        if self.best_t is None:
            rows.append("no t passes the gate")
        else:
            rows.append(f"best t: {self.best_t:g} (*: {self.rule})")
        return rows

    def csv(self) -> str:
        """One row per t, with the parents as rows at t = 0 and t = 1."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["t", "model", "perplexity", "vs_model_1", "vs_model_2", "gate", "branches", "best"])
        writer.writerow([0, "model_1", self.parents["model_1"].perplexity, "", "", "", "", ""])
        for p in self.points:
            writer.writerow([p.t, "merged", "" if p.perplexity is None else p.perplexity,
                             p.change.get("model_1", ""), p.change.get("model_2", ""), p.status,
                             ";".join(f"{k}={v}" for k, v in sorted(p.branch_counts.items())),
                             "yes" if p.t == self.best_t else ""])
        writer.writerow([1, "model_2", self.parents["model_2"].perplexity, "", "", "", "", ""])
        return out.getvalue()

    def plot(self, fmt: Literal["svg", "png"]) -> bytes:
        """The plot (:func:`~.plot.plot_sweep`) of the t whose merge could be evaluated."""
        points = [(p.t, p.perplexity, p.status == "passed") for p in self.points
                  if p.perplexity is not None and math.isfinite(p.perplexity)]
        return plot_sweep(points, {r: e.perplexity for r, e in self.parents.items()}, self.best_t, fmt)

    def write(self, folder: Path) -> None:
        """Write ``sweep.json``, ``sweep.txt``, ``sweep.csv``, ``sweep.png`` and ``sweep.svg`` into
        ``folder``."""
        write_json_atomic(folder / SWEEP_NAME, self.model_dump(mode="json"))
        (folder / "sweep.txt").write_text("\n".join(self.lines()) + "\n")
        (folder / "sweep.csv").write_text(self.csv())
        for fmt in ("png", "svg"):
            (folder / f"sweep.{fmt}").write_bytes(self.plot(fmt))  # type: ignore[arg-type]

    @classmethod
    def read(cls, folder: Path | str) -> SweepResult:
        """The sweep written in ``folder``."""
        return cls.model_validate_json((Path(folder) / SWEEP_NAME).read_text())


def best_t(points: list[SweepPoint]) -> float | None:
    """The t chosen by :data:`BEST_RULE` (None: no t passes the gate)."""
    passing = [p for p in points if p.status == "passed" and p.perplexity is not None]
    if not passing:
        return None
    lowest = min(p.perplexity for p in passing)  # type: ignore[type-var]
    tied = [p for p in passing if math.isclose(p.perplexity, lowest, rel_tol=1e-9)]  # type: ignore[arg-type]
    return min(tied, key=lambda p: (round(abs(p.t - 0.5), 9), p.t)).t


def relative_change(value: float, parents: dict[str, ModelEvaluation]) -> dict[str, float]:
    """``value`` against each parent's perplexity: value / parent − 1."""
    return {role: value / ev.perplexity - 1 for role, ev in parents.items()
            if math.isfinite(value) and ev.perplexity > 0}
