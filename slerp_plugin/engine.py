"""The streaming merge engine: MergeSpec → plan of output shards → streamed, resumable execution.

Nothing is gathered into a state dict: each tensor is read from the parents' safetensors files in
chunks, merged by the two-pass kernel (:mod:`slerp_plugin.slerp`) and written to the output shard
the plan assigns. Peak memory is a few chunks, whatever the model or tensor size.

Atomic and resumable: the output is built in ``<output>.partial``; each finished shard is fsynced,
renamed into place and journalled with its SHA-256. A re-run (after ``kill -9`` at any point)
re-verifies journalled shards and reuses them, so its result is bit-identical to an uninterrupted
run; ``<output>`` appears, by one rename, only when everything is written.

Key rules follow FusionBench: the tensors of model_2 are merged; a name missing on either side is
an error naming the names; a shape mismatch keeps model_1's tensor (warning, ``shape-kept``).

Several workers may share one merge: :func:`plan_merge` on each, :func:`merge_shards` with
disjoint ``indices``, then one :func:`finalize`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from . import prefetch
from .checkpoint import (
    DTYPES,
    INDEX_NAME,
    Checkpoint,
    OutputTensor,
    PageCache,
    ShardWriter,
    TensorInfo,
    TensorReader,
    aligned_capacity,
    dtype_name,
)
from .direct_io import aligned_empty
from .errors import (
    CheckpointError,
    ConfigError,
    KeyMismatchError,
    OutputExistsError,
    OutputWriteError,
    ShapeMismatchError,
)
from .gc_pause import cyclic_gc_paused
from .manifest import (
    MANIFEST_NAME,
    InputRecord,
    Manifest,
    ShardRecord,
    TensorRecord,
    write_json_atomic,
)
from .hashing import cached_sha256, has_cached_sha256, remember_sha256
from .model_files import CONFIG_FILES, TOKENIZER_FILES, describe_input, model_files, tokenizer_files
from .modelcard import render_model_card
from .pipeline_io import ReadAhead, WriteBehind
from .slerp import SlerpCoefficients, SlerpStats, accumulate_chunks, coefficients, combine, compute_dtype
from .sources import ResolvedModel, resolve_model
from .spec import MergeSpec
from .stream_hash import StreamHasher, sha256_file

log = logging.getLogger(__name__)

KERNEL_VERSION = 1
STATE_DIR = ".slerp_state"
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


@dataclass
class MergePlan:
    """What :func:`plan_merge` decided; input to :func:`merge_shards` and :func:`finalize`."""

    spec: MergeSpec
    paths: dict[str, Path]
    checkpoints: dict[str, Checkpoint]
    shards: list[ShardPlan]
    device: torch.device
    fingerprint: str
    warnings: list[str] = field(default_factory=list)
    commits: dict[str, str | None] = field(default_factory=dict)
    known_hashes: dict[Path, str] = field(default_factory=dict)
    stream_hashers: dict[Path, StreamHasher] = field(default_factory=dict)

    @property
    def output(self) -> Path:
        return Path(self.spec.output).resolve()

    @property
    def partial(self) -> Path:
        return self.output.with_name(self.output.name + ".partial")

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.shards)


@dataclass
class ShardOutcome:
    """The journal entry of a finished shard (what the manifest needs of it)."""

    record: ShardRecord
    tensors: list[TensorRecord]
    seconds: float
    bytes_read: int
    reused: bool = False


@dataclass
class MergeResult:
    """A finished merge: the output folder, its manifest, and the Hub upload if one was asked for."""

    output: Path
    manifest: Manifest
    upload: object | None = None


def resolve_device(device: str) -> torch.device:
    """``auto`` → ``cuda`` when available, else ``cpu``.

    Raises:
        ConfigError: cuda was asked for but is not available.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available")
    return torch.device(device)


