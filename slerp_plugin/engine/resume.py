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
from ..formats.manifest import MANIFEST_NAME, Manifest, ShardRecord, TensorRecord
from ..io.atomic import write_json_atomic
from ..io.hashing import sha256_file

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
    try:
        manifest = Manifest.read(plan.partial)
    except (OSError, ValueError):
        return None
    if state_dir(plan).exists() or manifest.plan_fingerprint != plan.fingerprint:
        return None
    return manifest


def prepare_partial(plan: MergePlan) -> bool:
    """Create ``<output>.partial`` (or adopt ours); discard one left by a different plan.

    Returns True when the partial is already complete (only the final rename is missing).

    Raises:
        OutputExistsError: ``.partial`` exists and was not made by this tool.
        OutputWriteError: it cannot be created.
    """
    partial, state = plan.partial, state_dir(plan)
    plan_file = state / "plan.json"
    if partial.exists():
        if finished_partial(plan) is not None:
            return True
        if plan_file.is_file():
            ours, same = True, json.loads(plan_file.read_text()).get("fingerprint") == plan.fingerprint
        else:
            ours, same = (partial / MANIFEST_NAME).is_file() or not any(partial.iterdir()), False
        if not ours:
            raise OutputExistsError(
                f"{partial} exists but was not made by slerp-merge; remove it or choose another output",
                path=partial,
            )
        if not same and any(partial.iterdir()):
            log.warning("discarding %s: it belongs to a different merge (inputs or options changed)", partial)
            shutil.rmtree(partial)
    try:
        (state / "shards").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputWriteError(f"cannot create {partial}: {e.strerror}", path=partial) from e
    if not plan_file.is_file():
        write_json_atomic(plan_file, {"fingerprint": plan.fingerprint,
                                      "spec": plan.spec.model_dump(mode="json")})
    return False


def _marker(plan: MergePlan, shard: ShardPlan) -> Path:
    return state_dir(plan) / "shards" / (shard.file + ".json")


def write_marker(plan: MergePlan, shard: ShardPlan, outcome: ShardOutcome) -> None:
    """Journal a finished (fsynced, renamed) shard."""
    write_json_atomic(
        _marker(plan, shard),
        {
            "fingerprint": plan.fingerprint,
            "record": outcome.record.model_dump(),
            "tensors": [r.model_dump() for r in outcome.tensors],
            "seconds": outcome.seconds,
            "bytes_read": outcome.bytes_read,
            "reused": outcome.reused,
        },
    )


def load_outcome(plan: MergePlan, shard: ShardPlan, verify: bool) -> ShardOutcome | None:
    """The journalled outcome of ``shard`` if its file is present and (with ``verify``) its
    SHA-256 matches the journal; None otherwise."""
    marker = _marker(plan, shard)
    path = plan.partial / shard.file
    try:
        doc = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if doc.get("fingerprint") != plan.fingerprint or not path.is_file():
        return None
    record = ShardRecord(**doc["record"])
    if path.stat().st_size != record.size:
        return None
    if verify and sha256_file(path) != record.sha256:
        log.warning("%s: checksum differs from the journal; merging it again", shard.file)
        return None
    return ShardOutcome(
        record,
        [TensorRecord(**t) for t in doc["tensors"]],
        float(doc["seconds"]),
        int(doc["bytes_read"]),
        reused=bool(doc.get("reused", False)),
    )
