"""``slerp-merge sweep``: the merge evaluated at several t in one pass, the best t chosen, and
(optionally) only that merge made.

The report folder appears whole: the sweep writes into ``<report>.partial`` (this tool's marker
inside, the work shards under ``work/``), writes the table and plot there, and renames it to
``<report>`` when done. An interrupted sweep leaves no ``<report>``; run again, it starts over. A
``<report>`` this tool wrote for the same path is replaced by a new sweep; anything else there is
refused.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from ..engine import MergeResult, plan_resolved
from ..engine.output import (
    carries_marker,
    check_partial,
    is_empty_dir,
    output_lock,
    partial_path,
    remove_ours,
    write_marker,
)
from ..engine.progress import progress_bar
from ..errors import ConfigError, OutputExistsError, OutputWriteError
from ..hub.client import is_hub_id
from ..hub.sources import resolve_inputs
from ..io.atomic import fsync_dir
from ..io.model_files import ResolvedModel
from ..spec import MergeSpec
from ..stream import open_remote
from ..validate.cache import EvaluationCache, evaluation_key
from ..validate.functional import ROLES, EvalSettings, eval_tokens, evaluate_cached, judge
from ..validate.report import ModelEvaluation
from .one_pass import OnePass, PassResult, work_shard_bytes
from .result import SweepPoint, SweepResult, best_t, relative_change
from .values import check_t_values

log = logging.getLogger(__name__)


def default_report(spec: MergeSpec) -> Path:
    """Where a sweep of ``spec`` is written by default: ``<output>-sweep`` beside the merge's output."""
    out = Path(spec.output).expanduser().resolve()
    return out.with_name(f"{out.name}-sweep")


def run_sweep(
    spec: MergeSpec,
    ts: Sequence[float],
    *,
    report: Path | str | None = None,
    settings: EvalSettings | None = None,
    margin: float | None = None,
    cache: EvaluationCache | None | Literal["default"] = "default",
    resolved: Mapping[str, ResolvedModel] | None = None,
) -> SweepResult:
    """Evaluate the merge of ``spec``'s parents at every t of ``ts`` in one read of the parents
    (nothing but one work shard per t at a time is written), judge each against the parents by the gate
    of ``slerp-merge validate``, and choose the best t (:data:`~.result.BEST_RULE`).

    Args:
        spec: the merge (its ``t`` is replaced by each of ``ts``; everything else applies).
        ts: the t values, each in [0, 1], no duplicates.
        report: the folder the table and plot go to (default: :func:`default_report`).
        settings: how the models are evaluated (default: those of ``slerp-merge validate``).
        margin: the gate's margin (default ``spec.gate_margin``).
        cache: where the parents' evaluations are taken from and stored (``"default"``: the user's
            cache; None: evaluate them again, store nothing).
        resolved: inputs already on local disk, by role (as :func:`slerp_plugin.merge.plan_merge`).

    Returns:
        The sweep; ``best_t`` is None when no t passes the gate.

    Both parents given as Hub ids (and not in ``resolved``) are read by range (nothing downloaded
    whole); otherwise they are resolved as for a merge (Hub ids downloaded, local folders as they
    are).

    Raises:
        ConfigError: a bad t list (:func:`~.values.check_t_values`).
        OutputExistsError: ``report`` holds something this tool did not write for it, or overlaps
            an input.
        OutputLockedError: another sweep writes the same report.
        ModelNotFoundError, CheckpointError, KeyMismatchError, ShapeMismatchError: as a merge.
        HubError, HubIntegrityError: a Hub parent cannot be read, or its bytes do not match the Hub's
            SHA-256.
        ValidationInputError: the tokenizer or a parent cannot be evaluated.
    """
    ts = check_t_values(ts)
    settings = settings or EvalSettings(device=spec.device)
    margin = spec.gate_margin if margin is None else margin
    cache = EvaluationCache() if cache == "default" else cache
    out = Path(report).expanduser().resolve() if report is not None else default_report(spec)
    started = time.perf_counter()
    with output_lock(out, exclusive=True, wait=False, what="slerp-merge sweep"):
        partial = _fresh_partial(out)
        work = partial / "work"
        refs = dict(zip(ROLES, (spec.model_1, spec.model_2), strict=True))
        on_hub = all(_on_hub(ref) and role not in (resolved or {}) for role, ref in refs.items())
        shard_bytes = work_shard_bytes(len(ts), on_hub, spec.disk_budget)
        spec0 = spec.model_copy(update={"t": ts[0], "output": work / f"t-{ts[0]:g}", "direct_io": False,
                                        "max_shard_size": min(spec.max_shard_size, shard_bytes),
                                        "overwrite": False, "push_to_hub": None, "stream": False})
        remote = None
        if on_hub:
            base, remote = open_remote(spec0, work / "parents", execution=True)
        else:
            base = plan_resolved(spec0, resolve_inputs(spec0, resolved), execution=True)
        tokenizer, ids = eval_tokens(base.paths["tokenizer"], settings)
        content = {r: p.content_id for r, p in remote.items()} if remote else None
        parents, keys = _known_parents(base.paths, ids, tokenizer, settings, cache, base.device.type, content)
        one = OnePass(base, ts, work, settings, ids, [r for r in ROLES if r not in parents], remote)
        bar = progress_bar(base, "sweeping")
        if bar is not None:
            bar.reset(total=base.total_bytes * len(ts))
        try:
            found = one.run(bar.update if bar else None)
        finally:
            if bar is not None:
                bar.close()
        _store(found, keys, cache, settings, one)
        result = _result(spec, found, {**parents, **found.parents}, settings, margin, ids.numel(), base,
                         time.perf_counter() - started)
        _finish(partial, out, result)
    log.info("sweep written to %s", out)
    return result


