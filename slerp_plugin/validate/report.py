"""``validation.json`` (schema version 1): the checks of a merged model, their figures and the
verdict; and ``validation.txt``, the few lines a person reads first.

Fields: ``schema_version``, ``model``, ``parents``, ``created_at``, ``passed``, ``summary``,
``structural`` (``passed``, ``problems``, ``tensors``, ``bytes_scanned``), ``spot`` (``passed``,
``problems``, ``tensors``: name, method, numel, checked elements, max ulp or relative error,
mismatches), ``functional`` (``status`` passed|failed|skipped, ``skip_reason``, ``perplexity``
{merged, model_1, model_2}, ``threshold``, ``margin``, ``tokens``, ``eval_text``, ``device``, ``generations``
[{prompt, merged, model_1, model_2}]), ``timings`` (seconds per check).
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


class FunctionalResult(BaseModel):
    status: Literal["passed", "failed", "skipped"]
    skip_reason: str | None = None
    perplexity: dict[str, float] = Field(default_factory=dict)
    threshold: float | None = None
    margin: float | None = None
    tokens: int = 0
    eval_text: str | None = Field(None, description="which text the perplexities are measured on")
    device: str | None = None
    generations: list[Generation] = Field(default_factory=list)
    problems: list[str] = Field(default_factory=list)


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
    f = report.functional
    if f.status == "skipped":
        lines.append(f"functional: SKIPPED ({f.skip_reason})")
    else:
        verdict = "ok" if f.status == "passed" else "FAILED"
        ppl = f.perplexity
        if {"merged", "model_1", "model_2"} <= ppl.keys() and f.threshold is not None:
            lines.append(f"functional: {verdict}: perplexity merged {ppl['merged']:.3f}, "
                         f"model_1 {ppl['model_1']:.3f}, model_2 {ppl['model_2']:.3f} on {f.tokens} tokens "
                         f"(gate ≤ {f.threshold:.3f})")
        else:
            lines.append(f"functional: {verdict}")
        lines += [f"  - {p}" for p in f.problems]
    return "\n".join(lines)


def write_report(report: ValidationReport, folder: Path | str | None = None) -> Path:
    """Write ``validation.json`` and ``validation.txt`` into ``folder`` (default: the model)."""
    folder = Path(folder or report.model)
    path = write_json_atomic(folder / REPORT_NAME, json.loads(report.model_dump_json()))
    (folder / SUMMARY_NAME).write_text(report.summary + "\n")
    return path
