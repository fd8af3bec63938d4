"""The gate: every check of a merged model run in order, and the verdict."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

from ..errors import CheckpointError, ValidationInputError
from ..formats.manifest import MANIFEST_NAME, Manifest
from ..spec import MergeSpec
from .functional import DEFAULT_PROMPTS, default_eval_text, functional_check
from .report import FunctionalResult, SpotResult, ValidationReport, summarise
from .spot import spot_check
from .structural import check_structure, expected_tensors


def validate_merge(
    folder: Path | str,
    parents: tuple[Path | str, Path | str],
    *,
    skip_functional: str | None = None,
    eval_text: str | None = None,
    prompts: list[str] | None = None,
    margin: float = 0.10,
    max_tokens: int = 1024,
    max_length: int = 512,
    spot_sample: int = 16,
    device: str = "auto",
    t: float | None = None,
) -> ValidationReport:
    """Run the checks on ``folder`` (a merged model) against ``parents`` (model_1, model_2).

    ``skip_functional`` (a reason) skips the perplexity gate. Without a manifest in ``folder``,
    ``t`` must be given (scalar; DOT_THRESHOLD and epsilon take their defaults).

    Raises:
        ValidationInputError: the checks cannot run as asked (no manifest and no t, model too large
            for the functional check).
    """
    folder = Path(folder)
    p1, p2 = Path(parents[0]), Path(parents[1])
    timings: dict[str, float] = {}
    manifest = _manifest_or_spec(folder, (p1, p2), t)

    t0 = time.perf_counter()
    expected = expected_tensors(folder, manifest, p1)
    structural, _ = check_structure(folder, expected)
    timings["structural_s"] = round(time.perf_counter() - t0, 3)

    spot = None
    if structural.passed or not any("missing" in p or "corrupt" in p for p in structural.problems):
        t0 = time.perf_counter()
        try:
            spot = spot_check(folder, (p1, p2), manifest, sample=spot_sample)
        except CheckpointError as e:
            spot = SpotResult(passed=False, problems=[str(e)])
        timings["spot_s"] = round(time.perf_counter() - t0, 3)

    if skip_functional:
        functional = FunctionalResult(status="skipped", skip_reason=skip_functional)
    elif not structural.passed:
        functional = FunctionalResult(status="skipped", skip_reason="structural checks failed")
    else:
        t0 = time.perf_counter()
        functional = functional_check(
            folder, (p1, p2), eval_text=eval_text or default_eval_text(),
            prompts=list(prompts or DEFAULT_PROMPTS), margin=margin, max_tokens=max_tokens,
            max_length=max_length, device=device,
        )
        timings["functional_s"] = round(time.perf_counter() - t0, 3)

    passed = structural.passed and (spot is None or spot.passed) and functional.status != "failed"
    if spot is None:
        passed = False
    report = ValidationReport(
        model=str(folder), parents=[str(p1), str(p2)],
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        passed=passed, summary="", structural=structural, spot=spot, functional=functional, timings=timings,
    )
    report.summary = summarise(report)
    return report


def _manifest_or_spec(folder: Path, parents: tuple[Path, Path], t: float | None) -> Manifest:
    try:
        return Manifest.read(folder)
    except FileNotFoundError:
        pass
    except ValueError as e:
        raise ValidationInputError(f"{folder / MANIFEST_NAME}: unreadable ({str(e).splitlines()[0]})",
                                   path=folder / MANIFEST_NAME) from e
    if t is None:
        raise ValidationInputError(f"{folder} has no {MANIFEST_NAME}; pass --t (the t it was merged with)")
    # Without a manifest: the plan is model_1's tensors, merged with this t.
    from ..engine import plan_merge

    spec = MergeSpec.build(model_1=str(parents[0]), model_2=str(parents[1]), t=t,
                           output=str(folder.with_name(folder.name + ".validate-plan")))
    plan = plan_merge(spec)
    from ..formats.manifest import OutputRecord, TensorRecord

    tensors = [TensorRecord(name=j.name, shape=list(j.a.shape), dtype=j.out_dtype, shard="",
                            branch="shape-kept" if j.action == "keep" else "slerp", t=j.t)
               for s in plan.shards for j in s.jobs]
    return Manifest(tool={}, created_at="", spec=spec.model_dump(mode="json"), inputs={},
                    output=OutputRecord(shards=[], total_size=plan.total_bytes, dtypes={}),
                    tensors=tensors, branch_counts={})
