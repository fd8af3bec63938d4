"""One call from a :class:`~slerp_plugin.spec.MergeSpec` to a finished merge: inputs resolved
(Hub ids downloaded), the engine run, the result published to the Hub if asked."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from functools import partial

from .engine import InputHashes, MergePlan, MergeResult, finalize, merge_shards, plan_resolved
from .engine.output import output_lock
from .engine.progress import progress_bar
from .hub.sources import resolve_inputs
from .io.lock import FileLock
from .io.model_files import ResolvedModel
from .io.prefetch import Prefetch
from .preflight import require_disk
from .spec import MergeSpec

log = logging.getLogger(__name__)


def plan_merge(spec: MergeSpec, resolved: Mapping[str, ResolvedModel] | None = None) -> MergePlan:
    """Resolve the inputs (those in ``resolved`` as given, local folders as they are, Hub ids
    downloaded), read their headers, check their tensor names, and split the output into shards
    (:func:`slerp_plugin.engine.plan_resolved`).

    Args:
        spec: the merge to plan.
        resolved: inputs already on local disk, by role (``model_1``, ``model_2``,
            ``tokenizer``; default: none).

    Returns:
        The plan: shards, device, and the fingerprint that decides what a re-run may reuse.

    Raises:
        ModelNotFoundError, HubError: an input cannot be resolved.
        SlerpPluginError: as :func:`slerp_plugin.engine.plan_resolved`.
    """
    return plan_resolved(spec, resolve_inputs(spec, resolved))


def run_merge(spec: MergeSpec, *, prefetch: Prefetch | None = None) -> MergeResult:
    """Plan, merge every shard (resuming an interrupted run), finalize, and upload to
    ``spec.push_to_hub`` if set. With ``spec.stream``, Hub parents are merged straight into
    ``spec.push_to_hub`` within ``spec.disk_budget`` (:func:`slerp_plugin.stream.stream_merge`).

    A progress bar is shown with ``spec.show_pbar`` or when stderr is a terminal. The output is
    locked for the whole merge: a second merge into it fails at once, naming this one. Run again
    after a crash, it resumes (or, if the merge had finished, returns it as it is).

    Args:
        spec: what to merge, how, and where to (:class:`~slerp_plugin.spec.MergeSpec`).
        prefetch: a start-up read-ahead of the inputs (:func:`slerp_plugin.io.prefetch.start`),
            whose page-cache contents and input hashes are taken over (default: none).

    Returns:
        The output folder (None for a streaming merge), its manifest, and the Hub upload if
        ``spec.push_to_hub`` was set.

    Raises:
        OutputWriteError: the merge cannot fit on disk (refused before any download).
        OutputLockedError: another process is merging into the same output.
        SlerpPluginError: any other bad input or write failure, with a one-line message.
    """
    if spec.stream:
        from .stream import stream_merge

        return stream_merge(spec)
    started = time.perf_counter()
    from .stream.evaluation import aside_estimate

    require_disk(spec, aside=partial(aside_estimate, spec))  # before anything is downloaded
    plan = plan_merge(spec)
    with output_lock(plan.output, exclusive=True, wait=False, what="slerp-merge") as lock:
        if plan.finished_earlier:  # a re-run after the merge had finished: nothing to read again
            result = finalize(plan, lock=lock)
        else:
            result = _merge(plan, prefetch, lock, started)
    log.info("branches: %s", ", ".join(f"{k} {v}" for k, v in sorted(result.manifest.branch_counts.items())))
    if spec.push_to_hub:
        from .hub.client import upload_folder

        result.upload = upload_folder(result.output, spec.push_to_hub, private=spec.private)
        log.info("published to %s: %s", spec.push_to_hub, result.upload.url)
    return result


def _merge(plan: MergePlan, prefetch: Prefetch | None, lock: FileLock, started: float) -> MergeResult:
    """Merge every shard of ``plan`` (resuming) and finalize it, with the output locked."""
    hashes = InputHashes.start(plan, prefetch)
    bar = progress_bar(plan, "merging")
    try:
        outcomes = merge_shards(plan, progress=bar.update if bar else None, hashes=hashes,
                                prefetch=prefetch, lock=lock)
    finally:
        if bar:
            bar.close()
    reused = sum(o.reused for o in outcomes)
    if reused:
        log.info("resumed: %d of %d shard(s) reused from the interrupted run", reused, len(outcomes))
    return finalize(plan, input_hashes=hashes.finish(), started_at=started, lock=lock)

