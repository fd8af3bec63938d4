"""Where an evaluated model's weights come from: a folder, where every tensor is there at once, or
a :class:`TensorFeed`, to which a streaming merge offers each shard's tensors as it has them.

The evaluator (:class:`~slerp_plugin.validate.streaming.StreamedCausalLM`) asks for the tensors of
one module just before the module runs (:meth:`acquire`) and says when the module is done with
them (:meth:`release`). A feed lets the streaming merge tell when the evaluator has used all it was
offered (:meth:`TensorFeed.settle`) and which offered tensors it will still read (the tied LM head
reads the embedding table at the very end), so that a shard's files can be deleted safely.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

from ..errors import ValidationInputError
from ..io.safetensors import TensorInfo


class FolderWeights:
    """Every tensor of a checkpoint, there from the start."""

    def __init__(self, tensors: Mapping[str, TensorInfo]) -> None:
        self.tensors = tensors

    def acquire(self, names: Sequence[str]) -> list[TensorInfo]:
        """Where the bytes of ``names`` are."""
        return [self.tensors[n] for n in names]

    def release(self, names: Sequence[str]) -> None:
        """Nothing to do: the files stay."""


class FeedClosed(Exception):
    """The feed was closed (the streaming merge stopped) while the evaluator waited for tensors."""


class TensorFeed:
    """Tensors offered over time to one evaluator thread, which waits for those it needs.

    The evaluator calls :meth:`expect` once (how many of its modules read each tensor), then
    :meth:`acquire` / :meth:`release` around each module, and :meth:`finish` when it ends (however
    it ends). The streaming merge calls :meth:`offer` with a shard's tensors, :meth:`settle` to wait
    until the evaluator has gone as far as those tensors take it, :meth:`still_needed` and
    :meth:`withdraw` before deleting the shard's files, and :meth:`close` to stop a waiting evaluator.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._available: dict[str, TensorInfo] = {}
        self._gone: set[str] = set()
        self._needed: dict[str, int] = {}
        self._offers = 0
        self._blocked_at: int | None = None  # the offer count when the evaluator last found a tensor missing
        self._finished = False
        self._closed = False

    # ------------------------------------------------------------ the evaluator's side

    def expect(self, readers: Mapping[str, int]) -> None:
        """How many modules will read each tensor (a tensor is needed until they all released it)."""
        with self._cond:
            self._needed = dict(readers)

    def acquire(self, names: Sequence[str]) -> list[TensorInfo]:
        """Where the bytes of ``names`` are, once all of them have been offered.

        Raises:
            FeedClosed: the feed was closed first.
            ValidationInputError: a tensor was withdrawn before this read (a module the model runs
                again after its shard was deleted).
        """
        with self._cond:
            while not self._closed and any(n not in self._available for n in names):
                gone = [n for n in names if n in self._gone]
                if gone:
                    raise ValidationInputError(f"{gone[0]} is read again after its shard was deleted; "
                                               "this model cannot be evaluated while it streams")
                self._blocked_at = self._offers
                self._cond.notify_all()
                self._cond.wait()
            self._blocked_at = None
            if self._closed:
                raise FeedClosed
            return [self._available[n] for n in names]

    def release(self, names: Sequence[str]) -> None:
        """One module is done with ``names``."""
        with self._cond:
            for n in names:
                self._needed[n] = self._needed.get(n, 1) - 1

    def finish(self) -> None:
        """The evaluator ended (its result, or its error, is with the caller)."""
        with self._cond:
            self._finished = True
            self._cond.notify_all()

    # ------------------------------------------------------------ the streaming merge's side

    def offer(self, tensors: Mapping[str, TensorInfo]) -> None:
        """``tensors`` can be read now (until :meth:`withdraw`)."""
        with self._cond:
            self._available.update(tensors)
            self._gone.difference_update(tensors)
            self._offers += 1
            self._cond.notify_all()

    def settle(self) -> None:
        """Wait until the evaluator waits for a tensor not offered yet, or has ended."""
        with self._cond:
            self._cond.wait_for(lambda: self._finished or self._closed or self._blocked_at == self._offers)

    def still_needed(self, names: Sequence[str]) -> list[str]:
        """Those of ``names`` that a module yet to run (or running) will read."""
        with self._cond:
            return [n for n in names if self._needed.get(n, 0) > 0]

    def withdraw(self, names: Sequence[str]) -> None:
        """``names`` can no longer be read (their file is about to be deleted)."""
        with self._cond:
            for n in names:
                if self._available.pop(n, None) is not None:
                    self._gone.add(n)

    def close(self) -> None:
        """Stop the evaluator: a waiting :meth:`acquire` raises :class:`FeedClosed`."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def finished(self) -> bool:
        with self._cond:
            return self._finished

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (the streaming merge stopped)."""
        with self._cond:
            return self._closed
