"""An unfinished merge's working folder ``<output>.partial``, owned by :class:`WorkingFolder`:
what lets a re-run (or another worker) reuse finished shards, and what a run keeps beside them.

``.slerp_state/plan.json`` holds the plan's fingerprint; each finished shard gets a journal entry
``.slerp_state/shards/<file>.json`` with its size and SHA-256, written only after the shard was
fsynced and renamed into place. A re-run after ``kill -9`` at any point re-verifies journalled
shards and reuses them, so its result is bit-identical to an uninterrupted run. Other records (a
streaming merge's uploads, the parents' hashing progress, the gate's verdict) sit beside the
journal and are read back only when they carry the plan's fingerprint.
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
from ..io.atomic import fsync_dir, write_bytes_atomic, write_json_atomic
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


class WorkingFolder:
    """``<output>.partial`` of ``plan``, and the one owner of what a merge keeps there: this tool's
    marker, the plan file, the journal of finished shards and their locks, and the records a run
    keeps beside the journal. Everything else reaches the working folder through it.
    """

    def __init__(self, plan: MergePlan) -> None:
        self.plan = plan
        self.path = plan.partial
        self.state = plan.partial / STATE_DIR

    def finished(self) -> Manifest | None:
        """The manifest of a working folder that finalize completed (a crash came before the last
        rename), if it is this plan's."""
        if not carries_marker(self.path, self.plan.output, "complete"):
            return None
        try:
            manifest = Manifest.read(self.path)
        except (OSError, ValueError):
            return None
        return manifest if manifest.plan_fingerprint == self.plan.fingerprint else None

    def prepare(self, *, exclusive: bool) -> bool:
        """Create the working folder (or adopt ours). With ``exclusive`` (the caller holds the output
        lock alone), one left by a different plan is discarded and stale temporary files are removed.

        The folder appears whole: it is made under a hidden name, marked, given its plan, and renamed
        into place, so a crash never leaves a ``.partial`` without its marker.

        Returns True when it is already complete (only the final rename is missing).

        Raises:
            OutputExistsError: ``.partial`` is not this tool's for this output, or (not
                ``exclusive``) belongs to a different plan.
            OutputWriteError: it cannot be created.
        """
        plan, partial = self.plan, self.path
        plan_file = self.state / "plan.json"
        if exclusive:
            _remove_stale_staging(plan)
        if carries_marker(partial, plan.output, "complete"):
            if self.finished() is not None:
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

    # ---------------------------------------------------------------- the journal

    def shard_path(self, shard: ShardPlan) -> Path:
        """Where ``shard`` is written."""
        return self.path / shard.file

    def journal(self, shard: ShardPlan, outcome: ShardOutcome) -> None:
        """Journal a finished (fsynced, renamed) shard."""
        write_json_atomic(self._entry(shard), {
            "fingerprint": self.plan.fingerprint,
            "record": outcome.record.model_dump(),
            "tensors": [r.model_dump() for r in outcome.tensors],
            "seconds": outcome.seconds,
            "bytes_read": outcome.bytes_read,
            "reused": outcome.reused,
        })

    def outcome(self, shard: ShardPlan, *, verify: bool, local: bool = True) -> ShardOutcome | None:
        """The journalled outcome of ``shard`` if its file is present and (with ``verify``) its
        SHA-256 matches the journal; None otherwise. Without ``local``, the journal entry alone (a
        streaming merge deletes each shard once it is uploaded)."""
        path = self.shard_path(shard)
        try:
            doc = json.loads(self._entry(shard).read_text())
            record = ShardRecord(**doc["record"])
        except (OSError, ValueError, TypeError, KeyError):
            return None
        if doc.get("fingerprint") != self.plan.fingerprint:
            return None
        if local and (not path.is_file() or path.stat().st_size != record.size):
            return None
        if local and verify and sha256_file(path) != record.sha256:
            log.warning("%s: checksum differs from the journal; merging it again", shard.file)
            return None
        return ShardOutcome(record, [TensorRecord(**t) for t in doc["tensors"]], float(doc["seconds"]),
                            int(doc["bytes_read"]), reused=bool(doc.get("reused", False)))

    def forget(self, shard: ShardPlan) -> None:
        """Remove a shard and its journal entry (it must be merged again: a check found it wrong, or a
        resumed gated stream evaluates it again)."""
        step(f"forget {shard.file}")
        self._entry(shard).unlink(missing_ok=True)
        self.shard_path(shard).unlink(missing_ok=True)

    def lock(self, shard: ShardPlan) -> FileLock:
        """An exclusive lock on writing one shard, waited for: workers sharing an output never write
        the same shard at once, and a retry waits for an orphaned attempt instead of racing it."""
        def note(holder: str) -> None:
            log.info("waiting for shard %s of %s: locked by %s", shard.file, self.plan.output, holder)

        return FileLock.acquire(self.state / "shards" / f"{shard.file}.lock", exclusive=True, wait=True,
                                what=f"writing {shard.file}", on_wait=note)

    def _entry(self, shard: ShardPlan) -> Path:
        return self.state / "shards" / f"{shard.file}.json"

    # ---------------------------------------------------------------- records beside the journal

    def record(self, name: str) -> dict | None:
        """Record ``name`` (a path under the state folder) if it is there, readable and this
        plan's (its ``fingerprint``); None otherwise."""
        try:
            doc = json.loads((self.state / name).read_text())
        except (OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) and doc.get("fingerprint") == self.plan.fingerprint else None

    def save_record(self, name: str, doc: dict, *, crash_points: bool = True) -> None:
        """Write record ``name`` atomically, with this plan's fingerprint (``crash_points=False``:
        a record whose loss costs only work, written off the output protocol's steps)."""
        data = json.dumps({"fingerprint": self.plan.fingerprint, **doc}, indent=2) + "\n"
        write_bytes_atomic(self.state / name, data.encode(), crash_points=crash_points)

    def folder(self, name: str) -> Path:
        """A folder of the run's own inside the working folder (not made here)."""
        return self.path / name

    # ---------------------------------------------------------------- the end

    def mark_complete(self) -> None:
        """Mark the folder as this plan's finished merge (before the journal goes and the rename)."""
        write_marker(self.path, self.plan.output, "complete")
        fsync_dir(self.path)

    def drop_journal(self) -> None:
        """Remove the state folder of a working folder marked complete (a crash may have left some)."""
        if self.state.exists():
            step(f"remove {self.path.name}/{STATE_DIR}")
            shutil.rmtree(self.state)

    def remove(self) -> None:
        """Delete the working folder (it carries this tool's marker), the marker last."""
        remove_ours(self.path)


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