def plan_merge(spec: MergeSpec, resolved: dict[str, ResolvedModel] | None = None) -> MergePlan:
    """Resolve the inputs, read their headers, check keys, and split the output into shards.

    ``resolved`` supplies inputs already fetched (e.g. by a pipeline's download tasks) by role
    (``model_1``, ``model_2``, ``tokenizer``); the others are resolved (and downloaded) here.

    Raises:
        ModelNotFoundError: an input is neither a local model folder nor a Hub id.
        HubError: a Hub download failed.
        CheckpointError: missing/corrupt weights, config or tokenizer files.
        KeyMismatchError: the models hold different tensor names.
        OutputExistsError: the destination exists (and ``overwrite`` is off) or is an input.
    """
    resolved = dict(resolved or {})
    for role, ref, name in (("model_1", spec.model_1, spec.model_names[0]),
                            ("model_2", spec.model_2, spec.model_names[1])):
        if role not in resolved:
            resolved[role] = resolve_model(ref, name, allow_bin=spec.allow_bin)
    if "tokenizer" not in resolved:
        resolved["tokenizer"] = (
            resolved["model_1"] if spec.tokenizer_ref == spec.model_1
            else resolve_model(spec.tokenizer_ref, "tokenizer", weights=False)
        )
    paths = {role: r.path for role, r in resolved.items()}
    _check_output(spec, paths)
    if not (paths["model_1"] / "config.json").is_file():
        raise CheckpointError(f"{paths['model_1']}: no config.json (not a transformers model folder)")
    if not any((paths["tokenizer"] / f).is_file() for f in TOKENIZER_FILES):
        raise CheckpointError(f"tokenizer: no tokenizer files in {paths['tokenizer']}")
    ckpts = {r: Checkpoint.open(paths[r]) for r in ("model_1", "model_2")}
    c1, c2 = ckpts["model_1"], ckpts["model_2"]
    _check_keys(c1, c2, spec.model_names)
    device = resolve_device(spec.device)
    num_layers = _num_layers(paths["model_1"])
    warnings: list[str] = []
    jobs: list[TensorJob] = []
    for name, a in c1.tensors.items():
        b = c2.tensors[name]
        out_dtype = dtype_name(_dtype(spec.stored_dtype)) if spec.stored_dtype else a.dtype
        t = spec.t_for(name, layer_fraction(name, num_layers))
        if a.shape != b.shape:
            if spec.on_shape_mismatch == "error":
                raise ShapeMismatchError(_mismatch_message(name, a, b, spec.model_names))
            msg = (
                f"{name}: shapes differ ({list(a.shape)} vs {list(b.shape)}); "
                f"{spec.model_names[0]}'s tensor kept"
            )
            log.warning(msg)
            warnings.append(msg)
            jobs.append(TensorJob(name, "keep", a, b, out_dtype, t))
        else:
            jobs.append(TensorJob(name, "merge", a, b, out_dtype, t))
    shards = _split_shards(jobs, spec.max_shard_size)
    fingerprint = _fingerprint(spec, ckpts, device, shards)
    plan = MergePlan(spec, paths, ckpts, shards, device, fingerprint, warnings,
                     commits={role: r.commit for role, r in resolved.items()},
                     known_hashes={p: h for r in resolved.values() for p, h in r.hashes.items()})
    log.info(
        "planned %d tensors (%s) into %d output shard(s) at %s; device %s",
        len(jobs), _fmt_bytes(plan.total_bytes), len(shards), plan.output, device,
    )
    return plan


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")
VOCAB_TENSOR_NAMES = ("embed_tokens", "lm_head", "wte", "embed_in", "embed_out", "word_embeddings")


def _num_layers(folder: Path) -> int:
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return 0
    for node in (cfg, cfg.get("text_config") or {}):
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(node.get(key), int):
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


def _check_output(spec: MergeSpec, paths: dict[str, Path]) -> None:
    out = Path(spec.output).resolve()
    for role, p in paths.items():
        if out == p or p.is_relative_to(out) or out.is_relative_to(p):
            raise OutputExistsError(f"output {out} overlaps the {role} folder {p}; choose another path")
    if out.exists() and not spec.overwrite:
        if not out.is_dir() or any(out.iterdir()):
            raise OutputExistsError(
                f"output {out} already exists; choose another model_save_path or set overwrite=true"
            )


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


def _split_shards(jobs: list[TensorJob], max_bytes: int) -> list[ShardPlan]:
    """Output shards of at most ``max_bytes`` (a bigger tensor gets one of its own), filled in
    ``jobs`` order; each shard's tensors in :func:`_read_order`."""
    groups: list[list[TensorJob]] = [[]]
    size = 0
    for job in jobs:
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

    The start-up read-ahead (:mod:`slerp_plugin.prefetch`) puts the first files in the page cache;
    taking all files together lets the disk read the others while the merge works on those. Ends,
    not starts: a big tensor at the front of a cached file (the embeddings) would otherwise come
    first, and the disk would wait while the merge works through it.

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


