"""Where a merge writes, and what it may replace.

The output is built in ``<output>.partial`` (see :mod:`slerp_plugin.engine.resume`) and appears at
``<output>`` by one rename when complete (:func:`publish`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import OutputExistsError
from ..io.atomic import fsync_dir
from ..spec import MergeSpec

if TYPE_CHECKING:
    from .plan import MergePlan


def check_output(spec: MergeSpec, paths: Mapping[str, Path]) -> None:
    """Refuse an output that overlaps an input folder, or that exists and may not be replaced.

    Raises:
        OutputExistsError: with the path and what to do.
    """
    out = Path(spec.output).resolve()
    for role, p in paths.items():
        if out == p or p.is_relative_to(out) or out.is_relative_to(p):
            raise OutputExistsError(f"output {out} overlaps the {role} folder {p}; choose another path",
                                    path=out)
    if out.exists() and not spec.overwrite:
        if not out.is_dir() or any(out.iterdir()):
            raise OutputExistsError(
                f"output {out} already exists; choose another model_save_path or set overwrite=true", path=out
            )


def publish(plan: MergePlan) -> None:
    """Move the finished ``<output>.partial`` to ``<output>`` (replacing an earlier output only with
    ``overwrite``: moved aside first, deleted after the rename).

    Raises:
        OutputExistsError: ``<output>`` appeared during the merge and may not be replaced.
    """
    out, partial = plan.output, plan.partial
    aside = None
    if out.exists():
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        elif plan.spec.overwrite:
            aside = out.with_name(f"{out.name}.replaced-{os.getpid()}")
            os.replace(out, aside)
        else:
            raise OutputExistsError(f"output {out} appeared during the merge; left the result in {partial}",
                                    path=out)
    os.replace(partial, out)
    fsync_dir(out.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
