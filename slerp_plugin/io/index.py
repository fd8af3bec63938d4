"""The index of a sharded safetensors checkpoint (``model.safetensors.index.json``), read strictly.

Torch-free, so the start-up read-ahead can use it while the process is still importing.
"""

from __future__ import annotations

import json
from pathlib import Path

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class InvalidIndex(ValueError):
    """The index cannot be read or is not a valid weight map."""


def is_plain_file_name(name: object) -> bool:
    """Whether ``name`` names a file inside the folder itself: no separators, not ``.``/``..``."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name)


def read_weight_map(index: Path) -> dict[str, str]:
    """Tensor name → shard file name, from an index file.

    Raises:
        InvalidIndex: unreadable, not JSON, no ``weight_map`` object, a name that is not a string,
            or a shard file name that is not a plain name inside the model folder.
    """
    try:
        doc = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise InvalidIndex(f"{index}: unreadable index ({type(e).__name__})") from e
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise InvalidIndex(f"{index}: corrupt index (no weight_map)")
    for name, file in weight_map.items():
        if not isinstance(file, str):
            raise InvalidIndex(f"{index}: weight_map[{name!r}] is not a file name ({type(file).__name__})")
        if not is_plain_file_name(file):
            raise InvalidIndex(f"{index}: weight_map[{name!r}] = {file!r} names a file outside the model "
                               "folder")
    return weight_map


def shard_names(index: Path) -> list[str]:
    """The shard files of an index in order of first appearance.

    Raises:
        InvalidIndex: see :func:`read_weight_map`.
    """
    return list(dict.fromkeys(read_weight_map(index).values()))