def _fingerprint(
    spec: MergeSpec, ckpts: dict[str, Checkpoint], device: torch.device, shards: list[ShardPlan]
) -> str:
    inputs = []
    for role, ck in ckpts.items():
        for f in ck.files:
            st = f.stat()
            inputs.append([role, str(f), st.st_size, st.st_mtime_ns])
    doc = {
        "kernel": KERNEL_VERSION,
        "DOT_THRESHOLD": spec.DOT_THRESHOLD,
        "epsilon": spec.epsilon,
        "dtype": spec.dtype,
        "chunk_elements": spec.chunk_elements,
        "device": device.type,
        "inputs": inputs,
        "shards": [[s.file, [(j.name, j.action, j.out_dtype, j.t) for j in s.jobs]] for s in shards],
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------- execution


def _state_dir(plan: MergePlan) -> Path:
    return plan.partial / STATE_DIR


def _finished_partial(plan: MergePlan) -> Manifest | None:
    """The manifest of a ``.partial`` that finalize completed (crash before the last rename)."""
    try:
        manifest = Manifest.read(plan.partial)
    except (OSError, ValueError):
        return None
    if _state_dir(plan).exists() or manifest.plan_fingerprint != plan.fingerprint:
        return None
    return manifest


def _prepare_partial(plan: MergePlan) -> bool:
    """Create ``<output>.partial`` (or adopt ours); discard one left by a different plan.

    Returns True when the partial is already complete (only the final rename is missing).
    """
    partial, state = plan.partial, _state_dir(plan)
    plan_file = state / "plan.json"
    if partial.exists():
        if _finished_partial(plan) is not None:
            return True
        if plan_file.is_file():
            ours, same = True, json.loads(plan_file.read_text()).get("fingerprint") == plan.fingerprint
        else:
            ours, same = (partial / MANIFEST_NAME).is_file() or not any(partial.iterdir()), False
        if not ours:
            raise OutputExistsError(
                f"{partial} exists but was not made by slerp-merge; remove it or choose another output"
            )
        if not same and any(partial.iterdir()):
            log.warning("discarding %s: it belongs to a different merge (inputs or options changed)", partial)
            shutil.rmtree(partial)
    try:
        (state / "shards").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputWriteError(f"cannot create {partial}: {e.strerror}") from None
    if not plan_file.is_file():
        write_json_atomic(plan_file, {"fingerprint": plan.fingerprint, "spec": plan.spec.model_dump(mode="json")})
    return False


def _marker(plan: MergePlan, shard: ShardPlan) -> Path:
    return _state_dir(plan) / "shards" / (shard.file + ".json")


def _write_marker(plan: MergePlan, shard: ShardPlan, outcome: ShardOutcome) -> None:
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


def _load_outcome(plan: MergePlan, shard: ShardPlan, verify: bool) -> ShardOutcome | None:
    """The journalled outcome of ``shard`` if its file is present and (optionally) verified."""
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


def merge_shards(
    plan: MergePlan,
    indices: Sequence[int] | None = None,
    *,
    progress: Callable[[int], None] | None = None,
) -> list[ShardOutcome]:
    """Write the shards ``indices`` (default: all) of ``plan`` into ``<output>.partial``.

    Shards already finished by an earlier run are verified by SHA-256 and reused.
    ``progress(nbytes)`` is called as output bytes are produced (or reused).

    Raises:
        CheckpointError: an input file is unreadable or truncated.
        OutputWriteError: writing failed (e.g. disk full); finished shards stay for a resume.
    """
    if _prepare_partial(plan):
        log.info("%s is complete; nothing to merge", plan.partial)
        return []
    selected = plan.shards if indices is None else [plan.shards[i] for i in indices]
    outcomes = []
    with TensorReader(direct=plan.spec.direct_io) as reader, \
            compute_threads(plan.device, plan.spec.threads) as threads, cyclic_gc_paused():
        log.info("merging %d shard(s) on %s with %d compute thread(s), %s I/O", len(selected),
                 plan.device, threads, "direct" if plan.spec.direct_io else "buffered")
        for shard in selected:
            outcome = _load_outcome(plan, shard, verify=True)
            if outcome is not None:
                outcome.reused = True
                _write_marker(plan, shard, outcome)
                log.info("shard %d/%d %s: reused from an earlier run (sha256 verified)",
                         shard.index + 1, len(plan.shards), shard.file)
                if progress:
                    progress(shard.nbytes)
            else:
                outcome = _write_shard(plan, shard, reader, progress)
            outcomes.append(outcome)
    prefetch.clear()
    return outcomes


def _schedule(job: TensorJob, block: int, hold_blocks: int) -> Iterator[tuple[str, int, int]]:
    """The block reads a tensor needs, in order: (kind, start element, count).

    ``keep``: model_1's tensor copied. ``hold``: tensors of at most ``hold_blocks`` blocks are
    read once and kept in memory for pass 2. ``pass1``/``pass2``: larger tensors are read twice.
    """
    n = job.a.numel
    starts = range(0, max(n, 1), block)
    if job.action == "keep":
        kinds: tuple[str, ...] = ("keep",)
    elif len(starts) <= hold_blocks:
        kinds = ("hold",)
    else:
        kinds = ("pass1", "pass2")
    for kind in kinds:
        for s in starts:
            yield kind, s, min(block, n - s)


class _Pool:
    """A fixed set of reusable, block-aligned byte buffers: bounded memory, no allocator churn
    across threads, and usable for direct I/O.

    A buffer given back with a CUDA event (an asynchronous copy out of it still running) is
    handed out again only once that event has completed. After :meth:`close`, :meth:`take`
    raises instead of waiting, so a thread waiting for a buffer cannot outlive a failed merge.
    """

    def __init__(self, count: int, nbytes: int, pinned: bool = False) -> None:
        self.nbytes = nbytes
        self._free: queue.Queue[tuple[torch.Tensor, object]] = queue.Queue()
        self._closed = threading.Event()
        for _ in range(count):
            # pinned (page-locked) host memory lets host↔GPU copies run asynchronously
            self._free.put((aligned_empty(nbytes, pinned), None))

    def take(self, nbytes: int) -> torch.Tensor:
        if nbytes > self.nbytes:  # e.g. a float64 tensor in a bf16 model: not pooled
            return aligned_empty(nbytes)
        while True:
            try:
                buf, pending = self._free.get(timeout=0.1)
                break
            except queue.Empty:
                if self._closed.is_set():
                    raise RuntimeError("buffer pool closed") from None
        if pending is not None:
            pending.synchronize()
        return buf

    def give(self, buf: torch.Tensor, pending: object = None) -> None:
        if buf.numel() == self.nbytes:
            self._free.put((buf, pending))

    def close(self) -> None:
        self._closed.set()


class _Lease:
    """A pool buffer used by ``holders`` threads at once; back to the pool when all let go."""

    def __init__(self, pool: _Pool, buf: torch.Tensor, holders: int) -> None:
        self.pool, self.buf = pool, buf
        self._holders = holders
        self._pending: object = None
        self._lock = threading.Lock()

    def release(self, pending: object = None) -> None:
        with self._lock:
            self._holders -= 1
            self._pending = pending or self._pending
            last = self._holders == 0
        if last:
            self.pool.give(self.buf, self._pending)


READ_AHEAD = 2  # (model_1, model_2) block pairs read ahead of the kernel
IO_BLOCK_BYTES = 8 << 20  # bytes per read (whole kernel chunks) and per write
READ_WORKERS = 2  # reads in flight, so the disk never waits for a busy CPU


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota if set."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            n = min(n, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return n


def page_cache_budget() -> int:
    """Bytes of page cache a merge may fill with one tensor read twice: half the memory the
    kernel reports available (``MemAvailable``), 0 where it cannot be told."""
    return (prefetch.mem_available() or 0) // 2


@contextmanager
def compute_threads(device: torch.device, threads: int | None) -> Iterator[int]:
    """Set torch's intra-op threads for a CPU merge (restored afterwards); yields the count.

    Default: :func:`usable_cpus` less two (the reader and writer threads), at least 1. More
    threads than free cores make OpenMP workers spin against the I/O threads, which costs more
    than they compute. The count can change the last bit of the pass-1 sums (BLAS splits dot
    products per thread), so a run is reproducible for a fixed count.
    """
    if device.type != "cpu":
        yield torch.get_num_threads()
        return
    n = threads or max(1, usable_cpus() - 2)
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


def _write_shard(
    plan: MergePlan,
    shard: ShardPlan,
    reader: TensorReader,
    progress: Callable[[int], None] | None,
) -> ShardOutcome:
    spec, device = plan.spec, plan.device
    chunk = spec.chunk_elements
    load_dtype = _dtype(spec.dtype) if spec.dtype else None
    started = time.perf_counter()
    bytes_read = 0
    itemsize = max([j.a.itemsize for j in shard.jobs] + [j.b.itemsize for j in shard.jobs] + [1])
    out_itemsize = max([DTYPES[j.out_dtype][1] for j in shard.jobs] + [1])
    # reads and writes move blocks of whole kernel chunks; the kernel works chunk by chunk on
    # scratch that stays in the CPU's cache
    block = chunk * max(1, IO_BLOCK_BYTES // (chunk * itemsize))
    pinned = device.type == "cuda"
    raw_bytes = aligned_capacity(block * itemsize)
    # per side: READ_AHEAD blocks queued, one being read, one being merged or hashed, and the
    # blocks of a tensor held between its two passes with what the memory budget leaves
    per_side = max(READ_AHEAD + 3, spec.buffer_memory // (2 * raw_bytes))
    hold_blocks = per_side - READ_AHEAD - 2
    raw_pool = _Pool(2 * per_side, raw_bytes, pinned)
    out_pool = _Pool(WriteBehind.DEPTH + 2, block * out_itemsize, pinned)
    # per thread: the reader threads take pass 1 of the blocks they read (CPU merges), the kernel's
    # thread pass 2; per-chunk sums added in order give the same float64 sums on any thread
    scratch = threading.local()
    stats_on_read = device.type == "cpu"
    threads = torch.get_num_threads()
    cache_budget = page_cache_budget()

    def dtypes(job: TensorJob) -> tuple[torch.dtype, torch.dtype]:
        """The dtype a job's inputs are loaded in, and the dtype SLERP computes in."""
        src = load_dtype or job.a.torch_dtype
        return src, compute_dtype(src)

    def hash_input(item: tuple[StreamHasher, int, torch.Tensor, _Lease]) -> None:
        hasher, pos, data, lease = item
        try:
            hasher.feed(pos, memoryview(data.numpy()))
        finally:
            lease.release()

    def release(*leases: _Lease) -> None:
        # a CUDA copy out of a pinned buffer may still be running: the pool waits for it
        pending = torch.cuda.Event() if pinned else None
        if pending is not None:
            pending.record()
        for lease in leases:
            lease.release(pending)

    def read(info: TensorInfo, start: int, count: int, kind: str) -> tuple[_Lease, torch.Tensor]:
        nbytes = count * info.itemsize
        buf = raw_pool.take(aligned_capacity(nbytes))
        # a tensor read twice stays in the page cache between its passes, if it fits there
        page_cache: PageCache = "bypass"
        if kind in ("pass1", "pass2") and 2 * info.nbytes <= cache_budget:
            page_cache = "keep" if kind == "pass1" else "drop"
        skew = reader.read_aligned(info, start * info.itemsize, nbytes, buf, page_cache) if count else 0
        data = buf[skew : skew + nbytes]
        if skew % info.itemsize:  # a tensor not aligned to its element size in the file
            data = buf[:nbytes].copy_(data.clone())
        hashed = info.file in plan.stream_hashers
        return _Lease(raw_pool, buf, 2 if hashed else 1), data.view(info.torch_dtype)

    def hash_later(side: int, info: TensorInfo, start: int, lease: _Lease, raw: torch.Tensor) -> None:
        # in read order, on a thread per model (one SHA-256 stream runs at about 1.7 GB/s)
        hasher = plan.stream_hashers.get(info.file)
        if hasher is not None:
            hashing[side].put((hasher, info.offset + start * info.itemsize, raw.view(torch.uint8), lease))

    def read_tasks() -> Iterator[Callable[[], tuple]]:
        for job in shard.jobs:
            src_dtype, cdtype = dtypes(job)
            for kind, start, count in _schedule(job, block, hold_blocks):
                def task(job=job, kind=kind, start=start, count=count, src_dtype=src_dtype, cdtype=cdtype):
                    a = read(job.a, start, count, kind)
                    if kind == "keep":
                        return a, None, None
                    b = read(job.b, start, count, kind)
                    stats = None
                    if stats_on_read and kind in ("hold", "pass1"):
                        stats = block_stats(a[1], b[1], src_dtype, cdtype)
                    return a, b, stats
                yield task

    def pieces(
        a_raw: torch.Tensor, b_raw: torch.Tensor, src: torch.dtype, cdtype: torch.dtype, size: int
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """A block as (offset, a, b) pieces of ``size`` elements in the compute dtype."""
        if src != a_raw.dtype:  # ``dtype`` asks for the models to be loaded in another dtype
            a_raw, b_raw = a_raw.to(src), b_raw.to(src)
        if device.type == "cpu" and cdtype == torch.float32:
            if not hasattr(scratch, "buffers"):
                scratch.buffers = (torch.empty(chunk), torch.empty(chunk))
            sa, sb = scratch.buffers
            for i in range(0, a_raw.numel(), size):
                n = min(size, a_raw.numel() - i)
                yield i, sa[:n].copy_(a_raw[i : i + n]), sb[:n].copy_(b_raw[i : i + n])
            return
        a = a_raw.to(device, non_blocking=True).to(cdtype)
        b = b_raw.to(device, non_blocking=True).to(cdtype)
        for i in range(0, a.numel(), size):
            yield i, a[i : i + size], b[i : i + size]

    def block_stats(a_raw: torch.Tensor, b_raw: torch.Tensor, src: torch.dtype, cdtype: torch.dtype) -> SlerpStats:
        if not hasattr(scratch, "threads"):
            # BLAS thread counts are per thread (MKL): the same count on every thread, the same sums
            torch.set_num_threads(threads)
            scratch.threads = threads
        return accumulate_chunks((a, b) for _, a, b in pieces(a_raw, b_raw, src, cdtype, chunk))

    def merge_block(a_raw: torch.Tensor, b_raw: torch.Tensor, src: torch.dtype, cdtype: torch.dtype,
                    coeff: SlerpCoefficients, out_name: str) -> None:
        # element-wise: the piece size changes no bit, only how well the CPU cache is used
        size = chunk if device.type == "cpu" else block
        out = take_out(a_raw.numel(), out_name)
        for i, a, b in pieces(a_raw, b_raw, src, cdtype, size):
            out[1][i : i + a.numel()].copy_(combine(a, b, coeff, out=a, scratch=b))
        put_out(out)

    def take_out(count: int, out_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        dtype, size = DTYPES[out_name]
        buf = out_pool.take(count * size)
        return buf, buf[: count * size].view(dtype)

    def put_out(out: tuple[torch.Tensor, torch.Tensor]) -> None:
        sink.put(out)
        if progress:
            progress(out[1].nbytes)

    def write(item: tuple[torch.Tensor, torch.Tensor]) -> None:
        buf, out = item
        writer.write(memoryview(out.view(torch.uint8).numpy()))
        out_pool.give(buf)

    records: list[TensorRecord] = []
    path = plan.partial / shard.file
    with ShardWriter(path, [j.output for j in shard.jobs], direct=spec.direct_io) as writer:
        sink = WriteBehind(write)
        hashing = (WriteBehind(hash_input), WriteBehind(hash_input))
        feed = ReadAhead(read_tasks(), depth=READ_AHEAD, workers=READ_WORKERS)
        try:
            for job in shard.jobs:
                src_dtype, cdtype = dtypes(job)
                stats = SlerpStats()
                coeff = None
                held = []
                for kind, start, count in _schedule(job, block, hold_blocks):
                    (a_lease, a_raw), b_pair, read_stats = next(feed)
                    bytes_read += a_raw.nbytes + (b_pair[1].nbytes if b_pair is not None else 0)
                    hash_later(0, job.a, start, a_lease, a_raw)
                    if b_pair is None:  # "keep": model_1's tensor as it is
                        out = take_out(count, job.out_dtype)
                        out[1].copy_(a_raw.to(src_dtype))
                        release(a_lease)
                        put_out(out)
                        continue
                    b_lease, b_raw = b_pair
                    hash_later(1, job.b, start, b_lease, b_raw)
                    if kind == "pass2":
                        if coeff is None:
                            coeff = coefficients(job.t, stats, dtype=cdtype,
                                                 DOT_THRESHOLD=spec.DOT_THRESHOLD, epsilon=spec.epsilon)
                        merge_block(a_raw, b_raw, src_dtype, cdtype, coeff, job.out_dtype)
                        release(a_lease, b_lease)
                        continue
                    stats = stats + (read_stats if read_stats is not None
                                     else block_stats(a_raw, b_raw, src_dtype, cdtype))
                    if kind == "hold":
                        held.append((a_lease, a_raw, b_lease, b_raw))
                    else:
                        release(a_lease, b_lease)
                if held:
                    coeff = coefficients(job.t, stats, dtype=cdtype,
                                         DOT_THRESHOLD=spec.DOT_THRESHOLD, epsilon=spec.epsilon)
                    for a_lease, a_raw, b_lease, b_raw in held:
                        merge_block(a_raw, b_raw, src_dtype, cdtype, coeff, job.out_dtype)
                        release(a_lease, b_lease)
                records.append(_tensor_record(job, shard.file, coeff))
                if coeff is not None:
                    log.debug("%s: %s (d=%.6g, s0=%.6g, s1=%.6g)", job.name, coeff.branch,
                              coeff.d, float(coeff.s0), float(coeff.s1))
        except BaseException:
            raw_pool.close()  # a reader waiting for a buffer gives up
            feed.close()
            for worker in (*hashing, sink):
                try:
                    worker.close()
                except BaseException:
                    pass
            raise
        feed.close()
        for worker in hashing:
            worker.close()
        sink.close()
    seconds = time.perf_counter() - started
    record = ShardRecord(file=shard.file, size=writer.size, sha256=writer.sha256, tensors=len(shard.jobs))
    outcome = ShardOutcome(record, records, seconds, bytes_read)
    _write_marker(plan, shard, outcome)
    log.info(
        "shard %d/%d %s: %d tensors, %s written in %.1f s (%s/s)",
        shard.index + 1, len(plan.shards), shard.file, len(shard.jobs),
        _fmt_bytes(record.size), seconds, _fmt_bytes(record.size / max(seconds, 1e-9)),
    )
    return outcome


def _tensor_record(job: TensorJob, shard: str, coeff) -> TensorRecord:
    base = {"name": job.name, "shape": list(job.a.shape), "dtype": job.out_dtype, "shard": shard,
            "t": job.t}
    if job.action == "keep":
        return TensorRecord(**base, branch="shape-kept")
    return TensorRecord(**base, **coeff.as_record())


# --------------------------------------------------------------------------- finalize


def input_records(plan: MergePlan, hashes: dict[Path, str] | None = None) -> dict[str, InputRecord]:
    """Manifest records of the inputs; files' SHA-256 from ``hashes`` or computed (cached)."""
    refs = {"model_1": plan.spec.model_1, "model_2": plan.spec.model_2, "tokenizer": plan.spec.tokenizer_ref}
    hashes = {**plan.known_hashes, **(hashes or {})}
    records = {}
    for role, ref in refs.items():
        record = describe_input(ref, plan.paths[role], _input_files(plan, role), hashes)
        record.commit = plan.commits.get(role)
        records[role] = record
    return records


def _input_files(plan: MergePlan, role: str) -> list[Path]:
    if role == "tokenizer":
        return tokenizer_files(plan.paths[role])
    return model_files(plan.paths[role], plan.checkpoints[role])


def _stream_hashers(plan: MergePlan) -> dict[Path, StreamHasher]:
    """A hasher, primed with the header, for each input weight file whose checksum is not known;
    those the process's read-ahead started (:mod:`slerp_plugin.prefetch`) are taken over."""
    started = prefetch.take_hashers()
    out = {}
    for ck in plan.checkpoints.values():
        for f in ck.files:
            if f in plan.known_hashes or has_cached_sha256(f):
                continue
            hasher = started.get(os.path.realpath(f)) or StreamHasher(f)
            offsets = [i.offset for i in ck.tensors.values() if i.file == f]
            header = min(offsets) if offsets else 0
            if hasher.pos < header:  # one the read-ahead advanced has hashed the header already
                with open(f, "rb") as fh:
                    hasher.feed(0, memoryview(fh.read(header)))
            out[f] = hasher
    return out


def input_hashes(plan: MergePlan) -> dict[Path, str]:
    """SHA-256 of every input file: known from the Hub, cached, or finished from the bytes the
    merge streamed (:class:`StreamHasher`); files never read are hashed here."""
    files = {f for role in ("model_1", "model_2", "tokenizer") for f in _input_files(plan, role)}
    out = {}
    for f in sorted(files - set(plan.known_hashes)):
        hasher = plan.stream_hashers.get(f)
        out[f] = hasher.hexdigest() if hasher is not None else cached_sha256(f)
        if hasher is not None:
            remember_sha256(f, out[f])
    return out


def finalize(
    plan: MergePlan,
    *,
    input_hashes: dict[Path, str] | None = None,
    started_at: float | None = None,
) -> MergeResult:
    """Check every shard is journalled, write index, configs, tokenizer, manifest and model card,
    then move ``<output>.partial`` to ``<output>`` in one rename.

    Raises:
        OutputWriteError: a shard is missing (not merged yet) or writing failed.
        OutputExistsError: the destination appeared meanwhile and ``overwrite`` is off.
    """
    t0 = time.perf_counter()
    finished = _finished_partial(plan)
    if finished is not None:
        _publish(plan)
        log.info("merged model at %s (finished by an earlier run)", plan.output)
        return MergeResult(plan.output, finished)
    outcomes = []
    for shard in plan.shards:
        outcome = _load_outcome(plan, shard, verify=False)
        if outcome is None:
            raise OutputWriteError(f"shard {shard.file} is not merged yet; run merge_shards for it first")
        outcomes.append(outcome)
    partial = plan.partial
    try:
        _write_index(plan, partial)
        _copy_configs(plan, partial)
        for name in TOKENIZER_FILES:
            src = plan.paths["tokenizer"] / name
            if src.is_file():
                shutil.copyfile(src, partial / name)
        manifest = _build_manifest(plan, outcomes, input_records(plan, input_hashes), started_at, t0)
        manifest.write(partial)
        (partial / "README.md").write_text(render_model_card(manifest))
        shutil.rmtree(partial / STATE_DIR)
        _fsync_dir(partial)
        _publish(plan)
    except OSError as e:
        if isinstance(e, (OutputWriteError, OutputExistsError)):
            raise
        raise OutputWriteError(f"finishing {plan.output} failed: {e.strerror or e}") from None
    log.info("merged model at %s", plan.output)
    return MergeResult(plan.output, manifest)


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
    return Manifest.create(
        spec=plan.spec.model_dump(mode="json"),
        inputs=inputs,
        shards=[o.record for o in outcomes],
        total_size=plan.total_bytes,
        tensors=[t for o in outcomes for t in o.tensors],
        warnings=plan.warnings,
        timings=timings,
        resume={"reused_shards": sum(o.reused for o in outcomes), "total_shards": len(outcomes)},
        plan_fingerprint=plan.fingerprint,
    )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(plan: MergePlan) -> None:
    out, partial = plan.output, plan.partial
    aside = None
    if out.exists():
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        elif plan.spec.overwrite:
            aside = out.with_name(f"{out.name}.replaced-{os.getpid()}")
            os.replace(out, aside)
        else:
            raise OutputExistsError(f"output {out} appeared during the merge; left the result in {partial}")
    os.replace(partial, out)
    _fsync_dir(out.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def run_merge(spec: MergeSpec) -> MergeResult:
    """Plan, merge every shard (resuming an interrupted run) and finalize. See the module doc.

    Raises:
        SlerpPluginError: any bad input or write failure, with a one-line message.
    """
    started = time.perf_counter()
    plan = plan_merge(spec)
    plan.stream_hashers = _stream_hashers(plan)
    bar = _progress_bar(plan)
    try:
        outcomes = merge_shards(plan, progress=bar.update if bar else None)
    finally:
        if bar:
            bar.close()
    reused = sum(o.reused for o in outcomes)
    if reused:
        log.info("resumed: %d of %d shard(s) reused from the interrupted run", reused, len(outcomes))
    result = finalize(plan, input_hashes=input_hashes(plan), started_at=started)
    counts = result.manifest.branch_counts
    log.info(
        "branches: %s", ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    )
    if spec.push_to_hub:
        from .hub import upload_folder

        result.upload = upload_folder(result.output, spec.push_to_hub, private=spec.private)
        log.info("published to %s: %s", spec.push_to_hub, result.upload.url)
    return result


def _progress_bar(plan: MergePlan):
    if not (plan.spec.show_pbar or sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=plan.total_bytes, unit="B", unit_scale=True, unit_divisor=1000,
                desc="merging", dynamic_ncols=True)
