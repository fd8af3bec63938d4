"""A Hub-to-Hub merge with bounded disk: parents read by range as needed, each output shard merged,
uploaded and deleted at once, one commit at the end.

Three stages overlap, each on its own thread, all within ``spec.disk_budget``:

1. fetch: output shard by output shard, the parents' bytes it needs, into spool files
   (:mod:`.spool`), the next shard's GETs started while the last ones of the shard before are in
   flight; every parent file is hashed as its bytes arrive;
2. merge: the engine's :class:`~slerp_plugin.engine.execute.ShardMerge`, reading the spool, writing
   the shard into ``<output>.partial`` and journalling it; the spool is then deleted;
3. upload: the shard is pre-uploaded as an LFS object (the Hub checks its SHA-256), recorded in
   the journal, and deleted; :data:`UPLOADS_IN_FLIGHT` shards at once.

With the gate (``spec.gate``, the default), the shards are planned in the order the model runs and
each is evaluated as it is merged (:mod:`.evaluation`): the merged model, and each parent whose
evaluation is not cached, from the spool; a shard's files go only once the evaluators are done with
them.

When every shard is uploaded, every parent file matched the Hub's SHA-256 and the gate passed, one
commit (pinned to the branch head it saw) publishes the shards with the index, configs, tokenizer,
manifest, model card and ``validation.json``; ``<output>.partial`` is then removed. A failed gate
publishes nothing: the report stays in ``<output>.partial`` and a re-run of the same merge reports
the recorded verdict without merging again. A re-run of an interrupted merge skips the shards
the journal says are uploaded and the Hub still holds, and uploads without merging those merged
but not uploaded.
"""

from __future__ import annotations

import functools
import logging
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ..engine import MergePlan, MergeResult, ShardPlan, compute_threads
from ..engine.execute import ShardMerge
from ..engine.finish import write_metadata
from ..engine.output import output_lock
from ..engine.plan import format_bytes, plan_checkpoints
from ..engine.progress import progress_bar
from ..engine.resources import threads_beside_evaluation
from ..engine.resume import ShardOutcome, WorkingFolder
from ..errors import (
    CheckpointError,
    ConfigError,
    HubIntegrityError,
    OutputWriteError,
    ValidationGateError,
    ValidationInputError,
)
from ..formats.manifest import InputFile, InputRecord, Manifest, ShardRecord
from ..formats.modelcard import render_model_card
from ..formats.public import public_files
from ..hub.client import commit_message_for, is_hub_id
from ..hub.connections import Connections
from ..hub.lfs import commit_uploaded, ensure_repo, lfs_present, preupload, uploaded_file
from ..io.crashpoints import step
from ..io.model_files import OUTPUT_MARKER, TOKENIZER_FILES
from ..io.reader import TensorReader
from ..io.safetensors import Checkpoint, read_header
from ..preflight import STREAM_SHARDS_IN_FLIGHT
from ..spec import MergeSpec
from ..validate.cache import EvaluationCache
from ..validate.functional import EvalSettings
from .evaluation import GatePoint, StreamGate
from .gate_resume import clear_unused, load_point, save_point, saved_point_bytes
from .remote import RemoteParent, open_parent
from .spool import (
    PIECE_BYTES,
    ROLES,
    SHARDS_AT_ONCE,
    DiskBudget,
    ParentHashes,
    ShardFetches,
    ShardSpool,
    fetch_spool,
    hash_spooled,
    is_complete,
    mark_complete,
    partial_files,
    spool_shard,
)

if TYPE_CHECKING:
    from ..validate.report import FunctionalResult, SpotTensor, ValidationReport

log = logging.getLogger(__name__)

_DONE = object()
#: output shards uploaded at once, at most (a CDN limits each connection, as it does downloads, and
#: huggingface_hub sends an LFS file's parts one after the other); the disk budget bounds them too
UPLOADS_IN_FLIGHT = 8


@dataclass
class StreamStats:
    """What a streaming merge measured: bytes each way, the disk it held at most, reused shards."""

    bytes_fetched: int = 0
    bytes_uploaded: int = 0
    peak_disk: int = 0
    disk_budget: int = 0
    reused: int = 0
    uploaded_only: int = 0
    seconds: float = 0.0

    def as_timings(self) -> dict[str, float]:
        """The figures the manifest's ``timings`` records for a streaming merge."""
        return {"stream_fetched_bytes": float(self.bytes_fetched),
                "stream_uploaded_bytes": float(self.bytes_uploaded),
                "stream_peak_disk_bytes": float(self.peak_disk),
                "stream_disk_budget_bytes": float(self.disk_budget),
                "stream_reused_shards": float(self.reused)}


