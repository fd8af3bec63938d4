"""The plan of a merge: which tensors go into which output shard, in which order, with which t.

:func:`plan_resolved` reads only the parents' headers. Key rules follow FusionBench: a name missing on
either side is an error naming the names; a shape mismatch keeps model_1's tensor (warning,
``shape-kept``) or, on the mergekit path, is an error. The plan's fingerprint identifies inputs,
options and shard layout, so an interrupted merge is resumed only by the same plan.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch

from ..errors import CheckpointError, KeyMismatchError, ShapeMismatchError
from ..io.model_files import TOKENIZER_FILES, ResolvedModel, local_model
from ..io.safetensors import Checkpoint, OutputTensor, TensorInfo, dtype_name
from ..spec import MergeSpec
from .output import already_merged, check_output, output_path, partial_path, refuse_existing
from .resources import resolve_device

log = logging.getLogger(__name__)

KERNEL_VERSION = 1
#: tensors whose first axis is the vocabulary
VOCAB_TENSOR_NAMES = ("embed_tokens", "lm_head", "wte", "embed_in", "embed_out", "word_embeddings")
ROLES = ("model_1", "model_2", "tokenizer")
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: merge ``a`` (model_1) with ``b`` (model_2), or keep ``a``."""

    name: str
    action: Literal["merge", "keep"]
    a: TensorInfo
    b: TensorInfo
    out_dtype: str
    t: float

    @property
    def output(self) -> OutputTensor:
        return OutputTensor(self.name, self.out_dtype, self.a.shape)


@dataclass
class ShardPlan:
    """One output shard: its file name and tensors, in write order."""

    index: int
    file: str
    jobs: list[TensorJob]

    @property
    def nbytes(self) -> int:
        return sum(j.output.nbytes for j in self.jobs)


@dataclass(frozen=True)
class MergePlan:
    """What :func:`plan_resolved` decided; input to :func:`~slerp_plugin.engine.merge_shards` and
    :func:`~slerp_plugin.engine.finalize`. ``paths`` and ``commits`` are by role (``model_1``,
    ``model_2``, ``tokenizer``); ``known_hashes`` are input checksums the Hub vouched for."""

    spec: MergeSpec
    paths: dict[str, Path]
    checkpoints: dict[str, Checkpoint]
    shards: list[ShardPlan]
    device: torch.device
    fingerprint: str
    warnings: list[str] = field(default_factory=list)
    commits: dict[str, str | None] = field(default_factory=dict)
    known_hashes: dict[Path, str] = field(default_factory=dict)
    finished_earlier: bool = False
    """``<output>`` already holds this very merge: an earlier run finished it (a re-run after a
    crash just past the final rename, or an Airflow retry); nothing is merged again."""

    @property
    def output(self) -> Path:
        return output_path(self.spec)

    @property
    def partial(self) -> Path:
        """Where the output is built: ``<output>.partial``, renamed to ``<output>`` when complete."""
        return partial_path(self.output)

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.shards)


