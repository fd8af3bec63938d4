"""Executing a plan: each output shard streamed from the parents' blocks through the kernel.

Nothing is gathered into a state dict: each tensor is read from the parents' safetensors files in
blocks, merged by the two-pass kernel (:mod:`slerp_plugin.kernel`) and written to the output shard
the plan assigns. Peak memory is a few blocks, whatever the model or tensor size.

Per shard (:class:`ShardMerge`): two ordered read-ahead threads read block pairs (and, on a CPU,
take pass 1 of what they read), the calling thread runs the kernel, a write-behind thread writes
the output (its SHA-256 on a thread of its own), and a thread per model feeds the input SHA-256
from the bytes read. Finished shards are journalled (:mod:`slerp_plugin.engine.resume`). One read
of a shard's inputs can also merge it at several t at once (:meth:`ShardMerge.at_each_t`): each
block is read, converted and summed once, and combined once per t.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..formats.manifest import ShardRecord, TensorRecord
from ..io.lock import FileLock
from ..io.prefetch import Prefetch
from ..io.reader import PageCache, TensorReader, aligned_capacity
from ..io.safetensors import DTYPES, TensorInfo, torch_dtype
from ..io.streams import ReadAhead, WriteBehind
from ..io.writer import ShardWriter
from ..kernel import (
    SlerpCoefficients,
    SlerpStats,
    accumulate_chunks,
    coefficients,
    coefficients_from_d,
    combine,
    compute_dtype,
    fusionbench_coefficients,
)
from . import buffers
from .buffers import BlockLayout, BufferPool, BufferPoolClosed, Lease
from .inputs import InputHashes
from .output import output_lock
from .plan import MergePlan, ShardPlan, TensorJob, format_bytes
from .resources import compute_threads, page_cache_budget
from .resume import ShardOutcome, WorkingFolder

log = logging.getLogger(__name__)

Progress = Callable[[int], None]


def prepare(plan: MergePlan, *, wait: bool = False) -> None:
    """Get the output ready for workers that will each merge some of its shards: with the output
    locked exclusively for a moment, discard an unfinished merge of a different plan and create
    ``<output>.partial`` (the Airflow plan task does this before the merge tasks start).

    Raises:
        OutputLockedError: another process holds the output (without ``wait``).
        OutputExistsError, OutputWriteError: as :func:`merge_shards`.
    """
    if plan.finished_earlier:
        return
    with output_lock(plan.output, exclusive=True, wait=wait, what="preparing the merge"):
        WorkingFolder(plan).prepare(exclusive=True)


def merge_shards(
    plan: MergePlan,
    indices: Sequence[int] | None = None,
    *,
    progress: Progress | None = None,
    hashes: InputHashes | None = None,
    prefetch: Prefetch | None = None,
    lock: FileLock | None = None,
    wait: bool = False,
) -> list[ShardOutcome]:
    """Write the shards ``indices`` (default: all) of ``plan`` into ``<output>.partial``.

    Shards already finished by an earlier run are verified by SHA-256 and reused. Without
    ``lock``, the output is locked shared for the call, so that several workers can merge shards
    of one output at once; each shard is then written under a lock of its own, and a worker that
    finds a shard locked (an orphaned attempt still writing it) waits, then reuses what that
    attempt finished.

    Args:
        plan: the plan (:func:`slerp_plugin.merge.plan_merge`), the same on every worker.
        indices: which shards, by index in ``plan.shards`` (default: all).
        progress: called with a byte count as output bytes are produced or reused.
        hashes: receives the bytes read, for the inputs' SHA-256 (:class:`InputHashes`).
        prefetch: a start-up read-ahead whose page-cache contents are used instead of reading the
            disk again.
        lock: the output lock the caller holds (:func:`slerp_plugin.merge.run_merge` holds it
            exclusively).
        wait: wait for a process holding the output exclusively instead of failing (default
            False).

    Returns:
        One outcome per shard merged or reused (record, tensors with their branches, seconds,
        bytes read); empty when the output already holds this merge.

    Raises:
        OutputLockedError: another process holds the output exclusively (without ``wait``).
        OutputExistsError: ``<output>.partial`` is not this tool's, or belongs to another plan.
        CheckpointError: an input file is unreadable or truncated.
        OutputWriteError: writing failed (e.g. disk full); finished shards stay for a resume.
    """
    if plan.finished_earlier:
        log.info("%s is finished; nothing to merge", plan.output)
        return []
    with ExitStack() as stack:
        if lock is None:
            lock = stack.enter_context(output_lock(plan.output, exclusive=False, wait=wait, what="merging"))
        work = WorkingFolder(plan)
        if work.prepare(exclusive=lock.exclusive):
            log.info("%s is complete; nothing to merge", plan.partial)
            return []
        selected = plan.shards if indices is None else [plan.shards[i] for i in indices]
        cached = prefetch.covers if prefetch is not None else None
        reader = stack.enter_context(TensorReader(direct=plan.spec.direct_io, cached=cached))
        threads = stack.enter_context(compute_threads(plan.device, plan.spec.threads))
        log.info("merging %d shard(s) on %s with %d compute thread(s), %s I/O", len(selected),
                 plan.device, threads, "direct" if plan.spec.direct_io else "buffered")
        outcomes = []
        for shard in selected:
            with ExitStack() as shard_stack:
                if not lock.exclusive:
                    shard_stack.enter_context(work.lock(shard))
                outcome = _reuse(work, shard, progress) or \
                    ShardMerge(work, shard, reader, hashes=hashes, progress=progress).run()
            outcomes.append(outcome)
    return outcomes


def _reuse(work: WorkingFolder, shard: ShardPlan, progress: Progress | None) -> ShardOutcome | None:
    """The journalled outcome of a shard an earlier run finished (checksum verified), or None."""
    outcome = work.outcome(shard, verify=True)
    if outcome is None:
        return None
    outcome.reused = True
    work.journal(shard, outcome)
    log.info("shard %d/%d %s: reused from an earlier run (sha256 verified)",
             shard.index + 1, len(work.plan.shards), shard.file)
    if progress:
        progress(shard.nbytes)
    return outcome


def schedule(job: TensorJob, block: int, hold_blocks: int) -> Iterator[tuple[str, int, int]]:
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


@dataclass
class Block:
    """One block of a tensor in a pool buffer; releasing the lease gives the buffer back."""

    lease: Lease
    data: torch.Tensor


@dataclass
class BlockRead:
    """What a read task delivers: model_1's block, model_2's (None for ``keep``), and the pass-1
    sums when the reader thread took them (CPU merges)."""

    a: Block
    b: Block | None
    stats: SlerpStats | None


@dataclass(frozen=True)
class MergeTarget:
    """One output of a :class:`ShardMerge`: a shard of the plan of working folder ``work`` (its
    jobs carry the t it is merged at), written over the spare file ``scratch`` when given (see
    :class:`~slerp_plugin.io.writer.ShardWriter`) and then neither hashed nor journalled."""

    work: WorkingFolder
    shard: ShardPlan
    scratch: Path | None = None


class ShardMerge:
    """Merges one output shard of the plan of working folder ``work``; :meth:`run` does it and
    returns the journal entry.

    Tensors of at most ``hold_blocks`` blocks are read once and held between the two SLERP passes;
    larger ones are read twice (through the page cache when it has room). Block buffers come from
    fixed pools, so memory is bounded by ``buffer_memory`` whatever the tensor size.

    With ``scratch``, the shard is written as a scratch file over that spare file's pages (see
    :class:`~slerp_plugin.io.writer.ShardWriter`), neither hashed nor journalled: for a shard read
    once and deleted.
    """

    def __init__(self, work: WorkingFolder, shard: ShardPlan, reader: TensorReader, *,
                 hashes: InputHashes | None = None, progress: Progress | None = None,
                 scratch: Path | None = None) -> None:
        self._setup([MergeTarget(work, shard, scratch)], reader, hashes, progress)

    @classmethod
    def at_each_t(cls, targets: Sequence[MergeTarget], reader: TensorReader) -> ShardMerge:
        """One merge of the same shard into every target, each at the t its jobs carry: the inputs
        are read (and their pass-1 sums taken) once, and each t's output is what a merge at that t
        alone writes, bit for bit. :meth:`run_each` does it.

        Raises:
            ValueError: the targets' shards differ in anything but t.
        """
        def options(target: MergeTarget) -> dict[str, Any]:
            return target.work.plan.spec.model_dump(exclude={"t", "output"})

        first = targets[0].shard
        for target in targets[1:]:
            shard = target.shard
            if (shard.index, shard.file, len(shard.jobs)) != (first.index, first.file, len(first.jobs)) \
                    or any(replace(j, t=f.t) != f for j, f in zip(shard.jobs, first.jobs, strict=True)) \
                    or options(target) != options(targets[0]):
                raise ValueError("the shards of a merge at several t must differ in t alone")
        merge = cls.__new__(cls)
        merge._setup(list(targets), reader, None, None)
        return merge

    def _setup(self, targets: list[MergeTarget], reader: TensorReader, hashes: InputHashes | None,
               progress: Progress | None) -> None:
        self.targets = targets
        self.work, self.shard, self.scratch = targets[0].work, targets[0].shard, targets[0].scratch
        plan = self.work.plan
        self.plan, self.reader = plan, reader
        self.hashes, self.progress = hashes, progress
        spec = plan.spec
        self.device = plan.device
        self.load_dtype = getattr(torch, spec.dtype) if spec.dtype else None
        self.layout = BlockLayout.for_shard(
            [j.a.itemsize for j in self.shard.jobs] + [j.b.itemsize for j in self.shard.jobs],
            [DTYPES[j.out_dtype][1] for j in self.shard.jobs],
            spec.chunk_elements, spec.buffer_memory, buffers.IO_BLOCK_BYTES,
        )
        self.pinned = self.device.type == "cuda"
        self.raw_pool = BufferPool(2 * self.layout.per_side, self.layout.raw_bytes, self.pinned)
        # a block's outputs at every t are filled before any is written
        self.out_pool = BufferPool(buffers.OUT_BUFFERS + len(targets) - 1, self.layout.out_bytes, self.pinned)
        # CPU merges: the reader threads take pass 1 of the blocks they read, the calling thread
        # pass 2; per-chunk sums added in order give the same float64 sums on any thread
        self.stats_on_read = self.device.type == "cpu"
        self.threads = torch.get_num_threads()
        self.cache_budget = page_cache_budget()
        self.bytes_read = 0
        self._scratch = threading.local()
        self._writers: list[ShardWriter] = []  #: the targets' writers, while :meth:`run_each` runs
        self._feed: ReadAhead | None = None
        self._sink: WriteBehind | None = None
        self._hashing: tuple[WriteBehind, WriteBehind] | None = None

    # ---------------------------------------------------------------- the shard

    def run(self) -> ShardOutcome:
        """Merge every tensor of the shard into ``<output>.partial/<file>``; journal it.

        Raises:
            CheckpointError: an input is unreadable or truncated.
            OutputWriteError: writing failed; no file is left at the shard's path.
        """
        return self.run_each()[0]

    def run_each(self) -> list[ShardOutcome]:
        """Merge every tensor of the shard into each target's ``<output>.partial/<file>``; journal
        those that are not scratch shards; return an outcome per target, in order.

        Raises:
            CheckpointError: an input is unreadable or truncated.
            OutputWriteError: writing failed; no file is left at any target's shard path.
        """
        started = time.perf_counter()
        try:
            with ExitStack() as stack:
                direct = self.plan.spec.direct_io
                writers = [stack.enter_context(ShardWriter(t.work.shard_path(t.shard),
                                                           [j.output for j in t.shard.jobs],
                                                           direct=direct, scratch=t.scratch))
                           for t in self.targets]
                # a failed write or hash frees no more buffers: the pool it would have fed back is
                # closed, so that no thread waits for it forever
                close_out, close_raw = (lambda e: self.out_pool.close()), (lambda e: self.raw_pool.close())
                self._sink = stack.enter_context(WriteBehind(self._write_out, on_error=close_out))
                self._hashing = (stack.enter_context(WriteBehind(self._hash_input, on_error=close_raw)),
                                 stack.enter_context(WriteBehind(self._hash_input, on_error=close_raw)))
                self._feed = stack.enter_context(
                    ReadAhead(self._read_tasks(), depth=buffers.READ_AHEAD, workers=buffers.READ_WORKERS))
                stack.push(self._stop_readers_on_error)
                self._writers = writers
                records = self._merge_tensors()
        finally:
            # the workers refer back to this object: without the cyclic GC (the command pauses it)
            # the pools would live on after the shard
            self._feed = self._sink = self._hashing = None
            self._writers = []
        seconds = time.perf_counter() - started
        outcomes = []
        for k, (target, writer) in enumerate(zip(self.targets, writers, strict=True)):
            record = ShardRecord(file=target.shard.file, size=writer.size, sha256=writer.sha256,
                                 tensors=len(target.shard.jobs))
            outcome = ShardOutcome(record, [r[k] for r in records], seconds, self.bytes_read)
            if target.scratch is None:
                target.work.journal(target.shard, outcome)
            outcomes.append(outcome)
        size = sum(o.record.size for o in outcomes)
        if len(outcomes) == 1:
            branches = Counter(r.branch for r in outcomes[0].tensors)
            what = ", ".join(f"{k} {v}" for k, v in sorted(branches.items()))
        else:
            what = f"at each of {len(outcomes)} t"
        log.info("shard %d/%d %s: %d tensors (%s), %s written in %.1f s (%s/s)",
                 self.shard.index + 1, len(self.plan.shards), self.shard.file, len(self.shard.jobs), what,
                 format_bytes(size), seconds, format_bytes(size / max(seconds, 1e-9)))
        return outcomes

    def _merge_tensors(self) -> list[list[TensorRecord]]:
        """Each tensor's record at every target (by tensor, then target)."""
        try:
            return [self._merge_tensor([t.shard.jobs[i] for t in self.targets])
                    for i in range(len(self.shard.jobs))]
        except BufferPoolClosed:
            assert self._sink is not None and self._hashing is not None
            for behind in (self._sink, *self._hashing):
                behind.check()  # the failure that closed the pool, not its consequence
            raise

    def _stop_readers_on_error(self, exc_type: object, exc: object, tb: object) -> bool:
        if exc_type is not None:
            self.raw_pool.close()  # a reader waiting for a buffer gives up
        return False

    # ---------------------------------------------------------------- one tensor

    def _merge_tensor(self, jobs: list[TensorJob]) -> list[TensorRecord]:
        """Keep, hold, or two passes: every block of the tensor (``jobs``: at each target's t) through
        the kernel, in read order."""
        job = jobs[0]
        src, cdtype = self._dtypes(job)
        stats, coeffs, held = SlerpStats(), None, []
        for kind, start, count in schedule(job, self.layout.block, self.layout.hold_blocks):
            read: BlockRead = next(self._feed)
            self._account(job, start, read)
            if read.b is None:  # "keep": model_1's tensor as it is
                self._emit_copy(read.a, src, job.out_dtype, count)
            elif kind == "pass2":
                if coeffs is None:
                    coeffs = [self._coefficients(j, stats, cdtype) for j in jobs]
                self._merge_block(read.a, read.b, src, cdtype, coeffs, job.out_dtype)
            else:
                stats = stats + (read.stats if read.stats is not None
                                 else self._block_stats(read.a.data, read.b.data, src, cdtype))
                if kind == "hold":
                    held.append((read.a, read.b))
                else:
                    self._release(read.a, read.b)
        if held:
            if self.plan.spec.norm_precision == "float32":
                coeffs = self._fusionbench_coefficients(jobs, held, src, cdtype)
            else:
                coeffs = [self._coefficients(j, stats, cdtype) for j in jobs]
            for a, b in held:
                self._merge_block(a, b, src, cdtype, coeffs, job.out_dtype)
        if coeffs is None:
            return [tensor_record(j, t.shard.file, None) for j, t in zip(jobs, self.targets, strict=True)]
        for j, coeff in zip(jobs, coeffs, strict=True):
            log.debug("%s at t=%g: %s (d=%.6g, s0=%.6g, s1=%.6g)", j.name, j.t, coeff.branch, coeff.d,
                      float(coeff.s0), float(coeff.s1))
        return [tensor_record(j, t.shard.file, c) for j, t, c in zip(jobs, self.targets, coeffs, strict=True)]

    def _dtypes(self, job: TensorJob) -> tuple[torch.dtype, torch.dtype]:
        """The dtype a job's inputs are loaded in, and the dtype SLERP computes in."""
        src = self.load_dtype or job.a.torch_dtype
        return src, compute_dtype(src)

    def _coefficients(self, job: TensorJob, stats: SlerpStats, cdtype: torch.dtype) -> SlerpCoefficients:
        spec = self.plan.spec
        return coefficients(job.t, stats, dtype=cdtype, DOT_THRESHOLD=spec.DOT_THRESHOLD,
                            epsilon=spec.epsilon)

    def _fusionbench_coefficients(self, jobs: list[TensorJob], held: list[tuple[Block, Block]],
                                  src: torch.dtype, cdtype: torch.dtype) -> list[SlerpCoefficients]:
        """``d`` as FusionBench takes it, from the whole held tensors (``norm_precision=float32``),
        once; each job's scalars at its t from that ``d`` and the norms."""
        def whole(blocks: list[Block]) -> torch.Tensor:  # a fresh tensor: it is overwritten
            flat = torch.cat([blk.data.to(self.device).to(src) for blk in blocks])
            return flat.to(cdtype).reshape(jobs[0].a.shape)
        spec = self.plan.spec
        first = fusionbench_coefficients(jobs[0].t, whole([a for a, _ in held]), whole([b for _, b in held]),
                                         DOT_THRESHOLD=spec.DOT_THRESHOLD, epsilon=spec.epsilon)
        others = [coefficients_from_d(j.t, first.d, first.norm_a, first.norm_b, dtype=cdtype,
                                      DOT_THRESHOLD=spec.DOT_THRESHOLD, epsilon=spec.epsilon)
                  for j in jobs[1:]]
        return [first, *(replace(c, norm_precision=first.norm_precision) for c in others)]

    def _account(self, job: TensorJob, start: int, read: BlockRead) -> None:
        """Count the bytes read and queue them for the inputs' SHA-256."""
        self.bytes_read += read.a.data.nbytes + (read.b.data.nbytes if read.b is not None else 0)
        self._hash_later(0, job.a, start, read.a)
        if read.b is not None:
            self._hash_later(1, job.b, start, read.b)

    # ---------------------------------------------------------------- reading

    def _read_tasks(self) -> Iterator[Callable[[], BlockRead]]:
        """The block reads of the shard in kernel order, as tasks for the read-ahead threads."""
        for job in self.shard.jobs:
            src, cdtype = self._dtypes(job)
            for kind, start, count in schedule(job, self.layout.block, self.layout.hold_blocks):
                def task(job=job, kind=kind, start=start, count=count, src=src, cdtype=cdtype) -> BlockRead:
                    a = self._read(job.a, start, count, kind)
                    if kind == "keep":
                        return BlockRead(a, None, None)
                    b = self._read(job.b, start, count, kind)
                    stats = None
                    if self.stats_on_read and kind in ("hold", "pass1"):
                        stats = self._block_stats(a.data, b.data, src, cdtype)
                    return BlockRead(a, b, stats)
                yield task

    def _read(self, info: TensorInfo, start: int, count: int, kind: str) -> Block:
        nbytes = count * info.itemsize
        buf = self.raw_pool.take(aligned_capacity(nbytes))
        # a tensor read twice stays in the page cache between its passes, if it fits there
        page_cache: PageCache = "bypass"
        if kind in ("pass1", "pass2") and 2 * info.nbytes <= self.cache_budget:
            page_cache = "keep" if kind == "pass1" else "drop"
        skew = self.reader.read_aligned(info, start * info.itemsize, nbytes, buf, page_cache) if count else 0
        data = buf[skew : skew + nbytes]
        if skew % info.itemsize:  # a tensor not aligned to its element size in the file
            data = buf[:nbytes].copy_(data.clone())
        hashed = self.hashes is not None and self.hashes.get(info.file) is not None
        return Block(Lease(self.raw_pool, buf, 2 if hashed else 1), data.view(info.torch_dtype))

    def _release(self, *blocks: Block) -> None:
        # a CUDA copy out of a pinned buffer may still be running: the pool waits for it
        pending = torch.cuda.Event() if self.pinned else None
        if pending is not None:
            pending.record()
        for block in blocks:
            block.lease.release(pending)

    def _hash_later(self, side: int, info: TensorInfo, start: int, block: Block) -> None:
        # in read order, on a thread per model (one SHA-256 stream runs at about 1.7 GB/s)
        hasher = self.hashes.get(info.file) if self.hashes is not None else None
        if hasher is not None:
            self._hashing[side].put((hasher, info.offset + start * info.itemsize,
                                     block.data.view(torch.uint8), block.lease))

    @staticmethod
    def _hash_input(item: tuple[Any, int, torch.Tensor, Lease]) -> None:
        hasher, pos, data, lease = item
        try:
            hasher.feed(pos, memoryview(data.numpy()))
        finally:
            lease.release()

    # ---------------------------------------------------------------- the kernel

    def _pieces(self, a_raw: torch.Tensor, b_raw: torch.Tensor, src: torch.dtype, dtype: torch.dtype,
                size: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """A block as (offset, a, b) pieces of ``size`` elements in ``dtype`` (the compute dtype,
        or float64 for pass 1). On a CPU they are copies in per-thread scratch buffers: pass 2
        computes in place, and the block itself may still be hashed."""
        if src != a_raw.dtype:  # ``dtype`` asks for the models to be loaded in another dtype
            a_raw, b_raw = a_raw.to(src), b_raw.to(src)
        if self.device.type == "cpu":
            sa, sb = self._scratch_pair("in", dtype, self.layout.chunk)
            for i in range(0, a_raw.numel(), size):
                n = min(size, a_raw.numel() - i)
                yield i, sa[:n].copy_(a_raw[i : i + n]), sb[:n].copy_(b_raw[i : i + n])
            return
        a = a_raw.to(self.device, non_blocking=True).to(dtype)
        b = b_raw.to(self.device, non_blocking=True).to(dtype)
        for i in range(0, a.numel(), size):
            yield i, a[i : i + size], b[i : i + size]

    def _scratch_pair(self, use: str, dtype: torch.dtype, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Two buffers of ``numel`` elements in ``dtype``, this thread's own for ``use``."""
        buffers = getattr(self._scratch, "buffers", None)
        if buffers is None:
            buffers = self._scratch.buffers = {}
        if (use, dtype) not in buffers:
            buffers[use, dtype] = (torch.empty(numel, dtype=dtype, device=self.device),
                                   torch.empty(numel, dtype=dtype, device=self.device))
        return buffers[use, dtype]

    def _block_stats(self, a_raw: torch.Tensor, b_raw: torch.Tensor, src: torch.dtype,
                     cdtype: torch.dtype) -> SlerpStats:
        """Pass 1 of a block: float64 sums (:func:`~slerp_plugin.kernel.accumulate_chunks`)."""
        if not hasattr(self._scratch, "threads"):
            # BLAS thread counts are per thread (MKL): the same count on every thread
            torch.set_num_threads(self.threads)
            self._scratch.threads = self.threads
        # on a GPU the block moves once in the compute dtype; the kernel widens each chunk there
        dtype = torch.float64 if self.device.type == "cpu" else cdtype
        pieces = self._pieces(a_raw, b_raw, src, dtype, self.layout.chunk)
        return accumulate_chunks((a, b) for _, a, b in pieces)

    def _merge_block(self, a: Block, b: Block, src: torch.dtype, cdtype: torch.dtype,
                     coeffs: list[SlerpCoefficients], out_dtype: str) -> None:
        """Pass 2 of a block, once per target (``coeffs``: each target's coefficients)."""
        # element-wise: the piece size changes no bit, only how well the CPU cache is used
        size = self.layout.chunk if self.device.type == "cpu" else self.layout.block
        outs = [self._take_out(a.data.numel(), out_dtype) for _ in coeffs]
        last = len(coeffs) - 1
        for i, x, y in self._pieces(a.data, b.data, src, cdtype, size):
            for k, (coeff, (_, out)) in enumerate(zip(coeffs, outs, strict=True)):
                if k == last:  # the pieces are not needed again: computed in place
                    merged = combine(x, y, coeff, out=x, scratch=y)
                else:
                    o, s = self._scratch_pair("out", x.dtype, size)
                    merged = combine(x, y, coeff, out=o[: x.numel()], scratch=s[: x.numel()])
                out[i : i + x.numel()].copy_(merged)
        self._release(a, b)
        for writer, (buf, out) in zip(self._writers, outs, strict=True):
            self._emit(writer, buf, out)

    def _emit_copy(self, a: Block, src: torch.dtype, out_dtype: str, count: int) -> None:
        value = a.data.to(src)
        for writer in self._writers:
            buf, out = self._take_out(count, out_dtype)
            out.copy_(value)
            self._emit(writer, buf, out)
        self._release(a)

    # ---------------------------------------------------------------- writing

    def _take_out(self, count: int, out_dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
        size = DTYPES[out_dtype][1]
        buf = self.out_pool.take(count * size)
        return buf, buf[: count * size].view(torch_dtype(out_dtype))

    def _emit(self, writer: ShardWriter, buf: torch.Tensor, out: torch.Tensor) -> None:
        self._sink.put((writer, buf, out))
        if self.progress:
            self.progress(out.nbytes)

    def _write_out(self, item: tuple[ShardWriter, torch.Tensor, torch.Tensor]) -> None:
        writer, buf, out = item
        writer.write(memoryview(out.view(torch.uint8).numpy()))
        self.out_pool.give(buf)


def tensor_record(job: TensorJob, shard: str, coeff: SlerpCoefficients | None) -> TensorRecord:
    """The manifest record of one merged (or kept) tensor."""
    base = {"name": job.name, "shape": list(job.a.shape), "dtype": job.out_dtype, "shard": shard, "t": job.t}
    if job.action == "keep":
        return TensorRecord(**base, branch="shape-kept")
    assert coeff is not None  # every merged tensor has at least one block, so pass 1 ran
    return TensorRecord(**base, **coeff.as_record())
