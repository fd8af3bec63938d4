"""``validation.json`` (schema version 1): the checks of a merged model, their figures and the
verdict; and ``validation.txt``, the few lines a person reads first.

Fields: ``schema_version``, ``model``, ``parents``, ``created_at``, ``passed``, ``summary``,
``structural`` (``passed``, ``problems``, ``tensors``, ``bytes_scanned``), ``spot`` (``passed``,
``problems``, ``tensors``: name, method, numel, checked elements, max ulp or relative error,
mismatches), ``functional`` (``status`` passed|failed|skipped, ``skip_reason``, ``perplexity``
{merged, model_1, model_2}, ``threshold``, ``margin``, ``tokens``, ``eval_text``, ``device``,
``dtype``, ``evaluations`` {role: perplexity, tokens, device, dtype, mode, seconds, generations,
generation_note, cached}, ``generations`` [{prompt, merged, model_1, model_2}]), ``branches``
(``counts`` per branch, ``DOT_THRESHOLD``, ``window``, ``sensitive`` [{name, d, branch}]),
``timings`` (seconds per check).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from ..io.atomic import write_json_atomic

REPORT_NAME = "validation.json"
SUMMARY_NAME = "validation.txt"


class StructuralResult(BaseModel):
    passed: bool
    problems: list[str] = Field(default_factory=list)
    tensors: int = 0
    bytes_scanned: int = 0


class SpotTensor(BaseModel):
    name: str
    method: Literal["reference", "streamed", "kept"]
    numel: int
    checked: int
    max_ulp: int | None = None
    max_rel_err: float | None = None
    mismatches: int = 0
    passed: bool


class SpotResult(BaseModel):
    passed: bool
    problems: list[str] = Field(default_factory=list)
    tensors: list[SpotTensor] = Field(default_factory=list)


class Generation(BaseModel):
    prompt: str
    merged: str
    model_1: str | None = None
    model_2: str | None = None


class ModelEvaluation(BaseModel):
    """One model's perplexity on the evaluation tokens, and its completions of the prompts."""

    perplexity: float
    tokens: int
    device: str
    dtype: str
    mode: Literal["resident", "layer-streamed"] = Field(
        description="weights read once and kept, or read layer by layer as the model runs")
    seconds: float
    generations: list[str] = Field(default_factory=list)
    generation_note: str | None = Field(None, description="why there are no completions")
    cached: bool = Field(False, description="taken from the evaluation cache")


class FunctionalResult(BaseModel):
    status: Literal["passed", "failed", "skipped"]
    skip_reason: str | None = None
    perplexity: dict[str, float] = Field(default_factory=dict)
    threshold: float | None = None
    margin: float | None = None
    tokens: int = 0
    eval_text: str | None = Field(None, description="which text the perplexities are measured on")
    device: str | None = None
    dtype: str | None = None
    evaluations: dict[str, ModelEvaluation] = Field(default_factory=dict)
    generations: list[Generation] = Field(default_factory=list)
    problems: list[str] = Field(default_factory=list)


class BranchSensitiveTensor(BaseModel):
    """A tensor whose ``|d|`` lies so close to DOT_THRESHOLD that the last bits of the norms decide
    between SLERP and LERP (FusionBench's float32 norms can decide otherwise)."""

    name: str
    d: float
    branch: str


class BranchResult(BaseModel):
    """The branches the merge took, from its manifest."""

    counts: dict[str, int] = Field(default_factory=dict)
    DOT_THRESHOLD: float | None = None
    window: float = Field(description="|d| within this of DOT_THRESHOLD counts as branch-sensitive")
    sensitive: list[BranchSensitiveTensor] = Field(default_factory=list)


class ValidationReport(BaseModel):
    """``validation.json``; see the module docstring for the fields."""

    schema_version: Literal[1] = 1
    model: str
    parents: list[str]
    created_at: str
    passed: bool
    summary: str
    structural: StructuralResult
    spot: SpotResult | None = None
    functional: FunctionalResult
    branches: BranchResult | None = None
    timings: dict[str, float] = Field(default_factory=dict)

    @classmethod
    def read(cls, folder: Path | str) -> ValidationReport:
        return cls.model_validate_json((Path(folder) / REPORT_NAME).read_text())


def summarise(report: ValidationReport) -> str:
    """A few lines a person reads first."""
    lines = [f"{'PASSED' if report.passed else 'FAILED'}: {report.model}"]
    s = report.structural
    lines.append(f"structural: {'ok' if s.passed else 'FAILED'} ({s.tensors} tensors, "
                 f"{s.bytes_scanned / 1e6:.1f} MB scanned for NaN/Inf)")
    lines += [f"  - {p}" for p in s.problems]
    if report.spot is not None:
        sp = report.spot
        lines.append(f"spot re-computation: {'ok' if sp.passed else 'FAILED'} ({len(sp.tensors)} tensors)")
        lines += [f"  - {p}" for p in sp.problems]
    lines += _functional_lines(report.functional)
    b = report.branches
    if b is not None and b.counts:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(b.counts.items()))
        lines.append(f"branches: {counts}; {len(b.sensitive)} branch-sensitive tensor(s) "
                     f"(|d| within {b.window:g} of DOT_THRESHOLD {b.DOT_THRESHOLD:g})")
        lines += [f"  - {s.name}: d={s.d:.9g} ({s.branch})" for s in b.sensitive[:10]]
        if len(b.sensitive) > 10:
            lines.append(f"  - … {len(b.sensitive) - 10} more in validation.json")
    return "\n".join(lines)


def _functional_lines(f: FunctionalResult) -> list[str]:
    if f.status == "skipped":
        return [f"functional: SKIPPED ({f.skip_reason})"]
    verdict = "ok" if f.status == "passed" else "FAILED"
    ppl = f.perplexity
    if not ({"merged", "model_1", "model_2"} <= ppl.keys() and f.threshold is not None):
        return [f"functional: {verdict}", *(f"  - {p}" for p in f.problems)]
    text = f" of {f.eval_text}" if f.eval_text else ""
    lines = [f"functional: {verdict}: perplexity merged {ppl['merged']:.3f}, model_1 {ppl['model_1']:.3f}, "
             f"model_2 {ppl['model_2']:.3f} on {f.tokens} tokens{text} (gate ≤ {f.threshold:.3f})"]
    lines += [f"  - {p}" for p in f.problems]
    for role, ev in f.evaluations.items():
        how = "from the cache" if ev.cached else f"{ev.seconds:.1f} s"
        lines.append(f"  {role}: {ev.device}, {ev.dtype}, {ev.mode}, {how}")
    notes = {ev.generation_note for ev in f.evaluations.values() if ev.generation_note}
    lines += [f"  {note}" for note in sorted(notes)]
    return lines


def write_report(report: ValidationReport, folder: Path | str | None = None) -> Path:
    """Write ``validation.json`` and ``validation.txt`` into ``folder`` (default: the model)."""
    folder = Path(folder or report.model)
    path = write_json_atomic(folder / REPORT_NAME, json.loads(report.model_dump_json()))
    (folder / SUMMARY_NAME).write_text(report.summary + "\n")
    return path
