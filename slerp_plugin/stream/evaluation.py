"""The perplexity gate of a streaming merge, decided before anything is published.

The output shards are planned in the order the model runs
(:func:`~slerp_plugin.engine.plan.execution_order`).
As each shard is merged, a driver thread offers its tensors to the evaluators, one after the
other: the merged model (read from the shard just written) and each parent whose evaluation is not
in the cache (read from the spool the merge just read). Each evaluator
(:class:`~slerp_plugin.validate.fed.FedEvaluator`) is the layer-streamed model of ``slerp-merge
validate`` running its own forward on its own thread, each module as soon as its tensors are
offered. When every evaluator has gone as far as the shard takes it (tensors a later module still
reads copied aside), the shard's files may go: the merged shard once it is uploaded, the spool at
once. Only one evaluator computes at a time, so memory is one evaluator's blocks and
activations beside the merge's own.

At the end, the three perplexities are judged by the rule of ``slerp-merge validate``
(:func:`~slerp_plugin.validate.functional.judge`).

Whenever the evaluators have gone past another decoder layer, the gate hands the merge a
:class:`GatePoint`: each evaluator's last decoder layer output and copies kept aside, and the first
shard the evaluation still needs. A resumed merge gives it back (:meth:`StreamGate.resume`) and
neither fetches nor merges the shards before it.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..engine import MergePlan, ShardPlan
from ..errors import ValidationInputError, first_line
from ..io.safetensors import TensorInfo, read_header
from ..spec import MergeSpec
from ..validate.cache import EvaluationCache, evaluation_key
from ..validate.fed import FedEvaluator
from ..validate.functional import ROLES, EvalSettings, eval_tokens, judge
from ..validate.report import FunctionalResult, ModelEvaluation
from ..validate.streaming import LayerOutput, hidden_state_bytes
from ..validate.weights import FeedClosed
from .remote import RemoteParent
from .spool import DiskBudget

log = logging.getLogger(__name__)

_DONE = object()
#: the folder (in the working folder) of the copies the evaluators keep aside
ASIDE_DIR = "eval"
STREAMED_NOTE = "no completions: evaluated while streaming"


@dataclass
class _Shard:
    """A merged shard handed to the gate: where its tensors are for each evaluator."""

    index: int
    tensors: dict[str, dict[str, TensorInfo]]  #: role → name → where
    spool_done: Callable[[], None] | None  #: frees the spool once the parents are done with it


@dataclass
class GatePoint:
    """Where the gate's evaluation can go on from: ``shard`` is the first shard it still needs.

    ``reached``: each evaluator's last decoder layer output (role → layer, hidden states on the
    CPU); ``kept``: each evaluator's copies kept aside (role → name → where, SHA-256).
    """

    shard: int
    reached: dict[str, LayerOutput]
    kept: dict[str, dict[str, tuple[TensorInfo, str]]]


@dataclass
class StreamGate:
    """Evaluates a streaming merge (and its uncached parents) shard by shard; :meth:`verdict` judges.

    Args:
        plan: the merge's plan (shards in execution order).
        parents: the Hub parents (their config folders and listed files).
        settings: how the models are evaluated (those of ``slerp-merge validate``).
        margin: the gate's margin (``spec.gate_margin``).
        cache: where parents' evaluations are taken from and stored (None: not cached).
        budget: the merge's disk budget, charged for tensors copied aside.

    Raises:
        ValidationInputError: the tokenizer or a model's config cannot be read.
    """

    plan: MergePlan
    parents: dict[str, RemoteParent]
    settings: EvalSettings
    margin: float
    cache: EvaluationCache | None
    budget: DiskBudget
    evaluators: list[FedEvaluator] = field(default_factory=list)
    cached: dict[str, ModelEvaluation] = field(default_factory=dict)
    #: called on the gate's thread with each new :class:`GatePoint`; True once it is saved
    on_point: Callable[[GatePoint], bool] | None = None

    def __post_init__(self) -> None:
        self.device = self.plan.device
        self.dtype = None if self.settings.dtype == "auto" else getattr(torch, self.settings.dtype)
        _, self.ids = eval_tokens(self.plan.paths["tokenizer"], self.settings)
        self._keys = {role: self._cache_key(role) for role in ROLES}
        for role in ROLES:
            found = self.cache.get(self._keys[role]) if self.cache else None
            if found is not None:
                self.cached[role] = found.model_copy(update={"cached": True})
        jobs = [j for s in self.plan.shards for j in s.jobs]
        layouts = {"merged": {j.name: replace(j.a, dtype=j.out_dtype) for j in jobs},
                   "model_1": {j.name: j.a for j in jobs}, "model_2": {j.name: j.b for j in jobs}}
        folders = {"merged": self.plan.paths["model_1"], **{r: p.folder for r, p in self.parents.items()}}
        for role in ("merged", *(r for r in ROLES if r not in self.cached)):
            self.evaluators.append(FedEvaluator(role, folders[role], layouts[role], self.device, self.dtype,
                                                self.plan.partial / ASIDE_DIR, self.budget))
        self.error: BaseException | None = None
        self._shard_of = {j.name: s.index for s in self.plan.shards for j in s.jobs}
        self._point_shard = 0
        self._point_files: set[Path] = set()  # the copies kept aside the saved point names
        self._queue: queue.Queue = queue.Queue()
        self._evaluated = {s.index: threading.Event() for s in self.plan.shards}
        self._driver = threading.Thread(target=self._drive, name="stream-gate", daemon=True)
        log.info("gate: evaluating %s on %d tokens of %s as the shards are merged%s",
                 ", ".join(e.role for e in self.evaluators), self.ids.numel(), self.settings.text_name,
                 "".join(f"; {r} from the cache (perplexity {ev.perplexity:.4f})"
                         for r, ev in self.cached.items()))

    # ------------------------------------------------------------ set-up

    def _cache_key(self, role: str) -> str:
        content = self.parents[role].content_id
        s = self.settings
        return evaluation_key(None, self.ids, s.max_length, s.prompts, s.max_new_tokens, self.device.type,
                              s.dtype, s.generation_memory, content=content)

    @property
    def evaluates_parents(self) -> bool:
        """Whether a parent is evaluated from the spool (which then waits for it)."""
        return any(e.role != "merged" for e in self.evaluators)

    @property
    def tied_bytes(self) -> int:
        """Disk the tensors read by more than one module (a tied head) take once copied aside."""
        return sum(ev.tied_bytes for ev in self.evaluators)

    @property
    def point_bytes(self) -> int:
        """Disk the saved points take at most: each evaluator's hidden states, twice (a point is
        written before the one it replaces is deleted)."""
        return sum(_point_bytes(ev.model.hidden_bytes(int(self.ids.numel()), self.settings.max_length))
                   for ev in self.evaluators)

    def use_budget(self, budget: DiskBudget) -> None:
        """Count the copies kept aside in ``budget`` (the merge's)."""
        self.budget = budget
        for ev in self.evaluators:
            ev.account = budget

    @property
    def identity(self) -> str:
        """What a saved point must have been evaluated on: the tokens and their windows."""
        digest = hashlib.sha256(self.ids.numpy().tobytes()).hexdigest()
        return f"{digest}/{self.settings.max_length}"

    @property
    def roles(self) -> list[str]:
        """The models evaluated here (the others' evaluations come from the cache)."""
        return [ev.role for ev in self.evaluators]

    def resume(self, point: GatePoint) -> None:
        """Go on from an earlier run's ``point`` (before :meth:`start`): the shards before
        ``point.shard`` are not offered and count as evaluated.

        Raises:
            ValueError: the point does not fit an evaluator (nothing is changed then).
        """
        for ev in self.evaluators:
            ev.model.check_reached(point.reached[ev.role])
        for ev in self.evaluators:
            ev.resume(point.reached[ev.role], point.kept.get(ev.role, {}))
        for index in range(point.shard):
            self._evaluated[index].set()
        self._point_shard = point.shard
        self._point_files = _files(point)

    def start(self) -> None:
        for ev in self.evaluators:
            ev.resumable = self.on_point is not None
            ev.start(self.ids, self.settings.max_length)
        self._driver.start()

    # ------------------------------------------------------------ the merge's side

    def submit(self, shard: ShardPlan, spooled: ShardPlan, merged_file: Path,
               spool_done: Callable[[], None] | None) -> None:
        """``shard`` was merged into ``merged_file`` from the spool ``spooled`` reads; ``spool_done``
        (when given) is called once no evaluator needs the spool."""
        merged = {i.name: i for i in read_header(merged_file)[0]}
        tensors = {"merged": merged, "model_1": {j.name: j.a for j in spooled.jobs},
                   "model_2": {j.name: j.b for j in spooled.jobs}}
        self._queue.put(_Shard(shard.index, tensors, spool_done))

    def wait_evaluated(self, index: int) -> None:
        """Wait until the evaluators are done with shard ``index`` (its file may then go).

        Raises:
            BaseException: what stopped the gate.
        """
        self._evaluated[index].wait()
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Stop everything (the merge failed): waiting evaluators end, waiters wake."""
        if self.error is None:
            self.error = FeedClosed("the merge stopped")
        for ev in self.evaluators:
            ev.stop()
        for event in self._evaluated.values():
            event.set()
        self._queue.put(_DONE)

    def join(self) -> None:
        """Wait until the gate's thread has ended (after :meth:`close`): it then saves no point."""
        if self._driver.is_alive() and self._driver is not threading.current_thread():
            self._driver.join()

    # ------------------------------------------------------------ the threads

    def _drive(self) -> None:
        try:
            while (item := self._queue.get()) is not _DONE:
                for ev in self.evaluators:
                    ev.take(item.tensors[ev.role])
                self._offer_point()
                for ev in self.evaluators:
                    ev.release_dropped(self._point_files)
                if item.spool_done is not None:
                    item.spool_done()
                self._evaluated[item.index].set()
                log.debug("gate: shard %d evaluated", item.index + 1)
        except BaseException as e:
            self.error = self.error or e
            self.close()

    def _offer_point(self) -> None:
        """Hand a new :class:`GatePoint` to :attr:`on_point` if the evaluators went past another
        decoder layer (they all wait for the next shard now)."""
        if self.on_point is None:
            return
        reached = {ev.role: ev.reached for ev in self.evaluators}
        if any(r is None for r in reached.values()):
            return
        shard = min(self._first_needed(ev, reached[ev.role].layer) for ev in self.evaluators)  # type: ignore[union-attr]
        if shard <= self._point_shard:
            return
        point = GatePoint(shard, {role: LayerOutput(r.layer, r.hidden.cpu())  # type: ignore[union-attr]
                                  for role, r in reached.items()},
                          {ev.role: ev.kept for ev in self.evaluators})
        if self.on_point(point):
            self._point_shard, self._point_files = shard, _files(point)

    def _first_needed(self, ev: FedEvaluator, layer: int) -> int:
        """The first shard with a tensor ``ev`` reads after decoder layer ``layer`` (copies kept
        aside are read from there)."""
        kept = ev.kept
        needed = [k for k in ev.model.keys_after(layer) if k not in kept and k in self._shard_of]
        return min((self._shard_of[k] for k in needed), default=len(self.plan.shards))

    # ------------------------------------------------------------ the verdict

    def verdict(self) -> FunctionalResult:
        """Wait for every evaluator and judge (after the last shard was submitted).

        Raises:
            ValidationInputError: a parent could not be evaluated (nothing is judged).
            BaseException: what stopped the gate.
        """
        self._queue.put(_DONE)
        self._driver.join()
        for ev in self.evaluators:
            ev.close()  # an evaluator still waiting reads a tensor no shard holds
        if self.error is not None and not isinstance(self.error, FeedClosed):
            raise self.error
        evals = dict(self.cached)
        problems = []
        for ev in self.evaluators:
            why = ev.problem()
            if why is not None:
                if ev.role != "merged":
                    raise ValidationInputError(f"{ev.role} {self.parents[ev.role].repo_id}: cannot be "
                                               f"evaluated while streaming: {why}") from ev.error
                problems.append(f"the merged model cannot be evaluated: {why}")
                continue
            evals[ev.role] = ev.evaluation(STREAMED_NOTE)
        if problems:
            return FunctionalResult(status="failed", evaluations=evals, problems=problems,
                                    margin=self.margin, tokens=int(self.ids.numel()),
                                    eval_text=self.settings.text_name)
        self._store_parents(evals)
        return judge(evals, margin=self.margin, settings=self.settings, tokens=int(self.ids.numel()))

    def _store_parents(self, evals: dict[str, ModelEvaluation]) -> None:
        """Parents evaluated here go to the cache where ``validate`` would also give no completions."""
        if self.cache is None:
            return
        for ev in self.evaluators:
            if ev.role != "merged" and ev.model.weight_bytes > self.settings.generation_memory:
                self.cache.put(self._keys[ev.role], evals[ev.role])


def _files(point: GatePoint) -> set[Path]:
    """The copies kept aside that ``point`` names."""
    return {info.file for kept in point.kept.values() for info, _ in kept.values()}


def _point_bytes(hidden_bytes: int) -> int:
    """Disk one evaluator's saved points take at most: its hidden states and their record, twice (a
    point is written before the one it replaces is deleted)."""
    return 2 * (hidden_bytes + 4096)


def aside_estimate(spec: MergeSpec, config_file: Path) -> int:
    """The most disk a gated stream of ``spec`` keeps aside besides its shards, in bytes, told from
    model_1's ``config.json`` (no weights read): three evaluators (the merge and both parents, as
    when the parents' perplexities are not cached), each with a copy of a tied head's table
    (vocabulary × hidden size, in the config's dtype, else 2 bytes) and its saved points (hidden
    states in float32). What :attr:`StreamGate.tied_bytes` and :attr:`StreamGate.point_bytes` hold
    once the models are built. 0 without the gate.

    Raises:
        ValidationInputError: the config cannot be read.
    """
    if not spec.gate:
        return 0
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(config_file.parent)
    except Exception as e:  # transformers raises many types; the first line says what is wrong
        raise ValidationInputError(f"{config_file}: cannot be read: {first_line(e)}", path=config_file) from e
    text = config.get_text_config()
    hidden, vocab = int(getattr(text, "hidden_size", 0)), int(getattr(text, "vocab_size", 0))
    tied = bool(getattr(text, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False)))
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    itemsize = dtype.itemsize if isinstance(dtype, torch.dtype) else 2
    settings = EvalSettings(max_tokens=spec.gate_max_tokens)
    points = _point_bytes(hidden_state_bytes(hidden, settings.max_tokens, settings.max_length, 4))
    return 3 * ((vocab * hidden * itemsize if tied else 0) + points)
