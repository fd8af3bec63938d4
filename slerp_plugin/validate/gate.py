"""The gate: every check of a merged model run in order, and the verdict."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

from ..engine.plan import num_layers, plan_jobs
from ..errors import CheckpointError, ConfigError, ValidationInputError, first_line
from ..formats.manifest import MANIFEST_NAME, Manifest, OutputRecord, TensorRecord
from ..io.safetensors import Checkpoint
from ..spec import MergeSpec
from .branches import branch_result
from .cache import EvaluationCache
from .functional import EvalSettings, functional_check
from .report import FunctionalResult, SpotResult, ValidationReport, summarise
from .spot import spot_check
from .structural import check_tensors, expected_tensors, load_config_and_tokenizer


def validate_merge(
    folder: Path | str,
    parents: tuple[Path | str, Path | str],
    *,
    settings: EvalSettings | None = None,
    skip_functional: str | None = None,
    margin: float = 0.10,
    spot_sample: int = 16,
    t: float | None = None,
    cache: EvaluationCache | None = None,
) -> ValidationReport:
    """Run the checks on ``folder`` (a merged model) against ``parents`` (model_1, model_2).

    The inputs are checked before any work: the merge's folder must exist, and both parents must
    be readable model folders (headers complete, files as long as they say).

    Args:
        folder: the merged model's folder.
        parents: model_1's and model_2's folders.
        settings: how the models are evaluated (default :class:`EvalSettings`: 1024 tokens of the
            bundled text).
        skip_functional: a reason to skip the perplexity gate (default: it runs).
        margin: the gate: the merge's perplexity may exceed the worse parent's by this fraction
            (default 0.10).
        spot_sample: tensors recomputed from the parents (default 16; all of a merge under 1 GiB).
        t: the merge's t, needed only without a manifest in ``folder`` (DOT_THRESHOLD and epsilon
            then take their defaults).
        cache: where parents' evaluations are taken from and stored (default: not cached).

    Returns:
        The report (``passed``, each check's result, perplexities, timings); write it with
        :func:`~slerp_plugin.validate.write_report`.

    Raises:
        ValidationInputError: the merge or a parent cannot be read or evaluated, or the merge's
            manifest is unreadable (nothing is judged, no report is made).
        ConfigError: no manifest and no ``t``.
    """
    folder = Path(folder)
    p1, p2 = Path(parents[0]), Path(parents[1])
    _check_inputs(folder, (p1, p2))
    manifest = _manifest_or_spec(folder, (p1, p2), t)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    structural = check_tensors(folder, expected_tensors(folder, manifest, p1))
    tokenizer, problem = load_config_and_tokenizer(folder)
    if problem:
        structural = structural.model_copy(
            update={"passed": False, "problems": [*structural.problems, problem]})
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
        functional = functional_check(folder, (p1, p2), settings=settings or EvalSettings(), margin=margin,
                                      cache=cache, tokenizer=tokenizer)
        timings["functional_s"] = round(time.perf_counter() - t0, 3)

    passed = structural.passed and spot is not None and spot.passed and functional.status != "failed"
    report = ValidationReport(
        model=str(folder), parents=[str(p1), str(p2)],
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        passed=passed, summary="", structural=structural, spot=spot, functional=functional,
        branches=branch_result(manifest), timings=timings,
    )
    report.summary = summarise(report)
    return report


def _check_inputs(folder: Path, parents: tuple[Path, Path]) -> None:
    if not folder.is_dir():
        raise ValidationInputError(f"the merged model {folder} is not a folder", path=folder)
    for role, parent in zip(("model_1", "model_2"), parents, strict=True):
        try:
            Checkpoint.open(parent)
        except CheckpointError as e:
            raise ValidationInputError(f"{role}: {e.message}", path=parent) from e


def _manifest_or_spec(folder: Path, parents: tuple[Path, Path], t: float | None) -> Manifest:
    try:
        return Manifest.read(folder)
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as e:
        raise ValidationInputError(f"{folder / MANIFEST_NAME}: unreadable ({first_line(e)})",
                                   path=folder / MANIFEST_NAME) from e
    if t is None:
        raise ConfigError(f"{folder} has no {MANIFEST_NAME}; pass --t (the t it was merged with)",
                          path=folder)
    # Without a manifest: the plan is model_1's tensors, merged with this t.
    spec = MergeSpec.build(model_1=str(parents[0]), model_2=str(parents[1]), t=t, output=str(folder))
    c1, c2 = Checkpoint.open(parents[0]), Checkpoint.open(parents[1])
    jobs, _ = plan_jobs(spec, c1, c2, num_layers(parents[0]))
    tensors = [TensorRecord(name=j.name, shape=list(j.a.shape), dtype=j.out_dtype, shard="",
                            branch="shape-kept" if j.action == "keep" else "slerp", t=j.t) for j in jobs]
    return Manifest(tool={}, created_at="", spec=spec.model_dump(mode="json"), inputs={},
                    output=OutputRecord(shards=[], total_size=sum(j.output.nbytes for j in jobs), dtypes={}),
                    tensors=tensors, branch_counts={})