def check_stream_spec(spec: MergeSpec) -> None:
    """What a streaming merge needs of its spec.

    Raises:
        ConfigError: no ``push_to_hub``, or a parent that is not a Hub id.
    """
    if not spec.push_to_hub:
        raise ConfigError("method.stream=true needs a Hub target: add +push_to_hub=org/name")
    for role, ref in (("model_1", spec.model_1), ("model_2", spec.model_2)):
        if not is_hub_id(ref.ref):
            raise ConfigError(f"{role}: {ref} is not a Hub id; method.stream=true merges Hub models "
                              "(org/name[@revision]); merge local folders without it")
    if spec.allow_bin:
        raise ConfigError("method.allow_bin: pickled .bin weights cannot be streamed; merge them without "
                          "method.stream")


def stream_merge(spec: MergeSpec, *, token: str | None = None, settings: EvalSettings | None = None,
                 cache: EvaluationCache | None | Literal["default"] = "default") -> MergeResult:
    """Merge Hub parents into ``spec.push_to_hub`` with at most ``spec.disk_budget`` bytes of disk,
    publishing only a merge that passes the gate (``spec.gate``, ``spec.gate_margin``).

    The local working folder is ``<output>.partial`` (this tool's marker; removed once published,
    kept with the report when the gate fails).

    Args:
        spec: the merge; ``stream`` set, both parents Hub ids, ``push_to_hub`` the target repo.
        token: a Hub token (default: ``HF_TOKEN`` or the one ``hf auth login`` saved).
        settings: how the gate evaluates the models (default: those of ``slerp-merge validate``,
            on ``spec.device``).
        cache: where parents' evaluations come from and go (default: the evaluation cache under
            the cache root; None: parents are always evaluated).

    Returns:
        The result: ``output`` None (nothing is kept locally), the published manifest, the upload
        (repo, commit, URL), and the gate's report (None without the gate).

    Raises:
        ConfigError: see :func:`check_stream_spec`; a budget below one shard's need.
        OutputLockedError: another merge holds the output.
        OutputWriteError: the working folder cannot be written (disk full).
        HubIntegrityError: a parent's bytes do not match the Hub's SHA-256 (nothing published; the
            working folder is discarded, so a re-run starts over).
        ValidationGateError: the gate failed, now or in an earlier run of the same merge (nothing
            published; the message has the three perplexities and where the report is).
        ValidationInputError: a model cannot be evaluated layer by layer (before anything is fetched).
        HubError (subclasses), CheckpointError, KeyMismatchError, ShapeMismatchError: as a local merge.
    """
    check_stream_spec(spec)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="slerp-stream-") as tmp:
        plan, parents = open_remote(spec, Path(tmp), token=token, execution=spec.gate)
        with output_lock(plan.output, exclusive=True, wait=False, what="slerp-merge (streaming)"):
            work = WorkingFolder(plan)
            work.prepare(exclusive=True)
            _refuse_recorded_failure(work)
            bar = progress_bar(plan, "streaming")
            try:
                gate = _gate(plan, parents, settings, cache) if spec.gate else None
                merge = StreamingMerge(work, parents, token=token, progress=bar.update if bar else None,
                                       gate=gate)
                return merge.run(started)
            finally:
                if bar:
                    bar.close()


def _gate(plan: MergePlan, parents: dict[str, RemoteParent], settings: EvalSettings | None,
          cache: EvaluationCache | None | Literal["default"]) -> StreamGate:
    """The gate of ``plan`` (default settings: those of ``validate`` on ``spec.gate_max_tokens``
    tokens; default cache: ``validate``'s).

    Raises:
        ValidationInputError: a model cannot be evaluated layer by layer (one line; ``method.gate=false``
            publishes with spot checks only).
    """
    settings = settings or EvalSettings(device=plan.spec.device, max_tokens=plan.spec.gate_max_tokens)
    try:
        return StreamGate(plan, parents, settings, plan.spec.gate_margin,
                          EvaluationCache() if cache == "default" else cache, DiskBudget(0))
    except ValidationInputError as e:
        raise ValidationInputError(f"the gate cannot evaluate this merge: {e.message} (method.gate=false "
                                   "publishes it with spot checks only)", path=e.path) from e


def _refuse_recorded_failure(work: WorkingFolder) -> None:
    """A merge whose gate failed is not merged again: its recorded verdict is the answer.

    Raises:
        ValidationGateError: the plan's gate failed in an earlier run.
    """
    doc = work.record(GATE_RECORD)
    if doc and doc.get("passed") is False:
        log.info("this merge failed its gate in an earlier run (%s); nothing is merged again",
                 doc.get("created_at", "?"))
        raise ValidationGateError(str(doc.get("message", "the gate failed")))


