"""Evaluations of models kept for reuse: a parent is evaluated once, not once per merge.

An entry is keyed by what decides the result: the model's content (SHA-256 of its weight files and
its config.json), the evaluation token ids (so the text, its length and the tokenizer), the window
length, the prompts and completion length, the device type, the compute dtype, the memory allowed
for completions, and the torch and transformers versions. Entries are JSON files named by the key,
written atomically; an entry that does not read back as a valid evaluation is ignored.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from pydantic import ValidationError

from ..io.atomic import write_json_atomic
from ..io.hashing import cache_root, cached_sha256
from ..io.safetensors import Checkpoint
from .report import ModelEvaluation

log = logging.getLogger(__name__)


def model_content_id(folder: Path) -> str:
    """SHA-256 over the model's weight files' checksums and its config.json (checksums come from
    the checksum cache when the files are unchanged since a merge read them)."""
    folder = Path(folder)
    files = sorted({info.file for info in Checkpoint.open(folder).tensors.values()})
    config = folder / "config.json"
    return content_id([(f.name, cached_sha256(f)) for f in files],
                      config.read_bytes() if config.is_file() else b"")


def content_id(weight_files: list[tuple[str, str]], config: bytes) -> str:
    """The id :func:`model_content_id` gives a model whose weight files are ``(name, SHA-256)``
    and whose config.json holds ``config`` (also for a model on the Hub, from its listed hashes)."""
    digest = hashlib.sha256()
    for name, sha in sorted(weight_files):
        digest.update(f"{name}\0{sha}\n".encode())
    digest.update(hashlib.sha256(config).hexdigest().encode())
    return digest.hexdigest()


def evaluation_key(folder: Path | None, ids: torch.Tensor, max_length: int, prompts: tuple[str, ...],
                   max_new_tokens: int, device_type: str, dtype: str, generation_memory: int, *,
                   content: str | None = None) -> str:
    """The cache key of one model's evaluation (see the module docstring); the model is
    ``folder``'s, or the one whose :func:`content_id` is ``content``."""
    import transformers

    parts = {
        "model": content if content is not None else model_content_id(Path(folder or ".")),
        "ids": hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest(),
        "max_length": max_length, "prompts": list(prompts), "max_new_tokens": max_new_tokens,
        "device": device_type, "dtype": dtype, "generation_memory": generation_memory,
        "torch": torch.__version__, "transformers": transformers.__version__,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


class EvaluationCache:
    """Evaluations stored as ``<root>/<key>.json`` (default root: ``<cache root>/evaluations``)."""

    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root) if root is not None else cache_root() / "evaluations"

    def get(self, key: str) -> ModelEvaluation | None:
        """The stored evaluation for ``key``, or None (absent or unreadable)."""
        path = self.root / f"{key}.json"
        try:
            return ModelEvaluation.model_validate_json(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError, ValidationError) as e:
            log.warning("ignoring the unreadable cached evaluation %s: %s", path, type(e).__name__)
            return None

    def put(self, key: str, evaluation: ModelEvaluation) -> None:
        """Store ``evaluation`` under ``key``; an unwritable cache only costs time later."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            record = evaluation.model_dump(mode="json", exclude={"cached"})
            write_json_atomic(self.root / f"{key}.json", record)
        except OSError as e:
            log.warning("cannot store the evaluation in %s: %s", self.root, e.strerror or e)
