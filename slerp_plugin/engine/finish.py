"""Finishing a merge: index, configs, tokenizer, manifest and model card written into
``<output>.partial``, which then becomes ``<output>`` by one rename."""

from __future__ import annotations

import json
import logging
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from ..errors import OutputExistsError, OutputWriteError
from ..formats.manifest import InputRecord, Manifest, TensorRecord, describe_input
from ..formats.modelcard import render_model_card
from ..io.atomic import write_json_atomic
from ..io.crashpoints import step
from ..io.index import INDEX_NAME
from ..io.lock import FileLock
from ..io.model_files import CONFIG_FILES, TOKENIZER_FILES
from ..spec import MergeSpec
from .inputs import input_files
from .output import move_into_place, output_lock, remove_replaced
from .plan import MergePlan
from .resume import ShardOutcome, WorkingFolder

log = logging.getLogger(__name__)


@dataclass
class MergeResult:
    """A finished merge: the output folder (None for a streaming merge, which keeps nothing
    locally), its manifest, the Hub upload if one was asked for (a
    :class:`slerp_plugin.hub.client.Upload`), and the gate's report of a streaming merge (a
    :class:`slerp_plugin.validate.ValidationReport`)."""

    output: Path | None
    manifest: Manifest
    upload: object | None = None
    validation: object | None = None


def finalize(
    plan: MergePlan,
    *,
    input_hashes: dict[Path, str] | None = None,
    started_at: float | None = None,
    lock: FileLock | None = None,
    wait: bool = False,
) -> MergeResult:
    """Check every shard is journalled, write index, configs, tokenizer, manifest and model card,
    then move ``<output>.partial`` to ``<output>`` in one rename.

    Args:
        plan: the plan every shard was merged by.
        input_hashes: input checksums already computed (:meth:`InputHashes.finish
            <slerp_plugin.engine.inputs.InputHashes.finish>`); the others are computed (cached) here.
        started_at: when the merge began (``time.perf_counter()``), to record its total time.
        lock: the exclusive output lock the caller holds; without it the output is locked
            exclusively for the call.
        wait: wait for that lock until every worker still merging (orphaned attempts included)
            has let go, instead of failing (default False).

    Returns:
        The output folder and its manifest (an earlier run's, where it had finished the merge).

    Raises:
        OutputLockedError: another process holds the output (without ``wait``).
        OutputWriteError: a shard is missing (not merged yet) or writing failed.
        OutputExistsError: the destination appeared meanwhile and may not be replaced.
    """
    with ExitStack() as stack:
        if lock is None or not lock.exclusive:
            stack.enter_context(output_lock(plan.output, exclusive=True, wait=wait, what="finishing"))
        if plan.finished_earlier:
            remove_replaced(plan.output)
            log.info("merged model at %s (finished by an earlier run)", plan.output)
            return MergeResult(plan.output, Manifest.read(plan.output))
        work = WorkingFolder(plan)
        finished = work.finished()
        if finished is not None:
            work.drop_journal()
            move_into_place(plan)
            log.info("merged model at %s (finished by an earlier run)", plan.output)
            return MergeResult(plan.output, finished)
        return _finish(work, input_hashes, started_at)


def _finish(work: WorkingFolder, input_hashes: dict[Path, str] | None,
            started_at: float | None) -> MergeResult:
    plan = work.plan
    t0 = time.perf_counter()
    outcomes = []
    for shard in plan.shards:
        outcome = work.outcome(shard, verify=False)
        if outcome is None:
            raise OutputWriteError(f"{plan.partial}: shard {shard.file} is not merged yet; "
                                   "merge every shard before finishing", path=plan.partial)
        outcomes.append(outcome)
    try:
        inputs = input_records(plan, input_hashes)
        manifest = write_metadata(plan, work.path, outcomes, inputs, started_at, t0)
        work.mark_complete()
        work.drop_journal()
        move_into_place(plan)
    except (OutputWriteError, OutputExistsError):
        raise
    except OSError as e:
        raise OutputWriteError(f"finishing {plan.output} failed: {e.strerror or e}", path=plan.output) from e
    log.info("merged model at %s", plan.output)
    return MergeResult(plan.output, manifest)