def open_remote(spec: MergeSpec, folder: Path, *, token: str | None = None,
                execution: bool = True) -> tuple[MergePlan, dict[str, RemoteParent]]:
    """The plan of merging ``spec``'s Hub parents, read by range: their small files (config,
    tokenizer) go to ``folder``, their weights stay on the Hub.

    Args:
        spec: the merge (both parents Hub ids).
        folder: where the parents' small files go (``model_1/``, ``model_2/``, ``tokenizer/``).
        token: the Hub token (default: the user's).
        execution: shards in the order the model runs (:func:`~slerp_plugin.engine.plan.execution_order`).

    Returns:
        The plan (its checkpoints name the parents' files as in their repos) and the parents by role.

    Raises:
        ConfigError: a parent is not a Hub id.
        HubError (subclasses), CheckpointError, KeyMismatchError, ShapeMismatchError: as a merge.
    """
    with ThreadPoolExecutor(2, thread_name_prefix="open-parent") as pool:  # each waits on the Hub
        opening = {role: pool.submit(open_parent, ref, name, folder / role, token=token)
                   for role, ref, name in (("model_1", spec.model_1, spec.model_names[0]),
                                           ("model_2", spec.model_2, spec.model_names[1]))}
    parents = {role: future.result() for role, future in opening.items()}
    tokenizer_folder = _tokenizer(spec, parents, folder / "tokenizer", token)
    return _plan(spec, parents, tokenizer_folder, execution), parents


def _tokenizer(spec: MergeSpec, parents: dict[str, RemoteParent], folder: Path, token: str | None) -> Path:
    if spec.tokenizer_ref == spec.model_1:
        return parents["model_1"].folder
    if is_hub_id(spec.tokenizer_ref.ref) and not Path(spec.tokenizer_ref.ref).is_dir():
        return open_parent(spec.tokenizer_ref, "tokenizer", folder, weights=False, token=token).folder
    return Path(spec.tokenizer_ref.ref).expanduser().resolve()


def _plan(spec: MergeSpec, parents: dict[str, RemoteParent], tokenizer: Path, execution: bool) -> MergePlan:
    """The merge plan of the parents' remote checkpoints (their files named as in their repos).

    Raises:
        CheckpointError: model_1 has no config.json, or the tokenizer source no tokenizer files.
    """
    first = parents["model_1"]
    if not (first.folder / "config.json").is_file():
        raise CheckpointError(f"{spec.model_names[0]}: {first.repo_id}@{first.commit[:12]} has no "
                              "config.json (not a transformers model)", repo_id=first.repo_id)
    if not any((tokenizer / f).is_file() for f in TOKENIZER_FILES):
        raise CheckpointError(f"tokenizer: no tokenizer files in {spec.tokenizer_ref}")
    identity = [[role, p.repo_id, p.commit, name, p.files[name].size, p.files[name].sha256]
                for role, p in parents.items() for name in sorted(p.files)]
    paths = {role: p.folder for role, p in parents.items()}
    paths["tokenizer"] = tokenizer
    return plan_checkpoints(spec, paths, {role: p.checkpoint for role, p in parents.items()}, identity,
                            commits={role: p.commit for role, p in parents.items()}, execution=execution)


