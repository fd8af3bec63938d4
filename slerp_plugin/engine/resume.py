"""The journal of an unfinished merge in ``<output>.partial/.slerp_state``: what lets a re-run (or
another worker) reuse finished shards.

``plan.json`` holds the plan's fingerprint; each finished shard gets a marker
``shards/<file>.json`` with its size and SHA-256, written only after the shard was fsynced and
renamed into place. A re-run after ``kill -9`` at any point re-verifies journalled shards and
reuses them, so its result is bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import OutputExistsError, OutputWriteError
from ..formats.manifest import Manifest, ShardRecord, TensorRecord
from ..io.atomic import fsync_dir, write_json_atomic
from ..io.crashpoints import step
from ..io.hashing import sha256_file
from ..io.lock import FileLock
from .output import carries_marker, check_partial, is_empty_dir, remove_ours, unmarked_beginning, write_marker

if TYPE_CHECKING:
    from .plan import MergePlan, ShardPlan

log = logging.getLogger(__name__)

STATE_DIR = ".slerp_state"


@dataclass
class ShardOutcome:
    """The journal entry of a finished shard (what the manifest needs of it)."""

    record: ShardRecord
    tensors: list[TensorRecord]
    seconds: float
    bytes_read: int
    reused: bool = False


def state_dir(plan: MergePlan) -> Path:
    return plan.partial / STATE_DIR


def finished_partial(plan: MergePlan) -> Manifest | None:
    """The manifest of a ``.partial`` that finalize completed (a crash before the last rename)."""
    if not carries_marker(plan.partial, plan.output, "complete"):
        return None
    try:
        manifest = Manifest.read(plan.partial)
    except (OSError, ValueError):
        return None
    return manifest if manifest.plan_fingerprint == plan.fingerprint else None


def prepare_partial(plan: MergePlan, *, exclusive: bool) -> bool:
    """Create ``<output>.partial`` (or adopt ours). With ``exclusive`` (the caller holds the output
    lock alone), one left by a different plan is discarded and stale temporary files are removed.

    The working folder appears whole: it is made under a hidden name, marked, given its plan, and
    renamed into place, so a crash never leaves a ``.partial`` without its marker.

    Returns True when the partial is already complete (only the final rename is missing).

    Raises:
        OutputExistsError: ``.partial`` is not this tool's for this output, or (not ``exclusive``)
            belongs to a different plan.
        OutputWriteError: it cannot be created.
    """
    partial, state = plan.partial, state_dir(plan)
    plan_file = state / "plan.json"
    if exclusive:
        _remove_stale_staging(plan)
    if carries_marker(partial, plan.output, "complete"):
        if finished_partial(plan) is not None:
            return True
        _discard(plan, exclusive)
    elif carries_marker(partial, plan.output, "partial"):
        if _fingerprint(plan_file) != plan.fingerprint:
            _discard(plan, exclusive)
        elif exclusive:
            for tmp in partial.glob("*.tmp"):  # left by a killed writer; nobody else writes now
                tmp.unlink(missing_ok=True)
    else:
        check_partial(plan.output)
    if not carries_marker(partial, plan.output, "partial"):
        try:
            _create_partial(plan, exclusive)
        except OSError as e:
            raise OutputWriteError(f"cannot create {partial}: {e.strerror or e}", path=partial) from e
        if not exclusive and _fingerprint(plan_file) != plan.fingerprint:  # another worker's, made
            _discard(plan, exclusive)  # at the same moment for a different plan: refused
    return False


def _staging_name(plan: MergePlan) -> str:
    return f".{plan.partial.name}.new-"


def _create_partial(plan: MergePlan, exclusive: bool) -> None:
    """Make the working folder under a hidden name, mark it, write its plan, rename it into place
    (over an empty folder, or, with ``exclusive``, an unmarked beginning). Where another worker's
    appeared meanwhile, ours is dropped and theirs is used.

    Raises:
        OutputExistsError: an unmarked beginning is in the way and the output is not locked alone,
            or something not ours has this process's staging name.
        OSError: the folder cannot be made.
    """
    partial = plan.partial
    staging = partial.with_name(f"{_staging_name(plan)}{os.getpid()}")
    if staging.exists() or staging.is_symlink():  # a crashed process with the same pid left it
        _remove_staging(staging, plan)
    leftover = not is_empty_dir(partial) and unmarked_beginning(partial)  # an earlier version's
    if leftover and not exclusive:
        raise OutputExistsError(f"{partial} holds the beginning of a merge that was never marked; prepare "
                                "the merge with the output locked alone (a plain re-run does)", path=partial)
    step(f"create {staging.name}")
    staging.mkdir(parents=True)
    write_marker(staging, plan.output, "partial")
    (staging / STATE_DIR / "shards").mkdir(parents=True)
    write_json_atomic(staging / STATE_DIR / "plan.json",
                      {"fingerprint": plan.fingerprint, "spec": plan.spec.model_dump(mode="json")})
    fsync_dir(staging)
    if leftover:
        step(f"remove the unmarked beginning {partial.name}")
        shutil.rmtree(partial)
    step(f"rename {staging.name} to {partial.name}")
    try:
        os.rename(staging, partial)  # replaces an empty folder
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        remove_ours(staging)
        return
    fsync_dir(partial.parent)


def _remove_staging(staging: Path, plan: MergePlan) -> None:
    """Remove a staging folder a crashed run left: ours only (marked for this output, or an
    unmarked beginning).

    Raises:
        OutputExistsError: it is something else.
    """
    if staging.is_dir() and not staging.is_symlink() and carries_marker(staging, plan.output, "partial"):
        remove_ours(staging)
    elif unmarked_beginning(staging):
        shutil.rmtree(staging)
    else:
        raise OutputExistsError(f"{staging} is in the way and is not this tool's; remove it yourself",
                                path=staging)


def _remove_stale_staging(plan: MergePlan) -> None:
    """Remove hidden working folders that crashed runs left before renaming them into place (ours:
    marked for this output, or an unmarked beginning; anything else stays). Only with the output
    lock held alone."""
    for old in plan.partial.parent.glob(f"{_staging_name(plan)}*"):
        try:
            _remove_staging(old, plan)
        except OutputExistsError:
            log.warning("%s looks like a working folder of this tool but is not; left as it is", old)


def _fingerprint(plan_file: Path) -> str | None:
    try:
        doc = json.loads(plan_file.read_text())
    except (OSError, ValueError):
        return None
    return doc.get("fingerprint") if isinstance(doc, dict) else None


def _discard(plan: MergePlan, exclusive: bool) -> None:
    """Remove our ``.partial`` of a different plan (inputs or options changed)."""
    if not exclusive:
        raise OutputExistsError(f"{plan.partial} belongs to a different merge of {plan.output} (inputs "
                                "or options changed since it was planned); plan the merge again",
                                path=plan.partial)
    log.warning("discarding %s: it belongs to a different merge (inputs or options changed)", plan.partial)
    remove_ours(plan.partial)


def _shard_marker(plan: MergePlan, shard: ShardPlan) -> Path:
    return state_dir(plan) / "shards" / (shard.file + ".json")


def journal(plan: MergePlan, shard: ShardPlan, outcome: ShardOutcome) -> None:
    """Journal a finished (fsynced, renamed) shard."""
    write_json_atomic(
        _shard_marker(plan, shard),
        {
            "fingerprint": plan.fingerprint,
            "record": outcome.record.model_dump(),
            "tensors": [r.model_dump() for r in outcome.tensors],
            "seconds": outcome.seconds,
            "bytes_read": outcome.bytes_read,
            "reused": outcome.reused,
        },
    )


def forget(plan: MergePlan, shard: ShardPlan) -> None:
    """Remove a shard and its journal entry (a check found it wrong: it must be merged again)."""
    step(f"forget {shard.file}")
    _shard_marker(plan, shard).unlink(missing_ok=True)
    (plan.partial / shard.file).unlink(missing_ok=True)


def load_outcome(plan: MergePlan, shard: ShardPlan, verify: bool, *,
                 local: bool = True) -> ShardOutcome | None:
    """The journalled outcome of ``shard`` if its file is present and (with ``verify``) its
    SHA-256 matches the journal; None otherwise. Without ``local``, the journal entry alone (a
    streaming merge deletes each shard once it is uploaded)."""
    marker = _shard_marker(plan, shard)
    path = plan.partial / shard.file
    try:
        doc = json.loads(marker.read_text())
        record = ShardRecord(**doc["record"])
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if doc.get("fingerprint") != plan.fingerprint:
        return None
    if local and (not path.is_file() or path.stat().st_size != record.size):
        return None
    if local and verify and sha256_file(path) != record.sha256:
        log.warning("%s: checksum differs from the journal; merging it again", shard.file)
        return None
    return ShardOutcome(
        record,
        [TensorRecord(**t) for t in doc["tensors"]],
        float(doc["seconds"]),
        int(doc["bytes_read"]),
        reused=bool(doc.get("reused", False)),
    )


def shard_lock(plan: MergePlan, shard: ShardPlan) -> FileLock:
    """An exclusive lock on writing one shard, waited for: workers sharing an output never write the
    same shard at once, and a retry waits for an orphaned attempt instead of racing it."""
    def note(holder: str) -> None:
        log.info("waiting for shard %s of %s: locked by %s", shard.file, plan.output, holder)

    return FileLock.acquire(state_dir(plan) / "shards" / f"{shard.file}.lock", exclusive=True, wait=True,
                            what=f"writing {shard.file}", on_wait=note)