def _fresh_partial(out: Path) -> Path:
    """``<out>.partial``, new and marked (one an interrupted sweep of ``out`` left is removed).

    Raises:
        OutputExistsError: ``<out>`` or ``<out>.partial`` holds what this tool did not write for it.
    """
    if (out.exists() or out.is_symlink()) and not (is_empty_dir(out) or carries_marker(out, out, "complete")):
        raise OutputExistsError(f"sweep report {out} exists and is not a sweep slerp-merge wrote there; "
                                "choose another --report", path=out)
    partial = partial_path(out)
    check_partial(out)
    if carries_marker(partial, out, "partial") or carries_marker(partial, out, "complete"):
        log.info("removing the unfinished sweep in %s (a sweep starts over)", partial)
        remove_ours(partial)
    elif partial.exists():  # an empty or unmarked beginning that check_partial allows
        _remove_beginning(partial)
    try:
        partial.mkdir(parents=True)
        write_marker(partial, out, "partial")
    except OSError as e:
        raise OutputWriteError(f"cannot create {partial}: {e.strerror or e}", path=partial) from e
    return partial


def _remove_beginning(folder: Path) -> None:
    for entry in sorted(folder.rglob("*"), reverse=True):
        entry.rmdir() if entry.is_dir() else entry.unlink()
    folder.rmdir()


def _on_hub(ref) -> bool:
    return is_hub_id(ref.ref) and not Path(ref.ref).expanduser().is_dir()


def _known_parents(paths: dict[str, Path], ids, tokenizer, settings: EvalSettings,
                   cache: EvaluationCache | None, device_type: str, content: dict[str, str] | None
                   ) -> tuple[dict[str, ModelEvaluation], dict[str, str]]:
    """The parents' evaluations that need no pass: cached ones, and small local models evaluated
    as ``validate`` does (with completions); the cache keys of the others. ``content``: the Hub
    parents' content ids (they are evaluated in the pass unless cached)."""
    known, keys = {}, {}
    for role in ROLES:
        key = evaluation_key(paths[role], ids, settings.max_length, settings.prompts, settings.max_new_tokens,
                             device_type, settings.dtype, settings.generation_memory,
                             content=content[role] if content else None)
        found = cache.get(key) if cache is not None else None
        if found is not None:
            log.info("perplexity of %s: %.4f (from the cache)", role, found.perplexity)
            known[role] = found.model_copy(update={"cached": True})
        elif content is None and _weight_bytes(paths[role], settings) <= settings.generation_memory:
            known[role] = evaluate_cached(paths[role], ids, tokenizer, settings, cache)
        else:
            keys[role] = key
    return known, keys


def _weight_bytes(folder: Path, settings: EvalSettings) -> int:
    """Bytes the model's weights take in the compute dtype (as ``validate`` counts them)."""
    import torch

    from ..engine import resolve_device
    from ..validate.streaming import StreamedCausalLM

    dtype = None if settings.dtype == "auto" else getattr(torch, settings.dtype)
    with StreamedCausalLM(folder, resolve_device(settings.device), dtype) as model:
        return model.weight_bytes