class StreamingMerge:
    """One streaming merge into the working folder ``work`` (its plan's; see the module docstring);
    :meth:`run` does it."""

    def __init__(self, work: WorkingFolder, parents: dict[str, RemoteParent], *, token: str | None = None,
                 progress: Callable[[int], None] | None = None, gate: StreamGate | None = None) -> None:
        plan = work.plan
        self.work, self.plan, self.parents, self.token, self.gate = work, plan, parents, token, gate
        self.spec = plan.spec
        self.repo_id: str = plan.spec.push_to_hub  # type: ignore[assignment]
        self.spool_dir = work.folder("spool")
        self.spools: list[tuple[ShardPlan, ShardSpool]] = [spool_shard(s, self.spool_dir)
                                                           for s in plan.shards]
        # a tied head's table, kept for the evaluation's end, and where the evaluation stands: held
        # once for the whole run, beside however many shards are in flight
        held = gate.tied_bytes + gate.point_bytes if gate else 0
        shard = max((sp.disk_bytes for _, sp in self.spools), default=0)
        need = shard + held
        self.budget = DiskBudget(plan.spec.disk_budget or STREAM_SHARDS_IN_FLIGHT * shard + held)
        if gate is not None:
            gate.use_budget(self.budget)
        if self.budget.limit < need:
            raise ConfigError(f"method.disk_budget: {format_bytes(self.budget.limit)} is less than one "
                              f"output shard needs in flight ({format_bytes(need)}: its inputs and itself); "
                              "raise method.disk_budget or lower method.max_shard_size")
        self.hashes = ParentHashes(parents)
        self.connections = Connections(plan.spec.connections, PIECE_BYTES)  # auto learns it for every shard
        self.stats = StreamStats()
        self._error: BaseException | None = None
        self._ready: queue.Queue = queue.Queue()
        self._uploads: queue.Queue = queue.Queue()
        self._progress = progress
        self.uploaded: set[int] = set()
        self.merged: dict[int, ShardRecord] = {}
        self.spot: dict[int, list[SpotTensor]] = {}  #: each merged shard's spot re-computations
        self._hashes_lock = threading.Lock()
        #: the hashes' progress when each shard's bytes were all fetched, until the shard is merged
        self._hashed_after: dict[int, dict] = {}
        self._started: dict[int, float] = {}  # when each shard's fetch started (perf_counter)
        self._last_spooled = 0.0  # when the last shard's fetch finished
        #: the same, for each merged shard the gate has not gone past (:meth:`_save_gate_point`)
        self._hashed_for_gate: dict[int, dict] = {}
        self._point_bytes = 0
        if gate is not None:
            gate.on_point = self._save_gate_point

    # ---------------------------------------------------------------- the whole merge

    def run(self, started: float) -> MergeResult:
        plan = self.plan
        ensure_repo(self.repo_id, private=self.spec.private, token=self.token)
        self.uploaded, self.merged = uploaded, merged = self._resume_state()
        if self.gate is not None and (uploaded or merged):
            self.uploaded, self.merged = uploaded, merged = self._resume_gate(uploaded, merged)
        elif uploaded or merged:
            self._take_up_hashes()
        self.stats.reused, self.stats.uploaded_only = len(uploaded), len(merged)
        step(f"clear {plan.partial.name}/spool")
        kept = self._clear_spool(uploaded | merged.keys())
        _check_free_disk(plan.partial, self.budget.limit)
        log.info("streaming %d output shard(s) (%s) to %s within a disk budget of %s; %d already uploaded, "
                 "%d merged and waiting to upload", len(plan.shards), format_bytes(plan.total_bytes),
                 self.repo_id, format_bytes(self.budget.limit), len(uploaded), len(merged))
        self.spool_dir.mkdir(exist_ok=True)
        if kept:
            log.info("%d shard(s)' parent bytes are on disk from the last run: not fetched again", len(kept))
        done = uploaded | merged.keys()
        fetcher = threading.Thread(target=self._guard, args=(self._fetch_all, done),
                                   name="stream-fetch", daemon=True)
        uploaders = [threading.Thread(target=self._guard, args=(self._upload_all,), name=f"stream-upload-{i}",
                                      daemon=True) for i in range(UPLOADS_IN_FLIGHT)]
        for index, record in sorted(merged.items()):  # on disk already: held before anything else may
            self.budget.hold(self.spools[index][1].output_bytes)  # take the budget
            self._uploads.put((index, record))
        fetcher.start()
        for uploader in uploaders:
            uploader.start()
        if self.gate is not None:
            self.gate.start()
        try:
            self._merge_all(skip=done)
        except BaseException as e:
            self._fail(e)
        finally:
            for _ in range(UPLOADS_IN_FLIGHT):
                self._uploads.put(_DONE)
            if not isinstance(self._error, KeyboardInterrupt):  # Ctrl-C: exit now; the journal is safe
                fetcher.join()
                for uploader in uploaders:
                    uploader.join()
                if self.gate is not None and self._error is not None:
                    self.gate.join()  # closed by _fail
        if self._error is not None:
            raise self._error
        try:
            self.hashes.verify()
        except HubIntegrityError:
            log.error("discarding %s: its shards were merged from bytes that do not match the Hub",
                      plan.partial)
            self.work.remove()
            raise
        return self._publish(started)

    def _guard(self, fn: Callable, *args: object) -> None:
        try:
            fn(*args)
        except BaseException as e:
            self._fail(e)

    def _stopped(self) -> bool:
        return self._error is not None

    def _fail(self, e: BaseException) -> None:
        if self._error is None:
            self._error = e
        self.budget.close()
        if self.gate is not None:
            self.gate.close()
        self._ready.put(_DONE)

    # ---------------------------------------------------------------- resume

    def _resume_state(self) -> tuple[set[int], dict[int, ShardRecord]]:
        """Shards an earlier run uploaded (and the Hub still holds), and the records of shards it
        merged but did not upload (their files verified)."""
        records = {}
        for shard in self.plan.shards:
            doc = self.work.record(_upload_record(shard))
            if doc and doc.get("repo_id") == self.repo_id:
                records[shard.index] = (doc["sha256"], int(doc["size"]))
        present = lfs_present(self.repo_id, set(records.values()), token=self.token) if records else set()
        uploaded = {i for i, (sha, _) in records.items() if sha in present}
        merged = {}
        for shard in self.plan.shards:
            outcome = None if shard.index in uploaded else self.work.outcome(shard, verify=True)
            if outcome is not None:
                merged[shard.index] = outcome.record
        return uploaded, merged

    def _resume_gate(self, uploaded: set[int], merged: dict[int, ShardRecord]
                     ) -> tuple[set[int], dict[int, ShardRecord]]:
        """What a gated run takes up: the shards before the gate's saved point (when every one of
        them is uploaded or merged), with the evaluation's and the hashes' progress; otherwise
        nothing (every shard is merged and evaluated again)."""
        assert self.gate is not None
        saved = load_point(self.work, self.gate.roles, self._point_identity())
        if saved is not None and not set(range(saved.point.shard)) <= uploaded | merged.keys():
            saved = None
        try:
            if saved is not None:
                self.gate.resume(saved.point)
        except ValueError as e:
            log.warning("the gate's saved point does not fit this merge (%s)", e)
            saved = None
        clear_unused(self.work, saved)
        shard = saved.point.shard if saved is not None else 0
        for index in merged:  # merged again: their files go now, not when overwritten
            if index >= shard:
                self.work.forget(self.plan.shards[index])
        if saved is None:
            log.info("the gate evaluates every shard: the %d shard(s) an earlier run merged are merged again "
                     "(no saved point of its evaluation could be used); the Hub keeps those already uploaded",
                     len(uploaded) + len(merged))
            return set(), {}
        self._point_bytes = saved_point_bytes(self.work)
        self.budget.hold(self._point_bytes)
        taken = self.hashes.restore(saved.hashes)
        self.spot = dict(saved.spot)
        layers = sorted({r.layer + 1 for r in saved.point.reached.values()})
        log.info("the gate goes on after decoder layer %s: shards 1-%d are not fetched or merged again "
                 "(%s of the parents' bytes hashed already)", "/".join(map(str, layers)), shard,
                 format_bytes(taken))
        return ({i for i in uploaded if i < shard}, {i: r for i, r in merged.items() if i < shard})

    def _point_identity(self) -> dict[str, str]:
        """What a saved point must match: the parents' commits and the evaluation's tokens."""
        assert self.gate is not None
        return {**{r: p.commit for r, p in self.parents.items()}, "tokens": self.gate.identity}

    def _save_gate_point(self, point: GatePoint) -> bool:
        """Save where the gate's evaluation stands (on the gate's thread), with the hashes' progress
        after the shard before it; a point that cannot be saved costs a resumed run work, nothing else."""
        with self._hashes_lock:
            hashes = self._hashed_for_gate.get(point.shard - 1)
            for index in [i for i in self._hashed_for_gate if i < point.shard - 1]:
                del self._hashed_for_gate[index]
        if hashes is None:
            return False
        spot = {i: t for i, t in dict(self.spot).items() if i < point.shard}  # a copy: the merge adds to it
        try:
            size = save_point(self.work, point, hashes=hashes, spot=spot, identity=self._point_identity())
        except (OSError, ValueError, RuntimeError) as e:
            log.warning("could not save how far the gate went: %s", e)
            return False
        self.budget.hold(size)
        self.budget.give(self._point_bytes)
        self._point_bytes = size
        log.debug("gate: a resumed run goes on from shard %d", point.shard + 1)
        return True

    def _clear_spool(self, done: set[int]) -> set[int]:
        """Delete what a stopped run left in the spool but the spools of shards still to merge:
        complete ones (:func:`~.spool.mark_complete`) and those part-filled with a pieces log
        (:func:`~.spool.partial_files`); returns the indices of the complete ones."""
        kept = {sp.index for _, sp in self.spools
                if sp.index not in done and is_complete(sp, self.plan.fingerprint)}
        keep = {p for _, sp in self.spools if sp.index in kept for p in (*sp.files.values(), sp.marker)}
        keep |= {p for _, sp in self.spools if sp.index not in done and sp.index not in kept
                 for p in partial_files(sp, self.plan.fingerprint)}  # fetches a stopped run had begun
        if self.spool_dir.is_dir():  # inside our marked working folder
            for path in self.spool_dir.iterdir():
                if path not in keep:
                    path.unlink()
        return kept

    def _save_hashes(self, index: int) -> None:
        """The parents' hashing progress as it stood when shard ``index``'s bytes were all fetched
        (no byte of a later shard in it), kept with the journal once that shard is merged, so that a
        resumed run fetches only the bytes of the shards it still merges (:meth:`_take_up_hashes`)."""
        snapshot = self._hashed_after.pop(index, None)
        if snapshot is None:
            return
        if self.gate is not None:
            with self._hashes_lock:
                self._hashed_for_gate[index] = snapshot
        commits = {role: p.commit for role, p in self.parents.items()}
        with self._hashes_lock:
            try:
                self.work.save_record(HASHES_RECORD, {"commits": commits, "files": snapshot},
                                      crash_points=False)
            except OSError as e:  # costs a resumed run the bytes, nothing else
                log.warning("could not save the parents' hashing progress: %s", e)

    def _take_up_hashes(self) -> None:
        doc = self.work.record(HASHES_RECORD)
        commits = {r: p.commit for r, p in self.parents.items()}
        if not doc or doc.get("commits") != commits:
            return
        taken = self.hashes.restore(doc.get("files"))
        total = sum(p.weight_bytes for p in self.parents.values())
        log.info("the parents' hashes go on from where the last run left them: %s of %s hashed already, "
                 "not fetched again", format_bytes(taken), format_bytes(total))

    def _fetched(self) -> int:
        return sum(p.reader.bytes_read for p in self.parents.values())

    # ---------------------------------------------------------------- the three stages

    def _fetch_all(self, skip: set[int]) -> None:
        """Fill the spool of each shard to merge, in order, as the budget allows (the next shard's
        GETs start while the last ones of the shard before are in flight); the others' bytes are
        fetched only to hash the parents in order."""
        before = self._fetched()
        try:
            with ShardFetches(self.parents, self.hashes, connections=self.connections, stop=self._stopped,
                              key=self.plan.fingerprint) as fetches:
                for _, spool in self.spools:
                    write = spool.index not in skip
                    if write and not self._take(fetches, spool):
                        return
                    if write and not is_complete(spool, self.plan.fingerprint):
                        self._started[spool.index] = time.perf_counter()
                        fetches.start(spool)
                        continue
                    while fetches.pending:  # what follows hashes in order: the shards before first
                        fetches.finish(self._spooled)
                    self._hash_in_order(spool, write)
                    if self._error is not None:
                        return
                while fetches.pending:
                    fetches.finish(self._spooled)
        finally:
            self.stats.bytes_fetched += self._fetched() - before

    def _take(self, fetches: ShardFetches, spool: ShardSpool) -> bool:
        """Hold the budget for ``spool``'s shard. A shard still in flight is finished (handed to the
        merge) first when the budget has no room beside it, as its merge is what frees the room.
        False once the merge stopped."""
        if fetches.pending == SHARDS_AT_ONCE:
            fetches.finish(self._spooled)
        if fetches.pending and self.budget.try_take(spool.disk_bytes):
            return True
        while fetches.pending:
            fetches.finish(self._spooled)
        return self.budget.take(spool.disk_bytes)

    def _hash_in_order(self, spool: ShardSpool, write: bool) -> None:
        """Hash the parents' bytes of a shard not fetched now: from the spool files a stopped run
        filled, or (a shard this run does not merge) by one GET per file."""
        if write:
            for role in ROLES:
                hash_spooled(spool, role, self.hashes)
        else:  # both parents at once
            with ThreadPoolExecutor(len(ROLES), thread_name_prefix="stream-hash") as pool:
                for f in [pool.submit(fetch_spool, spool, role, self.parents[role], self.hashes, write=False,
                                      stop=self._stopped) for role in ROLES]:
                    f.result()
        self._hashed_after[spool.index] = self.hashes.snapshot()
        if write:
            self._ready.put(spool.index)

    def _spooled(self, spool: ShardSpool) -> None:
        """A shard's spool is filled and its bytes hashed (no byte of a later shard yet): mark it,
        keep the hashes' snapshot and hand it to the merge."""
        mark_complete(spool, self.plan.fingerprint)
        self._hashed_after[spool.index] = self.hashes.snapshot()
        now = time.perf_counter()
        seconds = now - max(self._started.pop(spool.index), self._last_spooled)  # time it had the link
        self._last_spooled = now
        log.info("shard %d/%d: fetched %s of parent bytes in %.1f s (%s/s)", spool.index + 1,
                 len(self.spools), format_bytes(spool.input_bytes), seconds,
                 format_bytes(spool.input_bytes / max(seconds, 1e-9)))
        self._ready.put(spool.index)

    def _merge_all(self, skip: set[int]) -> None:
        threads = self.spec.threads
        if self.gate is not None:
            threads = threads_beside_evaluation(threads, self.spec.norm_precision)
        with compute_threads(self.plan.device, threads) as threads:
            log.info("merging on %s with %d compute thread(s)", self.plan.device, threads)
            self._merge_shards(skip)

    def _merge_shards(self, skip: set[int]) -> None:
        for shard, spool in self.spools:
            if shard.index in skip:
                if self._progress:
                    self._progress(shard.nbytes)
                continue
            index = self._ready.get()
            if index is _DONE or self._error is not None:
                return
            assert index == shard.index
            with TensorReader(direct=self.spec.direct_io) as reader:
                outcome = ShardMerge(self.work, shard, reader, progress=self._progress).run()
            self._spot_check(shard, spool, outcome)
            self._save_hashes(shard.index)
            done = functools.partial(self._spool_done, spool)
            if self.gate is None or not self.gate.evaluates_parents:
                done()
            if self.gate is not None:
                self.gate.submit(shard, shard, self.work.shard_path(shard),
                                 done if self.gate.evaluates_parents else None)
            self._uploads.put((shard.index, outcome.record))

    def _spool_done(self, spool: ShardSpool) -> None:
        spool.remove()
        self.budget.give(spool.input_bytes)

    def _spot_check(self, shard: ShardPlan, spool: ShardSpool, outcome: ShardOutcome) -> None:
        """Recompute some of the shard's tensors from the spooled parent bytes, FusionBench's way
        (:mod:`slerp_plugin.validate.spot`), before it leaves: see :func:`spot_names`.

        Raises:
            ValidationGateError: a tensor differs (the shard is discarded, nothing is published).
        """
        from ..validate.spot import spot_check_tensors

        path = self.work.shard_path(shard)
        merged = Checkpoint(self.work.path, [path], {i.name: i for i in read_header(path)[0]})
        parents = {side: Checkpoint(self.spool_dir, [spool.files[role]],
                                    {j.name: (j.a if side == "a" else j.b) for j in shard.jobs})
                   for side, role in (("a", "model_1"), ("b", "model_2"))}
        names = spot_names(shard, seed=shard.index)
        result = spot_check_tensors({**parents, "m": merged}, outcome.tensors,
                                    self.spec.model_dump(mode="json"), names, seed=shard.index)
        if not result.passed:
            self.work.forget(shard)
            raise ValidationGateError(f"{shard.file}: spot re-computation failed: {result.problems[0]}; "
                                      "nothing was published")
        self.spot[shard.index] = result.tensors
        log.info("shard %d/%d %s: spot re-computation of %d tensor(s) passed", shard.index + 1,
                 len(self.spools), shard.file, len(names))

    def _upload_all(self) -> None:
        """Upload merged shards until the queue ends; :data:`UPLOADS_IN_FLIGHT` of these run at once."""
        while (item := self._uploads.get()) is not _DONE:
            if self._error is not None:
                continue
            index, record = item
            shard, spool = self.spools[index]
            path = self.work.shard_path(shard)
            t0 = time.perf_counter()
            step(f"upload {shard.file}")
            preupload(self.repo_id, path, shard.file, record.sha256, token=self.token)
            self.work.save_record(_upload_record(shard), {"repo_id": self.repo_id, "sha256": record.sha256,
                                                          "size": record.size})
            if self.gate is not None:
                self.gate.wait_evaluated(index)
            step(f"delete the uploaded {shard.file}")
            path.unlink()
            self.budget.give(spool.output_bytes)
            self.stats.bytes_uploaded += record.size
            seconds = time.perf_counter() - t0
            log.info("shard %d/%d %s: uploaded %s in %.1f s (%s/s) and deleted locally", index + 1,
                     len(self.spools), shard.file, format_bytes(record.size), seconds,
                     format_bytes(record.size / max(seconds, 1e-9)))

    # ---------------------------------------------------------------- publishing

    def _judge(self, meta: Path, manifest: Manifest) -> ValidationReport:
        """The gate's verdict as a report, written into ``meta`` beside the manifest; a failed one is
        recorded and nothing is published.

        Raises:
            ValidationGateError: the gate failed (``meta`` stays, in ``<output>.partial``).
        """
        from ..validate.report import REPORT_NAME, SpotResult, StructuralResult, ValidationReport

        assert self.gate is not None
        functional = self.gate.verdict()
        plan = self.plan
        report = ValidationReport(
            model=f"hf://{self.repo_id}",
            parents=[f"hf://{p.repo_id}@{p.commit}" for p in self.parents.values()],
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            passed=functional.status == "passed", summary="",
            structural=StructuralResult(passed=True, tensors=sum(len(s.jobs) for s in plan.shards)),
            spot=SpotResult(passed=True, tensors=[t for i in sorted(self.spot) for t in self.spot[i]]),
            functional=functional,
            timings={"functional_s": round(max((e.seconds for e in self.gate.evaluators), default=0.0), 3)})
        _add_report(meta, manifest, report)
        if report.passed:
            log.info("gate passed: %s", _gate_line(functional))
            return report
        path = meta / REPORT_NAME
        message = f"the gate failed: {_gate_line(functional)}; nothing was published (report: {path})"
        self.work.save_record(GATE_RECORD, {"passed": False, "message": message,
                                            "created_at": report.created_at})
        raise ValidationGateError(message)

    def _publish(self, started: float) -> MergeResult:
        from huggingface_hub import CommitOperationAdd

        plan = self.plan
        outcomes: list[ShardOutcome] = []
        for shard in plan.shards:
            outcome = self.work.outcome(shard, verify=False, local=False)
            if outcome is None:
                raise OutputWriteError(f"{plan.partial}: shard {shard.file} has no journal entry",
                                       path=plan.partial)
            outcome.reused = shard.index in self.uploaded or shard.index in self.merged
            outcomes.append(outcome)
        meta = self.work.folder("publish")
        step(f"create {plan.partial.name}/publish")
        shutil.rmtree(meta, ignore_errors=True)  # inside our marked working folder: an earlier attempt's
        meta.mkdir()
        self.stats.peak_disk, self.stats.disk_budget = self.budget.peak, self.budget.limit
        manifest = write_metadata(plan, meta, outcomes, self._input_records(), started, time.perf_counter(),
                                  extra_timings=self.stats.as_timings())
        report = self._judge(meta, manifest) if self.gate is not None else None
        operations = [uploaded_file(o.record.file, o.record.sha256, o.record.size) for o in outcomes]
        files = [f for f in sorted(meta.iterdir()) if f.is_file() and f.name != OUTPUT_MARKER]
        rewritten = public_files(meta, self.repo_id, files)  # no local path, host or user name
        operations += [CommitOperationAdd(path_in_repo=f.name, path_or_fileobj=rewritten.get(f.name, str(f)))
                       for f in files]
        step(f"commit to {self.repo_id}")
        upload = commit_uploaded(self.repo_id, operations, commit_message_for(meta), token=self.token)
        self.work.remove()
        self.stats.seconds = time.perf_counter() - started
        log.info("streamed %s to %s in %.1f s: %s fetched, %s uploaded, at most %s of disk held",
                 format_bytes(plan.total_bytes), self.repo_id, self.stats.seconds,
                 format_bytes(self.stats.bytes_fetched), format_bytes(self.stats.bytes_uploaded),
                 format_bytes(self.stats.peak_disk))
        return MergeResult(None, manifest, upload, report)

    def _input_records(self) -> dict[str, InputRecord]:
        records = {}
        refs = {"model_1": self.spec.model_1, "model_2": self.spec.model_2}
        for role, parent in self.parents.items():
            records[role] = InputRecord(
                ref=refs[role].ref, revision=refs[role].revision, commit=parent.commit,
                path=f"hf://{parent.repo_id}@{parent.commit}",
                files=[InputFile(name=f.name, size=f.size, sha256=f.sha256) for f in parent.files.values()])
        tok = self.plan.paths["tokenizer"]
        records["tokenizer"] = records["model_1"] if tok == self.parents["model_1"].folder else InputRecord(
            ref=self.spec.tokenizer_ref.ref, revision=self.spec.tokenizer_ref.revision, path=str(tok),
            files=[InputFile(name=f.name, size=f.stat().st_size)
                   for f in sorted(tok.iterdir()) if f.is_file()])
        return records


