"""Every t of a sweep evaluated in one read of the parents, without writing a model.

The merge is planned once, in the order the model runs (embeddings, each decoder layer, final
norm, head: :func:`~slerp_plugin.engine.plan.execution_order`), in small shards (a few decoder
layers, or one). The engine's own :class:`ShardMerge` reads each shard's parent bytes once and
merges the shard at every t in that one read (:meth:`ShardMerge.at_each_t`: the pass-1 sums
taken once, each t combined as a merge at that t alone would), each t into a work file of its own,
whose tensors are then handed to that t's evaluator (:class:`~slerp_plugin.validate.fed.FedEvaluator`:
the layer-streamed model of ``slerp-merge validate``, advancing that t's hidden states). A work
file is read once: it is neither hashed, fsynced, journalled nor kept, and a later work file is
written over its pages in the page cache (a new file would cost the system a page allocation
per 4 KB, about a second per GB on a small VM). The parents' own evaluators (when their
perplexity is not cached) find the shard's parent bytes in the page cache. Hub parents are read
by range as a streaming merge reads them: each shard's input bytes are fetched into a spool file
per parent (both parents at once, the next shard's while one is merged), and deleted once used;
at the end every parent file's SHA-256 is checked against the Hub's.

Disk: a work shard for each t merged at once (up to :data:`SWEEP_T_AT_ONCE`, or as many as
``method.disk_budget`` holds: :func:`t_at_once`; more t are merged a group at a time, each group
reading the shard's inputs again from the page cache or the spool), together about
:data:`SWEEP_WORK_BYTES` (or one layer each where a layer is larger than its share:
:func:`work_shard_bytes`), and for Hub parents the inputs of the shard and of the next. Memory: the
engine's block buffers, plus one set of hidden states per t.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..engine import MergePlan, ShardPlan
from ..engine.execute import MergeTarget, ShardMerge
from ..engine.plan import format_bytes
from ..engine.resources import compute_threads, threads_beside_evaluation
from ..engine.resume import WorkingFolder
from ..errors import ConfigError
from ..hub.connections import Connections
from ..io.reader import TensorReader
from ..io.safetensors import read_header
from ..stream.remote import RemoteParent
from ..stream.spool import PIECE_BYTES, SHARDS_AT_ONCE, ParentHashes, ShardFetches, spool_shard
from ..validate.fed import FedEvaluator
from ..validate.functional import EvalSettings
from ..validate.report import ModelEvaluation

log = logging.getLogger(__name__)

#: what the work shards of one shard at every t take together (and, for Hub parents, that shard's
#: and the next one's input bytes)
SWEEP_WORK_BYTES = 1 << 30
#: t values merged in one read of a shard's inputs (each has a work shard on disk meanwhile), unless
#: ``method.disk_budget`` says how many fit
SWEEP_T_AT_ONCE = 8
#: the largest work shard for Hub parents: nothing is merged before the first shard's bytes have
#: arrived, and the next shard's are fetched while one is merged, so smaller shards overlap more
SWEEP_HUB_SHARD_BYTES = 256 << 20
SWEPT_NOTE = "no completions: evaluated in a one-pass sweep"


@dataclass
class TResult:
    """What the pass found for one t."""

    t: float
    evaluation: ModelEvaluation | None  #: None: the merge could not be evaluated (see ``problem``)
    problem: str | None
    branch_counts: dict[str, int] = field(default_factory=dict)


@dataclass
class PassResult:
    """Every t's result, and the parents evaluated in the pass (by role)."""

    merges: list[TResult]
    parents: dict[str, ModelEvaluation]
    bytes_read: int
    seconds: float