def plan_resolved(spec: MergeSpec, resolved: Mapping[str, ResolvedModel] | None = None, *,
                  execution: bool = False) -> MergePlan:
    """Read the inputs' headers, check their tensor names, and split the output into shards: the
    planning step of :func:`slerp_plugin.merge.plan_merge` once every input is on local disk.

    ``resolved`` gives inputs already fetched (e.g. downloaded from the Hub) by role; the others
    must be local folders. ``execution``: shards in the order the model runs (see
    :func:`plan_checkpoints`).

    Raises:
        ModelNotFoundError: an input that is not given is not a local folder.
        CheckpointError: missing/corrupt weights, config or tokenizer files.
        KeyMismatchError: the models hold different tensor names.
        ShapeMismatchError: shapes differ and ``spec.on_shape_mismatch`` is ``error``.
        OutputExistsError: the destination exists (and is not an earlier merge to overwrite) or
            overlaps an input.
        ConfigError: ``cuda`` asked for but absent; a t schedule that matches no tensor.
    """
    inputs = _resolve_locally(spec, resolved or {})
    paths = {role: r.path for role, r in inputs.items()}
    finished = check_output(spec, paths, allow_finished=True)
    if not (paths["model_1"] / "config.json").is_file():
        raise CheckpointError(f"{paths['model_1']}: no config.json (not a transformers model folder)",
                              path=paths["model_1"])
    if not any((paths["tokenizer"] / f).is_file() for f in TOKENIZER_FILES):
        raise CheckpointError(f"tokenizer: no tokenizer files in {paths['tokenizer']}",
                              path=paths["tokenizer"])
    ckpts = {role: Checkpoint.open(paths[role]) for role in ("model_1", "model_2")}
    identity = []
    for role, ck in ckpts.items():
        for f in ck.files:
            st = f.stat()
            identity.append([role, str(f), st.st_size, st.st_mtime_ns])
    plan = plan_checkpoints(spec, paths, ckpts, identity,
                            commits={role: r.commit for role, r in inputs.items()},
                            known_hashes={p: h for r in inputs.values() for p, h in r.hashes.items()},
                            execution=execution)
    if finished:
        if not already_merged(plan):
            refuse_existing(plan.output)
        log.info("%s already holds this merge (an earlier run finished it)", plan.output)
        plan = replace(plan, finished_earlier=True)
    return plan


def plan_checkpoints(
    spec: MergeSpec,
    paths: dict[str, Path],
    ckpts: dict[str, Checkpoint],
    identity: list,
    *,
    commits: dict[str, str | None] | None = None,
    known_hashes: dict[Path, str] | None = None,
    execution: bool = False,
) -> MergePlan:
    """The plan of merging ``ckpts`` (by role) whose configs and tokenizer are in ``paths``.

    ``identity`` is JSON that changes whenever an input's bytes may have (paths, sizes, mtimes;
    Hub commits): it goes into the plan's fingerprint, which decides what a re-run may reuse.

    With ``execution``, output shards follow the order the model runs (:func:`execution_order`), so
    that a streaming merge can evaluate each shard as it is merged.

    Raises:
        KeyMismatchError, ShapeMismatchError, ConfigError: as :func:`plan_resolved`.
    """
    _check_keys(ckpts["model_1"], ckpts["model_2"], spec.model_names)
    device = resolve_device(spec.device)
    jobs, warnings = plan_jobs(spec, ckpts["model_1"], ckpts["model_2"], num_layers(paths["model_1"]))
    shards = _split_shards(jobs, spec.max_shard_size, execution=execution)
    fingerprint = _fingerprint(spec, identity, device, shards)
    plan = MergePlan(spec, paths, ckpts, shards, device, fingerprint, warnings,
                     commits=dict(commits or {}), known_hashes=dict(known_hashes or {}))
    log.info("planned %d tensors (%s) into %d output shard(s) at %s; device %s",
             len(jobs), format_bytes(plan.total_bytes), len(shards), plan.output, device)
    return plan


def _resolve_locally(spec: MergeSpec, resolved: Mapping[str, ResolvedModel]) -> dict[str, ResolvedModel]:
    inputs = dict(resolved)
    for role, ref, name in (("model_1", spec.model_1, spec.model_names[0]),
                            ("model_2", spec.model_2, spec.model_names[1])):
        if role not in inputs:
            inputs[role] = local_model(ref, name)
    if "tokenizer" not in inputs:
        same = spec.tokenizer_ref == spec.model_1
        inputs["tokenizer"] = inputs["model_1"] if same else local_model(spec.tokenizer_ref, "tokenizer")
    return inputs