#: the record of a failed gate in the working folder's state
GATE_RECORD = "gate.json"
#: the parents' hashing progress (:meth:`StreamingMerge._save_hashes`), in the state folder
HASHES_RECORD = "parent-hashes.json"


def _upload_record(shard: ShardPlan) -> str:
    """The record of a shard uploaded to the Hub (its SHA-256, size and repo), beside its journal
    entry."""
    return f"shards/{shard.file}.hub.json"


def _gate_line(f: FunctionalResult) -> str:
    """The gate's figures in one line."""
    ppl = f.perplexity
    if f.problems and "merged" not in ppl:
        return f.problems[0]
    figures = ", ".join(f"{role} {ppl[role]:.3f}" for role in ("merged", "model_1", "model_2") if role in ppl)
    return f"perplexity {figures} (gate ≤ {f.threshold:.3f})" + (f": {f.problems[0]}" if f.problems else "")


def _add_report(meta: Path, manifest: Manifest, report: ValidationReport) -> None:
    """``validation.json`` / ``.txt`` beside the model, and the card's evaluation section."""
    from ..validate.branches import branch_result
    from ..validate.report import summarise, write_report

    report.branches = branch_result(manifest)
    report.summary = summarise(report)
    write_report(report, meta)
    f = report.functional
    if report.passed:
        step("write README.md")
        (meta / "README.md").write_text(render_model_card(manifest, evaluation={
            "perplexity": f.perplexity, "threshold": f.threshold, "margin": f.margin, "tokens": f.tokens,
            "eval_text": f.eval_text, "passed": report.passed}))


def spot_names(shard: ShardPlan, *, seed: int, sample: int = 1) -> list[str]:
    """The tensors of ``shard`` a streaming merge recomputes: its vocabulary tensors and ``sample``
    more chosen with ``seed`` (a few percent of a merge's work; see docs/performance.md)."""
    from ..validate.spot import pick_tensors

    return pick_tensors([j.name for j in shard.jobs], sample, seed)


def _check_free_disk(folder: Path, budget: int) -> None:
    """The budget fits in the free space, counting what the working folder holds already."""
    held = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    free = shutil.disk_usage(folder).free + held
    if free < budget:
        raise OutputWriteError(f"{folder}: {format_bytes(free)} free, but the disk budget is "
                               f"{format_bytes(budget)}; free space or lower method.disk_budget", path=folder)

