"""Choosing t: the merge evaluated at several t in one read of the parents (:func:`run_sweep`),
the best t chosen by a stated rule, and only that merge made (:func:`merge_best`)."""

from .result import BEST_RULE, SweepPoint, SweepResult
from .runner import merge_best, run_sweep
from .values import parse_t_values

__all__ = ["BEST_RULE", "SweepPoint", "SweepResult", "merge_best", "parse_t_values", "run_sweep"]
