"""Where a gated streaming merge's evaluation stood, kept with the journal so that a resumed run
neither fetches nor merges again the shards the evaluation is past.

A :class:`~.evaluation.GatePoint` is saved as the record :data:`POINT_RECORD` in the working
folder's state, beside files of its own in ``<output>.partial/gate``: each evaluator's last decoder
layer output (a safetensors file) and its SHA-256; the copies the evaluators keep aside (in
``<output>.partial/eval``) are named with their SHA-256. With it go the parents' hashing progress
as it stood after the shard before the point, and the spot re-computations of those shards, so the
resumed run's report is the uninterrupted run's.

The record is the working folder's own but is read as untrusted input: anything that does not
parse, names a path outside the working folder, or does not match its SHA-256 makes
:func:`load_point` answer None, and the merge then evaluates every shard again.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..engine.resume import WorkingFolder
from ..io.atomic import write_bytes_atomic
from ..io.hashing import sha256_file
from ..io.index import is_plain_file_name
from ..io.safetensors import DTYPES, TensorInfo
from ..validate.report import SpotTensor
from ..validate.streaming import LayerOutput
from .evaluation import ASIDE_DIR, GatePoint

log = logging.getLogger(__name__)

#: the record of the gate's last point, in the working folder's state
POINT_RECORD = "gate-point.json"
#: the folder (in the working folder) of the saved decoder layer outputs
POINT_DIR = "gate"


@dataclass
class SavedPoint:
    """A :class:`GatePoint` as an earlier run left it, with what goes with it."""

    point: GatePoint
    hashes: dict  #: the parents' hashing progress after shard ``point.shard - 1`` (ParentHashes.snapshot)
    spot: dict[int, list[SpotTensor]]  #: the spot re-computations of the shards before the point


def save_point(work: WorkingFolder, point: GatePoint, *, hashes: dict, spot: dict[int, list[SpotTensor]],
               identity: dict[str, str]) -> int:
    """Save ``point`` (replacing the last one) once its files are on disk; ``identity`` (the
    parents' commits, the evaluation's tokens) is what :func:`load_point` must be given to use it.

    Returns the bytes the point's files take.

    Raises:
        OSError: a file cannot be written (the last point saved stays).
    """
    from safetensors.torch import save

    folder = work.folder(POINT_DIR)
    folder.mkdir(exist_ok=True)
    evaluators, size, keep = {}, 0, set()
    for role, reached in point.reached.items():
        data = save({"hidden": reached.hidden.contiguous()})
        path = write_bytes_atomic(folder / f"{role}-{point.shard:05d}.safetensors", data, crash_points=False)
        keep.add(path.name)
        size += len(data)
        evaluators[role] = {
            "layer": reached.layer, "file": path.name, "sha256": hashlib.sha256(data).hexdigest(),
            "kept": {name: {"file": info.file.name, "dtype": info.dtype,
                            "shape": list(info.shape), "nbytes": info.nbytes, "sha256": sha}
                     for name, (info, sha) in point.kept.get(role, {}).items()}}
    work.save_record(POINT_RECORD, {
        "shard": point.shard, "identity": identity, "hashes": hashes, "evaluators": evaluators,
        "spot": {str(i): [t.model_dump(mode="json") for t in spot[i]] for i in sorted(spot)}},
        crash_points=False)
    for old in folder.iterdir():
        if old.name not in keep:
            old.unlink()
    return size


def load_point(work: WorkingFolder, roles: list[str], identity: dict[str, str]) -> SavedPoint | None:
    """The point an earlier run of this plan saved for the evaluators ``roles`` with the same
    ``identity`` (see :func:`save_point`), its files checked; None if there is none or it does not
    hold up (see the module docstring)."""
    doc = work.record(POINT_RECORD)
    if not doc:
        return None
    try:
        if doc["identity"] != identity or not set(roles) <= set(doc["evaluators"]):
            return None
        shard = int(doc["shard"])
        reached, kept = {}, {}
        for role in roles:
            entry = doc["evaluators"][role]
            hidden = _load_hidden(work, entry["file"], entry["sha256"])
            reached[role] = LayerOutput(int(entry["layer"]), hidden)
            kept[role] = {name: _kept(work, name, e) for name, e in entry["kept"].items()}
        spot = {int(i): [SpotTensor.model_validate(t) for t in found] for i, found in doc["spot"].items()}
        hashes = doc["hashes"]
        if shard < 1 or not isinstance(hashes, dict):
            return None
    except (KeyError, TypeError, ValueError, AttributeError, OSError) as e:
        log.warning("the gate's saved point cannot be used (%s): every shard is evaluated again", e)
        return None
    return SavedPoint(GatePoint(shard, reached, kept), hashes, spot)


def clear_unused(work: WorkingFolder, saved: SavedPoint | None) -> None:
    """Delete what a stopped run left in ``<output>.partial/gate`` and ``/eval`` (the evaluators'
    copies kept aside) that ``saved`` does not use."""
    used = {info.file for kept in (saved.point.kept.values() if saved else ()) for info, _ in kept.values()}
    if saved is None:
        (work.state / POINT_RECORD).unlink(missing_ok=True)
    for name in (POINT_DIR, ASIDE_DIR):
        folder = work.folder(name)
        if folder.is_dir():  # inside our marked working folder
            for path in folder.iterdir():
                if path not in used and (saved is None or name != POINT_DIR):
                    path.unlink()


def saved_point_bytes(work: WorkingFolder) -> int:
    """The bytes the saved point's own files take."""
    folder = work.folder(POINT_DIR)
    return sum(f.stat().st_size for f in folder.iterdir()) if folder.is_dir() else 0


def _inside(work: WorkingFolder, folder: str, name: object) -> Path:
    """The file ``name`` of the working folder's ``folder``.

    Raises:
        ValueError: ``name`` is not a plain file name (it would lead outside the working folder).
    """
    if not is_plain_file_name(name):
        raise ValueError(f"{name!r} names a file outside the working folder")
    return work.folder(folder) / name  # type: ignore[operator]


def _checked(path: Path, sha256: str) -> bytes:
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"{path.name} does not match its SHA-256")
    return data


def _load_hidden(work: WorkingFolder, name: str, sha256: str) -> torch.Tensor:
    from safetensors.torch import load

    return load(_checked(_inside(work, POINT_DIR, name), sha256))["hidden"]


def _kept(work: WorkingFolder, name: str, entry: dict) -> tuple[TensorInfo, str]:
    path = _inside(work, ASIDE_DIR, entry["file"])
    if sha256_file(path) != entry["sha256"] or entry["dtype"] not in DTYPES:
        raise ValueError(f"{path.name} does not match its SHA-256")
    shape = tuple(int(n) for n in entry["shape"])
    info = TensorInfo(name, entry["dtype"], shape, path, 0, int(entry["nbytes"]))
    if path.stat().st_size != info.nbytes or info.numel * info.itemsize != info.nbytes:
        raise ValueError(f"{path.name} does not hold {name}")
    return info, entry["sha256"]
