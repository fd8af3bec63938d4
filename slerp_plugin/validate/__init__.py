"""Validation of a merged model: structure, spot re-computation, perplexity against the parents.

:func:`validate_merge` returns a :class:`~.report.ValidationReport` and
:func:`~.report.write_report` writes ``validation.json`` and ``validation.txt``. The gate passes
only if every enabled check passes: structural (:mod:`.structural`), spot re-computation
(:mod:`.spot`) and the functional perplexity gate (:mod:`.functional`). The functional check is
skipped only when asked, with the reason in the report.
"""

from .functional import default_eval_text
from .gate import validate_merge
from .report import ValidationReport, summarise, write_report
from .spot import ulp_distance

__all__ = [
    "ValidationReport", "default_eval_text", "summarise", "ulp_distance", "validate_merge", "write_report",
]