def plan_jobs(
    spec: MergeSpec, c1: Checkpoint, c2: Checkpoint, num_layers: int
) -> tuple[list[TensorJob], list[str]]:
    """One job per tensor of model_1 (in its order), and the warnings of kept tensors.

    Raises:
        ShapeMismatchError: shapes differ and ``spec.on_shape_mismatch`` is ``error``.
        ConfigError: a t schedule that matches no tensor.
    """
    jobs: list[TensorJob] = []
    warnings: list[str] = []
    for name, a in c1.tensors.items():
        b = c2.tensors[name]
        out_dtype = dtype_name(spec.stored_dtype) if spec.stored_dtype else a.dtype
        t = spec.t_for(name, layer_fraction(name, num_layers))
        if a.shape == b.shape:
            jobs.append(TensorJob(name, "merge", a, b, out_dtype, t))
            continue
        if spec.on_shape_mismatch == "error":
            raise ShapeMismatchError(_mismatch_message(name, a, b, spec.model_names), tensor=name)
        msg = (f"{name}: shapes differ ({list(a.shape)} vs {list(b.shape)}); "
               f"{spec.model_names[0]}'s tensor kept")
        log.warning(msg)
        warnings.append(msg)
        jobs.append(TensorJob(name, "keep", a, b, out_dtype, t))
    return jobs, warnings


def num_layers(folder: Path) -> int:
    """The model's layer count from its ``config.json`` (0 where it cannot be told)."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return 0
    if not isinstance(cfg, dict):
        return 0
    for node in (cfg, cfg.get("text_config") or {}):
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(node, dict) and isinstance(node.get(key), int):
                return node[key]
    return 0


def layer_fraction(tensor_name: str, num_layers: int) -> float:
    """mergekit's gradient position of a tensor: ``i / (layers − 1)`` in layer ``i``; 0 outside
    the layers (embeddings, final norm, lm_head) and for single-layer models."""
    m = _LAYER.search(tensor_name)
    if not m or num_layers <= 1:
        return 0.0
    return int(m.group(1)) / (num_layers - 1)


def _mismatch_message(name: str, a: TensorInfo, b: TensorInfo, names: Sequence[str]) -> str:
    shapes = f"{names[0]} {list(a.shape)} vs {names[1]} {list(b.shape)}"
    if any(v in name for v in VOCAB_TENSOR_NAMES):
        return (
            f"{name}: the vocabularies differ ({shapes}); merging them row by row would mix "
            "unrelated tokens. Align them first, e.g. run mergekit-yaml with "
            "`tokenizer_source: base` (it re-maps embeddings), or merge models that share a tokenizer"
        )
    return f"{name}: shapes differ ({shapes}); these models cannot be merged tensor by tensor"


def _check_keys(c1: Checkpoint, c2: Checkpoint, names: Sequence[str]) -> None:
    only_2 = [k for k in c2.tensors if k not in c1.tensors]
    only_1 = [k for k in c1.tensors if k not in c2.tensors]
    if only_2 or only_1:
        parts = []
        if only_2:
            parts.append(f"{len(only_2)} only in {names[1]}: {_some(only_2)}")
        if only_1:
            parts.append(f"{len(only_1)} only in {names[0]}: {_some(only_1)}")
        raise KeyMismatchError("the models hold different tensors: " + "; ".join(parts))


def _some(keys: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... (+{len(keys) - n})" if len(keys) > n else "")


#: names of the tensors a causal LM reads before its first layer (input embeddings)
_INPUT_EMBEDDING = re.compile(r"embed_tokens|(?:^|\.)(?:wte|wpe|embed_in|word_embeddings|tok_embeddings|"
                              r"embed_positions|position_embeddings)\.")
#: ... and after its final norm (the head)
_HEAD = re.compile(r"(?:^|\.)(?:lm_head|embed_out|output)\.")


def execution_order(jobs: list[TensorJob]) -> list[list[TensorJob]]:
    """``jobs`` in the order the model runs, as units that an output shard keeps together: the
    input embeddings (one unit per tensor), each decoder layer by its index (``layers.10`` after
    ``layers.2``, one unit per layer), the other tensors (final norm), then the head; within a
    unit, model_1's order."""
    layers: dict[int, list[TensorJob]] = {}
    before, after, head = [], [], []
    for job in jobs:
        m = _LAYER.search(job.name)
        if m:
            layers.setdefault(int(m.group(1)), []).append(job)
        elif _INPUT_EMBEDDING.search(job.name):
            before.append([job])
        elif _HEAD.search(job.name):
            head.append([job])
        else:
            after.append([job])
    return [*before, *(layers[i] for i in sorted(layers)), *after, *head]