def _store(found: PassResult, keys: dict[str, str], cache: EvaluationCache | None,
           settings: EvalSettings, one: OnePass) -> None:
    """Parents evaluated in the pass go to the cache where ``validate`` would also give no completions."""
    if cache is None:
        return
    for role, evaluation in found.parents.items():
        if one.parent_bytes[role] > settings.generation_memory:
            cache.put(keys[role], evaluation)


def _result(spec: MergeSpec, found: PassResult, parents: dict[str, ModelEvaluation], settings: EvalSettings,
            margin: float, tokens: int, base, seconds: float) -> SweepResult:
    points = []
    for m in found.merges:
        if m.evaluation is None:
            points.append(SweepPoint(t=m.t, perplexity=None, status="failed", branch_counts=m.branch_counts,
                                     problems=[f"the merged model cannot be evaluated: {m.problem}"]))
            continue
        verdict = judge({**parents, "merged": m.evaluation}, margin=margin, settings=settings, tokens=tokens)
        ppl = m.evaluation.perplexity
        points.append(SweepPoint(t=m.t, perplexity=ppl if math.isfinite(ppl) else None,
                                 status=verdict.status, problems=verdict.problems,
                                 change=relative_change(ppl, parents), branch_counts=m.branch_counts,
                                 seconds=m.evaluation.seconds))
    first = next((m.evaluation for m in found.merges if m.evaluation is not None), None)
    return SweepResult(
        models={"model_1": str(spec.model_1), "model_2": str(spec.model_2)}, parents=parents, points=points,
        best_t=best_t(points), margin=margin, tokens=tokens, eval_text=settings.text_name,
        device=str(base.device), dtype=first.dtype if first else settings.dtype, seconds=round(seconds, 3),
        bytes_read=found.bytes_read)


def _finish(partial: Path, out: Path, result: SweepResult) -> None:
    """Remove the work folder, write the report, mark it complete, and rename it to ``out``."""
    work = partial / "work"
    if work.is_dir():
        for child in sorted(work.iterdir()):
            if child.is_dir() and child.name.endswith(".partial"):
                remove_ours(child)
        for child in sorted(work.rglob("*"), reverse=True):
            child.rmdir() if child.is_dir() else child.unlink()
        work.rmdir()
    result.report = str(out)
    result.write(partial)
    write_marker(partial, out, "complete")
    if out.exists():
        if is_empty_dir(out):
            out.rmdir()
        else:
            aside = out.with_name(f"{out.name}.replaced-{os.getpid()}")
            os.replace(out, aside)
            os.replace(partial, out)
            remove_ours(aside)
            fsync_dir(out.parent)
            return
    os.replace(partial, out)
    fsync_dir(out.parent)


def merge_best(spec: MergeSpec, result: SweepResult, *, settings: EvalSettings | None = None,
               cache: EvaluationCache | None | Literal["default"] = "default") -> MergeResult:
    """Merge ``spec`` at the sweep's best t: locally (:func:`slerp_plugin.merge.run_merge`), or
    streamed to the Hub with the gate when ``spec.stream`` (:func:`slerp_plugin.stream.stream_merge`,
    its gate evaluating as the sweep did, so the parents come from the cache the sweep filled).

    Args:
        spec: the merge the sweep was run for (its ``t`` is replaced by the best t).
        result: the sweep.
        settings: how the sweep evaluated the models (default: those of ``slerp-merge validate``).
        cache: the evaluation cache the sweep used (``"default"``: the user's).

    Returns:
        The merge (its folder, or None for a streaming merge; its manifest and upload).

    Raises:
        ConfigError: no t passed the gate.
        SlerpPluginError: as :func:`~slerp_plugin.merge.run_merge`.
    """
    if result.best_t is None:
        raise ConfigError("no t passed the gate: nothing to merge")
    chosen = spec.model_copy(update={"t": result.best_t, "gate_margin": result.margin})
    log.info("merging at the chosen t = %g", result.best_t)
    if spec.stream:
        from ..stream import stream_merge

        return stream_merge(chosen, settings=settings, cache=cache)
    from ..merge import run_merge

    return run_merge(chosen)
