"""Model folders: which files a merge reads and copies, and a model resolved to a local folder."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ModelNotFoundError
from ..spec import ModelRef
from .index import INDEX_NAME
from .safetensors import Checkpoint


@dataclass
class ResolvedModel:
    """A model ready to read: its local ``path``, the Hub ``commit`` it came from (None for local
    folders), and the SHA-256 of files the Hub already vouched for (``hashes``, by local path)."""

    path: Path
    commit: str | None = None
    hashes: dict[Path, str] = field(default_factory=dict)

CONFIG_FILES = ("config.json", "generation_config.json")
#: the marker this tool puts in a merge output (and its ``.partial``): which output it belongs to
OUTPUT_MARKER = ".slerp_merge.json"
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


def local_model(ref: ModelRef, role: str) -> ResolvedModel:
    """``ref`` as a local model folder; ``role`` (e.g. ``"model_1"``) names it in errors.

    Raises:
        ModelNotFoundError: ``ref`` is a file, has a revision, or names no folder.
    """
    path = Path(ref.ref).expanduser()
    if path.is_dir() and ref.revision is None:
        return ResolvedModel(path.resolve())
    if path.exists() and not path.is_dir():
        raise ModelNotFoundError(f"{role}: {ref.ref} is a file, expected a model folder", path=path)
    raise ModelNotFoundError(f"{role}: model folder not found: {ref}", path=path)