def _split_shards(jobs: list[TensorJob], max_bytes: int, *, execution: bool = False) -> list[ShardPlan]:
    """Output shards of at most ``max_bytes`` (a bigger tensor gets one of its own), filled in
    ``jobs`` order, or with ``execution`` in :func:`execution_order` with each unit (a decoder layer)
    kept in one shard unless it alone exceeds ``max_bytes``; each shard's tensors in
    :func:`_read_order`."""
    units = execution_order(jobs) if execution else [[job] for job in jobs]
    groups: list[list[TensorJob]] = [[]]
    size = 0
    for unit in units:
        unit_bytes = sum(job.output.nbytes for job in unit)
        if groups[-1] and size + unit_bytes > max_bytes:
            groups.append([])
            size = 0
        for job in unit:
            n = job.output.nbytes
            if groups[-1] and size + n > max_bytes:
                groups.append([])
                size = 0
            groups[-1].append(job)
            size += n
    groups = [_read_order(g) for g in groups]
    total = len(groups)
    if total == 1:
        return [ShardPlan(0, "model.safetensors", groups[0])]
    return [
        ShardPlan(i, f"model-{i + 1:05d}-of-{total:05d}.safetensors", g) for i, g in enumerate(groups)
    ]


def _read_order(jobs: list[TensorJob]) -> list[TensorJob]:
    """The order in which an output shard takes its tensors: each input file (of model_1) front to
    back, the files side by side, by how far into its part of the file a tensor ends.

    The start-up read-ahead (:mod:`slerp_plugin.io.prefetch`) puts the first files in the page
    cache; taking all files together lets the disk read the others while the merge works on those.
    Ends, not starts: a big tensor at the front of a cached file (the embeddings) would otherwise
    come first, and the disk would wait while the merge works through it.

    Where that order would go back within a file of either model (model_2 sharded differently),
    the shard keeps ``jobs`` order: its input hashes stream only from reads that go front to back.
    """
    spans: dict[Path, tuple[int, int]] = {}
    for j in jobs:
        lo, hi = spans.get(j.a.file, (j.a.offset, j.a.offset))
        spans[j.a.file] = (min(lo, j.a.offset), max(hi, j.a.offset + j.a.nbytes))
    rank = {f: i for i, f in enumerate(spans)}

    def key(job: TensorJob) -> tuple[float, int]:
        lo, hi = spans[job.a.file]
        return (job.a.offset + job.a.nbytes - lo) / max(hi - lo, 1), rank[job.a.file]

    order = sorted(jobs, key=key)
    return order if _front_to_back(order) else jobs


def _front_to_back(jobs: list[TensorJob]) -> bool:
    """Whether ``jobs`` read every input file of both models at rising offsets."""
    last: dict[Path, int] = {}
    for job in jobs:
        for info in (job.a, job.b):
            if info.offset < last.get(info.file, -1):
                return False
            last[info.file] = info.offset
    return True


def _fingerprint(spec: MergeSpec, inputs: list, device: torch.device, shards: list[ShardPlan]) -> str:
    doc = {
        "kernel": KERNEL_VERSION,
        "DOT_THRESHOLD": spec.DOT_THRESHOLD,
        "epsilon": spec.epsilon,
        "norm_precision": spec.norm_precision,
        "dtype": spec.dtype,
        "chunk_elements": spec.chunk_elements,
        "device": device.type,
        "inputs": inputs,
        "shards": [[s.file, [(j.name, j.action, j.out_dtype, j.t) for j in s.jobs]] for s in shards],
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def format_bytes(n: float) -> str:
    """``1234567`` → ``"1.2 MB"`` (powers of 1000)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"