def write_metadata(plan: MergePlan, folder: Path, outcomes: list[ShardOutcome],
                   inputs: dict[str, InputRecord], started_at: float | None,
                   finalize_started: float, *, extra_timings: dict[str, float] | None = None) -> Manifest:
    """Write the index, configs, tokenizer files, manifest and model card of a merge whose shards
    are ``outcomes`` into ``folder``; returns the manifest (``extra_timings`` added to its timings).

    Raises:
        OSError: writing failed.
    """
    _write_index(plan, folder)
    _copy_configs(plan, folder)
    for name in TOKENIZER_FILES:
        src = plan.paths["tokenizer"] / name
        if src.is_file():
            step(f"copy {name}")
            shutil.copyfile(src, folder / name)
    manifest = _build_manifest(plan, outcomes, inputs, started_at, finalize_started)
    manifest.timings.update(extra_timings or {})
    manifest.write(folder)
    step("write README.md")
    (folder / "README.md").write_text(render_model_card(manifest))
    return manifest


def input_records(plan: MergePlan, hashes: dict[Path, str] | None = None) -> dict[str, InputRecord]:
    """Manifest records of the inputs; files' SHA-256 from ``hashes`` or computed (cached)."""
    refs = {"model_1": plan.spec.model_1, "model_2": plan.spec.model_2, "tokenizer": plan.spec.tokenizer_ref}
    hashes = {**plan.known_hashes, **(hashes or {})}
    records = {}
    for role, ref in refs.items():
        record = describe_input(ref, plan.paths[role], input_files(plan, role), hashes)
        record.commit = plan.commits.get(role)
        records[role] = record
    return records


def _write_index(plan: MergePlan, folder: Path) -> None:
    weight_map = {j.name: s.file for s in plan.shards for j in s.jobs}
    write_json_atomic(
        folder / INDEX_NAME,
        {"metadata": {"total_size": plan.total_bytes}, "weight_map": weight_map},
    )


def _copy_configs(plan: MergePlan, folder: Path) -> None:
    for name in CONFIG_FILES:
        src = plan.paths["model_1"] / name
        if not src.is_file():
            continue
        stored = plan.spec.stored_dtype
        if name == "config.json" and stored:
            cfg = json.loads(src.read_text())
            for key in ("dtype", "torch_dtype"):
                if key in cfg:
                    cfg[key] = stored
            cfg.setdefault("dtype", stored)
            write_json_atomic(folder / name, cfg)
        else:
            step(f"copy {name}")
            shutil.copyfile(src, folder / name)


def _build_manifest(
    plan: MergePlan,
    outcomes: list[ShardOutcome],
    inputs: dict[str, InputRecord],
    started_at: float | None,
    finalize_started: float,
) -> Manifest:
    merge_s = sum(o.seconds for o in outcomes)
    now = time.perf_counter()
    timings = {
        "merge_s": round(merge_s, 3),
        "finalize_s": round(now - finalize_started, 3),
        "bytes_read": float(sum(o.bytes_read for o in outcomes)),
        "bytes_written": float(plan.total_bytes),
        "write_MBps": round(plan.total_bytes / 1e6 / max(merge_s, 1e-9), 1),
    }
    if started_at is not None:
        timings["total_s"] = round(now - started_at, 3)
    tensors = [t for o in outcomes for t in o.tensors]
    return Manifest.create(
        spec=plan.spec.model_dump(mode="json"),
        inputs=inputs,
        shards=[o.record for o in outcomes],
        total_size=plan.total_bytes,
        tensors=tensors,
        warnings=plan.warnings + _precision_warnings(plan.spec, tensors),
        timings=timings,
        resume={"reused_shards": sum(o.reused for o in outcomes), "total_shards": len(outcomes)},
        plan_fingerprint=plan.fingerprint,
    )


def _precision_warnings(spec: MergeSpec, tensors: list[TensorRecord]) -> list[str]:
    """Where ``norm_precision=float32`` was asked but a tensor was too large to hold whole."""
    if spec.norm_precision != "float32":
        return []
    summed = [t.name for t in tensors if t.norm_precision == "float64"]
    if not summed:
        return []
    msg = (f"norm_precision=float32: {len(summed)} tensor(s) larger than buffer_memory took d from float64 "
           f"sums (raise method.buffer_memory to hold them): {', '.join(summed[:5])}"
           + (" …" if len(summed) > 5 else ""))
    log.warning("%s", msg)
    return [msg]
