"""A model evaluated on its own thread from tensors handed to it shard by shard, as a merge makes
them: the evaluator of a streaming merge's gate and of a one-pass sweep of t.

:class:`FedEvaluator` runs the layer-streamed model (:class:`~.streaming.StreamedCausalLM`) over
the evaluation tokens, fed by a :class:`~.weights.TensorFeed`. :meth:`FedEvaluator.take` offers one
shard's tensors and returns once the model has gone as far as they take it; tensors a later module
still reads (a tied head reads the embedding table last, a layer may be split between shards) are
copied aside first, so the shard's files may then be deleted. A stopped run's evaluation goes on
where it was (:meth:`FedEvaluator.resume`) from a decoder layer's output and the copies kept aside.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import logging
import math
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Protocol

import torch

from ..engine.plan import format_bytes
from ..errors import first_line
from ..io.safetensors import TensorInfo
from .report import ModelEvaluation
from .streaming import LayerOutput, StreamedCausalLM
from .weights import FeedClosed, TensorFeed

log = logging.getLogger(__name__)


class DiskAccount(Protocol):
    """Where the bytes of copies kept aside are counted (a streaming merge's disk budget)."""

    def hold(self, n: int) -> None: ...

    def give(self, n: int) -> None: ...


class FedEvaluator:
    """One model's perplexity, computed as its tensors are handed over.

    Args:
        role: how logs and errors name the model.
        folder: the folder with its ``config.json``.
        layout: its tensors' names, shapes and dtypes.
        device: where it computes; ``dtype``: the compute dtype (None: as ``validate``).
        aside: a folder for the copies kept aside (created when needed; emptied by :meth:`close`).
        account: where those copies' bytes are counted (None: nowhere).

    Raises:
        ValidationInputError: the model cannot be built or does not match ``layout``.
    """

    def __init__(self, role: str, folder: Path, layout: Mapping[str, TensorInfo], device: torch.device,
                 dtype: torch.dtype | None, aside: Path, account: DiskAccount | None = None) -> None:
        self.role = role
        self.feed = TensorFeed()
        self.model = StreamedCausalLM(folder, device, dtype, weights=self.feed, layout=layout)
        self.aside, self.account = aside, account
        self.nll: tuple[float, int] | None = None
        self.error: BaseException | None = None
        self.seconds = 0.0
        self.tokens = 0
        self._thread: threading.Thread | None = None
        self._kept: dict[str, TensorInfo] = {}
        self._kept_sha: dict[str, str] = {}
        self._dropped: dict[str, TensorInfo] = {}  # copies no module reads, deleted by release_dropped
        #: points are saved (a streaming merge's gate): copies kept aside are hashed as they are made,
        #: and those no longer needed wait for :meth:`release_dropped` (a saved point may name them)
        self.resumable = False

    @property
    def tied_bytes(self) -> int:
        """Bytes of the tensors more than one module reads (kept aside until the end)."""
        return self.model.shared_bytes

    @property
    def kept(self) -> dict[str, tuple[TensorInfo, str]]:
        """The copies kept aside now: name → (where, SHA-256 of its bytes)."""
        return {n: (i, self._kept_sha[n]) for n, i in self._kept.items()}

    @property
    def reached(self) -> LayerOutput | None:
        """The output of the last decoder layer run, while the evaluation could go on from it
        (:meth:`resume`); None once it has ended."""
        return None if self.feed.finished or self.feed.closed else self.model.reached

    def resume(self, reached: LayerOutput, kept: Mapping[str, tuple[TensorInfo, str]]) -> None:
        """Go on from an earlier run's :attr:`reached` and its copies kept aside (their files,
        checked by the caller); call before :meth:`start`.

        Raises:
            ValueError: ``reached`` does not fit the model.
        """
        self.model.skip_through(reached)
        for name, (info, sha) in kept.items():
            self._kept[name], self._kept_sha[name] = info, sha
            if self.account is not None:
                self.account.hold(info.nbytes)
        if kept:
            self.feed.offer({n: i for n, (i, _) in kept.items()})

    def start(self, ids: torch.Tensor, max_length: int) -> None:
        """Begin the evaluation of ``ids`` in windows of ``max_length`` on a thread of its own."""
        self.tokens = int(ids.numel())
        return_large_blocks()

        def run() -> None:
            started = time.perf_counter()
            try:
                self.nll = self.model.negative_log_likelihood(ids, max_length)
            except BaseException as e:
                self.error = e
            finally:
                self.seconds = time.perf_counter() - started
                self.feed.finish()
        self._thread = threading.Thread(target=run, name=f"evaluate-{self.role}", daemon=True)
        self._thread.start()

    def take(self, tensors: Mapping[str, TensorInfo]) -> None:
        """Offer one shard's ``tensors``; return once the model has used what it can of them, with
        the tensors a later module reads copied aside (the shard's files may go after this). Once
        the merge stopped (:meth:`stop`) nothing is done: the copies stay for a resumed run."""
        if self.feed.closed:
            return
        self.feed.offer(tensors)
        self.feed.settle()
        if self.feed.closed:
            return
        needed = self.feed.still_needed(list(tensors)) if not self.feed.finished else []
        kept = {}
        for name in needed:
            info = tensors[name]
            self.aside.mkdir(parents=True, exist_ok=True)
            path = self.aside / f"{self.role}-{_safe(name)}.bin"
            self._kept_sha[name] = _copy_range(info.file, info.offset, info.nbytes, path,
                                               for_point=self.resumable)
            if self.account is not None:
                self.account.hold(info.nbytes)
            kept[name] = self._kept[name] = replace(info, file=path, offset=0)
            log.info("%s keeps %s (%s) for a later module", self.role, name, format_bytes(info.nbytes))
        self.feed.withdraw([n for n in tensors if n not in kept])
        if kept:
            self.feed.offer(kept)
        earlier = [n for n in self._kept if n not in kept]
        if self.feed.closed:
            return
        self._drop(set(earlier) - set(self.feed.still_needed(earlier)) if not self.feed.finished else earlier)

    def _drop(self, names: set[str] | list[str]) -> None:
        self.feed.withdraw(sorted(names))
        for name in names:
            self._dropped[name] = self._kept.pop(name)
            self._kept_sha.pop(name, None)
        if not self.resumable:
            self.release_dropped(set())

    def release_dropped(self, keep: set[Path]) -> None:
        """Delete the copies no module reads any more, but those in ``keep``."""
        for name, info in list(self._dropped.items()):
            if info.file not in keep:
                del self._dropped[name]
                info.file.unlink(missing_ok=True)
                if self.account is not None:
                    self.account.give(info.nbytes)

    def stop(self) -> None:
        """End a waiting evaluation (nothing more will be offered)."""
        self.feed.close()

    def close(self) -> None:
        """Stop, wait for the thread, delete the copies kept aside, release the model."""
        self.feed.close()
        if self._thread is not None:
            self._thread.join()
        self._drop(list(self._kept))
        self.release_dropped(set())
        self.model.close()

    def problem(self) -> str | None:
        """Why there is no perplexity (after :meth:`close`), or None."""
        if self.nll is not None and self.error is None:
            return None
        if self.error is None or isinstance(self.error, FeedClosed):
            return "it reads a tensor no shard holds"
        return first_line(self.error)

    def evaluation(self, note: str | None = None) -> ModelEvaluation:
        """The result (after :meth:`close`, with :meth:`problem` None)."""
        nll, count = self.nll  # type: ignore[misc]
        ppl = math.exp(nll / max(count, 1))
        dtype = str(self.model.dtype).removeprefix("torch.")
        log.info("perplexity of %s: %.4f (%s, %s, fed shard by shard, %.1f s)", self.role, ppl,
                 self.model.device, dtype, self.seconds)
        return ModelEvaluation(perplexity=ppl, tokens=self.tokens, device=str(self.model.device), dtype=dtype,
                               mode="layer-streamed", seconds=round(self.seconds, 3), generation_note=note)


def _safe(name: str) -> str:
    """A tensor name as a file name."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def _copy_range(src: Path, offset: int, nbytes: int, dest: Path, block: int = 64 << 20, *,
                for_point: bool = False) -> str:
    """Bytes ``[offset, offset + nbytes)`` of ``src`` into a new file ``dest``. With ``for_point``
    (a saved point may name it) the copy is on disk when this returns and its SHA-256 is returned;
    otherwise an empty string."""
    sha = hashlib.sha256() if for_point else None
    with open(src, "rb") as fin, open(dest, "wb") as fout:
        fin.seek(offset)
        left = nbytes
        while left:
            data = fin.read(min(block, left))
            if not data:
                raise OSError(f"{src}: shorter than expected")
            fout.write(data)
            if sha is not None:
                sha.update(data)
            left -= len(data)
        if sha is None:
            return ""
        fout.flush()
        os.fsync(fout.fileno())
    return sha.hexdigest()


def return_large_blocks(threshold: int = 1 << 20, keep: int = 32 << 20) -> None:
    """Blocks of ``threshold`` bytes or more are mapped and unmapped (glibc otherwise raises its
    threshold after the first free and keeps up to 32 MB blocks in each thread's heap: with the
    evaluators' threads beside the merge's, hundreds of MB no thread uses). Each heap keeps up to
    ``keep`` free bytes at its top for the smaller blocks (set with the threshold, the default of
    128 KB would give back and fault in again a transfer's buffers at every read). A mapped block is
    zeroed by the system each time, so code that runs beside the evaluators reuses its large
    buffers. A no-op without glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, keep)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass
