"""The journal of an unfinished merge in ``<output>.partial/.slerp_state``: what lets a re-run (or
another worker) reuse finished shards.

``plan.json`` holds the plan's fingerprint; each finished shard gets a marker
``shards/<file>.json`` with its size and SHA-256, written only after the shard was fsynced and
renamed into place. A re-run after ``kill -9`` at any point re-verifies journalled shards and
reuses them, so its result is bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import OutputExistsError, OutputWriteError
from ..formats.manifest import Manifest, ShardRecord, TensorRecord
from ..io.atomic import write_json_atomic
from ..io.hashing import sha256_file
from ..io.lock import FileLock
from .output import carries_marker, check_partial, write_marker

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

    Returns True when the partial is already complete (only the final rename is missing).

    Raises:
        OutputExistsError: ``.partial`` is not this tool's for this output, or (not ``exclusive``)
            belongs to a different plan.
        OutputWriteError: it cannot be created.
    """
    partial, state = plan.partial, state_dir(plan)
    plan_file = state / "plan.json"
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
    try:
        (state / "shards").mkdir(parents=True, exist_ok=True)
        if not carries_marker(partial, plan.output, "partial"):
            write_marker(partial, plan.output, "partial")
        if not plan_file.is_file():
            write_json_atomic(plan_file, {"fingerprint": plan.fingerprint,
                                          "spec": plan.spec.model_dump(mode="json")})
    except OSError as e:
        raise OutputWriteError(f"cannot create {partial}: {e.strerror}", path=partial) from e
    return False


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
    shutil.rmtree(plan.partial)


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
