"""Which files of a model folder a merge reads and copies, and how they are described in a manifest."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import INDEX_NAME, Checkpoint
from .hashing import cached_sha256
from .manifest import InputFile, InputRecord
from .spec import ModelRef

CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def model_files(folder: Path, checkpoint: Checkpoint | None = None) -> list[Path]:
    """Config files, the index and the safetensors files of a model folder."""
    checkpoint = checkpoint or Checkpoint.open(folder)
    names = CONFIG_FILES + (INDEX_NAME,)
    return [folder / n for n in names if (folder / n).is_file()] + list(checkpoint.files)


def tokenizer_files(folder: Path) -> list[Path]:
    """The tokenizer files present in ``folder``."""
    return [folder / n for n in TOKENIZER_FILES if (folder / n).is_file()]


def describe_input(
    ref: ModelRef, folder: Path, files: list[Path], hashes: dict[Path, str] | None = None
) -> InputRecord:
    """A manifest record of one input: reference, folder and each file's size and SHA-256
    (from ``hashes`` or computed, cached)."""
    hashes = hashes or {}
    return InputRecord(
        ref=ref.ref,
        revision=ref.revision,
        path=str(folder),
        files=[
            InputFile(name=str(f.relative_to(folder)), size=f.stat().st_size,
                      sha256=hashes.get(f) or cached_sha256(f))
            for f in files
        ],
    )
