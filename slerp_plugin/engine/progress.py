"""The progress bar of a merge."""

from __future__ import annotations

import sys

from .plan import MergePlan


def progress_bar(plan: MergePlan, desc: str):
    """A tqdm bar of ``plan``'s output bytes labelled ``desc``, when ``show_pbar`` is set or stderr
    is a terminal; else None."""
    if not (plan.spec.show_pbar or sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=plan.total_bytes, unit="B", unit_scale=True, unit_divisor=1000, desc=desc,
                dynamic_ncols=True)
