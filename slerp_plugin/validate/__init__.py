"""Validation of a merged model: structure, spot re-computation, perplexity against the parents.

:func:`validate_merge` returns a :class:`~.report.ValidationReport` and
:func:`~.report.write_report` writes ``validation.json`` and ``validation.txt``. The gate passes
only if every enabled check passes: structural (:mod:`.structural`), spot re-computation
(:mod:`.spot`) and the functional perplexity gate (:mod:`.functional`), which evaluates models
layer by layer (:mod:`.streaming`) and reuses parents' results (:mod:`.cache`). The functional
check is skipped only when asked, with the reason in the report. The report also lists the
branch-sensitive tensors of the merge (:mod:`.branches`).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers see; at run time each name loads on first use, so that
    # reading a report (:mod:`.report`, e.g. the Airflow dashboard in every Airflow process) loads no torch
    from .cache import EvaluationCache
    from .functional import EvalSettings, default_eval_text, evaluate_parents
    from .gate import validate_merge
    from .report import ValidationReport, summarise, write_report
    from .spot import ulp_distance

_LAZY = {
    "EvaluationCache": "cache", "EvalSettings": "functional", "default_eval_text": "functional",
    "evaluate_parents": "functional", "validate_merge": "gate", "ValidationReport": "report",
    "summarise": "report", "write_report": "report", "ulp_distance": "spot",
}

__all__ = [
    "EvalSettings", "EvaluationCache", "ValidationReport", "default_eval_text", "evaluate_parents",
    "summarise", "ulp_distance", "validate_merge", "write_report",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