def work_shard_bytes(count: int, hub: bool, budget: int | None = None) -> int:
    """The size (bytes) the sweep's merge of ``count`` t values is planned in: :data:`SWEEP_WORK_BYTES`
    (or ``budget``, ``method.disk_budget``, if smaller) shared by the work shards of the t merged at
    once (at most :data:`SWEEP_T_AT_ONCE`) and, for Hub parents, by the four spools of the shard's
    inputs and of the next shard's (at most :data:`SWEEP_HUB_SHARD_BYTES`). A decoder layer larger
    than this is one shard of its own."""
    total = min(SWEEP_WORK_BYTES, budget) if budget else SWEEP_WORK_BYTES
    share = max(1, total // (min(count, SWEEP_T_AT_ONCE) + (4 if hub else 0)))
    return min(share, SWEEP_HUB_SHARD_BYTES) if hub else share


def t_at_once(plan: MergePlan, count: int, hub: bool) -> int:
    """How many of ``count`` t values are merged in one read of each shard's inputs: up to
    :data:`SWEEP_T_AT_ONCE`, or as many work shards of ``plan``'s largest shard as
    ``method.disk_budget`` holds beside (for Hub parents) the inputs of two shards.

    Raises:
        ConfigError: ``method.disk_budget`` cannot hold one t's work shard (and those inputs).
    """
    budget = plan.spec.disk_budget
    if not budget or not plan.shards:
        return max(1, min(count, SWEEP_T_AT_ONCE))
    largest = max(s.nbytes for s in plan.shards)
    inputs = 2 * max(sum(j.a.nbytes + j.b.nbytes for j in s.jobs) for s in plan.shards) if hub else 0
    fits = (budget - inputs) // max(largest, 1)
    if fits < 1:
        raise ConfigError(f"method.disk_budget: {format_bytes(budget)} is less than a sweep needs for one t "
                          f"({format_bytes(largest + inputs)}: its largest work shard, a layer or tensor "
                          f"that is not split{', and the inputs of two shards' if hub else ''}); "
                          "raise method.disk_budget")
    return min(count, fits)


def at_t(shard: ShardPlan, t: float) -> ShardPlan:
    """``shard`` merged at ``t``."""
    return ShardPlan(shard.index, shard.file, [replace(j, t=t) for j in shard.jobs])


def plan_for_t(base: MergePlan, t: float, work: Path) -> MergePlan:
    """``base`` (a plan at a scalar t) at ``t``, writing into ``work/t-<t>.partial``."""
    spec = base.spec.model_copy(update={"t": t, "output": work / f"t-{t:g}"})
    shards = [at_t(s, t) for s in base.shards]
    return replace(base, spec=spec, shards=shards, fingerprint=f"{base.fingerprint}-t{t!r}")


class OnePass:
    """The pass over ``base``'s shards for every t of ``ts``.

    Args:
        base: the merge planned in execution order, at a scalar t, with buffered I/O.
        ts: the t values.
        work: a folder of this sweep's own for the work shards (emptied as it goes).
        settings: how the models are evaluated (``slerp-merge validate``'s settings).
        ids: the evaluation tokens.
        parents: the roles (``model_1``, ``model_2``) to evaluate in the pass as well.
        remote: the Hub parents ``base`` was planned from (:func:`~slerp_plugin.stream.open_remote`),
            read by range; None: ``base``'s parents are local files.
    """

    def __init__(self, base: MergePlan, ts: Sequence[float], work: Path, settings: EvalSettings,
                 ids: torch.Tensor, parents: Sequence[str] = (),
                 remote: Mapping[str, RemoteParent] | None = None) -> None:
        self.base, self.ids, self.settings, self.work = base, ids, settings, work
        self.remote = dict(remote) if remote else None
        self.hashes = ParentHashes(self.remote) if self.remote else None
        self.connections = Connections(self.base.spec.connections, PIECE_BYTES)
        self.plans = {t: plan_for_t(base, t, work) for t in ts}
        self.folders = {t: WorkingFolder(plan) for t, plan in self.plans.items()}
        self.device = base.device
        self.dtype = None if settings.dtype == "auto" else getattr(torch, settings.dtype)
        jobs = [j for s in base.shards for j in s.jobs]
        layouts = {"merged": {j.name: replace(j.a, dtype=j.out_dtype) for j in jobs},
                   "model_1": {j.name: j.a for j in jobs}, "model_2": {j.name: j.b for j in jobs}}
        aside = work / "aside"
        self.merged = {t: FedEvaluator(f"t={t:g}", base.paths["model_1"], layouts["merged"], self.device,
                                       self.dtype, aside) for t in ts}
        self.parents = {role: FedEvaluator(role, base.paths[role], layouts[role], self.device, self.dtype,
                                           aside) for role in parents}
        #: the parents' weights in the compute dtype (as ``validate`` counts them), by role
        self.parent_bytes = {role: ev.model.weight_bytes for role, ev in self.parents.items()}
        self.branches = {t: Counter[str]() for t in ts}
        #: the t values merged in one read of a shard's inputs
        size = t_at_once(base, len(ts), self.remote is not None)
        self.groups = [list(ts[i : i + size]) for i in range(0, len(ts), size)]
        #: by place in a group: the last work shard evaluated, whose page-cache pages the next one
        #: in that place is written over
        self.spares = [work / f"spare-{k}.safetensors" for k in range(size)]
        self.bytes_read = 0

    @property
    def evaluators(self) -> list[FedEvaluator]:
        return [*self.merged.values(), *self.parents.values()]

    def run(self, progress: Callable[[int], None] | None = None) -> PassResult:
        """Merge and evaluate every shard at every t; return what each evaluator found.

        Raises:
            CheckpointError: a parent's file is unreadable or truncated.
            OutputWriteError: a work shard cannot be written.
            HubError, HubIntegrityError: a Hub parent's bytes cannot be fetched, or do not match
                the Hub's SHA-256.
        """
        started = time.perf_counter()
        for folder in self.folders.values():
            folder.prepare(exclusive=True)
        try:
            spec = self.base.spec
            wanted = threads_beside_evaluation(spec.threads, spec.norm_precision)
            with compute_threads(self.device, wanted) as threads:
                log.info("sweep: %d t value(s), %d merged per read of a shard's inputs, over %d shard(s) "
                         "(%s per t) on %s with %d compute thread(s)%s", len(self.plans), len(self.spares),
                         len(self.base.shards), format_bytes(self.base.total_bytes), self.device, threads,
                         "; parents read by range from the Hub" if self.remote else "")
                for ev in self.evaluators:
                    ev.start(self.ids, self.settings.max_length)
                with contextlib.closing(self._with_inputs()) as shards:
                    for i, (shard, waited) in enumerate(shards):
                        self._shard(i, shard, waited, progress)
            if self.hashes is not None:
                self.hashes.verify()
        finally:
            for ev in self.evaluators:
                ev.close()
            for spare in self.spares:
                spare.unlink(missing_ok=True)
        return PassResult(
            merges=[TResult(t, *self._outcome(ev), dict(self.branches[t])) for t, ev in self.merged.items()],
            parents={role: self._parent(role, ev) for role, ev in self.parents.items()},
            bytes_read=self.bytes_read, seconds=time.perf_counter() - started)

    def _shard(self, i: int, shard: ShardPlan, waited: float,
               progress: Callable[[int], None] | None) -> None:
        started = time.perf_counter()
        for n, group in enumerate(self.groups):
            targets = [MergeTarget(self.folders[t], at_t(shard, t), scratch=spare)
                       for t, spare in zip(group, self.spares, strict=False)]
            with TensorReader(direct=False) as reader:
                outcomes = ShardMerge.at_each_t(targets, reader).run_each()
            if n == 0:  # the other groups find the inputs in the page cache (or the spool)
                self.bytes_read += outcomes[0].bytes_read
            for t, target, outcome, spare in zip(group, targets, outcomes, self.spares, strict=False):
                self.branches[t].update(r.branch for r in outcome.tensors)
                path = target.work.shard_path(target.shard)
                self.merged[t].take({info.name: info for info in read_header(path)[0]})
                path.replace(spare)  # the next work shard in this place is written over its pages
                if progress:
                    progress(shard.nbytes)
        for role, ev in self.parents.items():
            ev.take({j.name: (j.a if role == "model_1" else j.b) for j in shard.jobs})
        note = f" (its parents' bytes waited for {waited:.1f} s)" if self.remote else ""
        log.info("sweep: shard %d/%d (%d tensors, %s) merged and evaluated at %d t in %.1f s%s", i + 1,
                 len(self.base.shards), len(shard.jobs), format_bytes(shard.nbytes), len(self.plans),
                 time.perf_counter() - started, note)

    def _with_inputs(self) -> Iterator[tuple[ShardPlan, float]]:
        """Each shard with the seconds spent waiting for its inputs: ``base``'s shards as they are
        (local parents), or read from spool files their Hub bytes are fetched into, both parents at
        once, the next shard's while this one is merged (:class:`~slerp_plugin.stream.spool.ShardFetches`);
        each shard's spool is deleted once it has been used. Close it to stop the fetches."""
        if self.remote is None:
            for shard in self.base.shards:
                yield shard, 0.0
            return
        folder = self.work / "spool"
        folder.mkdir(exist_ok=True)
        spools = [spool_shard(shard, folder) for shard in self.base.shards]
        started = 0
        try:
            assert self.hashes is not None  # made with the remote parents
            with ShardFetches(self.remote, self.hashes, connections=self.connections) as fetches:
                for spooled, spool in spools:
                    while started < len(spools) and fetches.pending < SHARDS_AT_ONCE:
                        fetches.start(spools[started][1])
                        started += 1
                    waiting = time.perf_counter()
                    fetches.finish()
                    try:
                        yield spooled, time.perf_counter() - waiting
                    finally:
                        spool.remove()
        finally:
            for _, spool in spools[:started]:  # those started and not used: the fetches have ended
                spool.remove()

    @staticmethod
    def _outcome(ev: FedEvaluator) -> tuple[ModelEvaluation | None, str | None]:
        problem = ev.problem()
        return (None, problem) if problem is not None else (ev.evaluation(SWEPT_NOTE), None)

    def _parent(self, role: str, ev: FedEvaluator) -> ModelEvaluation:
        from ..errors import ValidationInputError

        problem = ev.problem()
        if problem is not None:
            raise ValidationInputError(f"{role} {self.base.paths[role]}: cannot be evaluated: {problem}")
        return ev.evaluation(SWEPT_NOTE)
