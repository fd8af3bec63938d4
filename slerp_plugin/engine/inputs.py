"""SHA-256 of a merge's input files for the manifest, streamed from the bytes the merge reads.

:meth:`InputHashes.start` makes a :class:`~slerp_plugin.io.hashing.StreamHasher` for each input
weight file whose checksum is not known yet (the Hub vouched for it, or the cache holds it); the
merge feeds them as it reads each file front to back, and :meth:`InputHashes.finish` completes
them, hashing whatever was never read.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..io.hashing import StreamHasher, cached_sha256, has_cached_sha256, remember_sha256
from ..io.model_files import model_files, tokenizer_files
from ..io.prefetch import Prefetch
from .plan import MergePlan


class InputHashes:
    """The stream hashers of one merge's input files, by path."""

    def __init__(self, plan: MergePlan, hashers: dict[Path, StreamHasher]) -> None:
        self.plan = plan
        self.hashers = hashers

    @classmethod
    def start(cls, plan: MergePlan, prefetch: Prefetch | None = None) -> InputHashes:
        """A hasher, primed with the header, for each input weight file whose checksum is not
        known; those ``prefetch`` started while the process was starting are taken over."""
        started = prefetch.take_hashers() if prefetch is not None else {}
        hashers = {}
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
                hashers[f] = hasher
        return cls(plan, hashers)

    def get(self, file: Path) -> StreamHasher | None:
        return self.hashers.get(file)

    def finish(self) -> dict[Path, str]:
        """SHA-256 of every input file (weights, configs, tokenizer) whose checksum the Hub did not
        give: finished from the bytes the merge streamed, else cached or read here."""
        plan = self.plan
        files = {f for role in ("model_1", "model_2", "tokenizer") for f in input_files(plan, role)}
        out = {}
        for f in sorted(files - set(plan.known_hashes)):
            hasher = self.hashers.get(f)
            out[f] = hasher.hexdigest() if hasher is not None else cached_sha256(f)
            if hasher is not None:
                remember_sha256(f, out[f])
        return out


def input_files(plan: MergePlan, role: str) -> list[Path]:
    """The files of input ``role`` that the merge reads or copies."""
    if role == "tokenizer":
        return tokenizer_files(plan.paths[role])
    return model_files(plan.paths[role], plan.checkpoints[role])
