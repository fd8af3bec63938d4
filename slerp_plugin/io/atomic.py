"""Files that appear whole or not at all: written aside, fsynced, renamed into place."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .crashpoints import step


def write_json_atomic(path: Path, data: Any) -> Path:
    """Write ``data`` as indented JSON to ``path`` through a temporary file (named for this
    process, so two writers never share it), an fsync and a rename; returns ``path``. Each of the
    three is a crash point (:mod:`.crashpoints`)."""
    return write_bytes_atomic(path, (json.dumps(data, indent=2) + "\n").encode())


def write_bytes_atomic(path: Path, data: bytes, *, crash_points: bool = True) -> Path:
    """Write ``data`` to ``path`` as :func:`write_json_atomic` does; returns ``path``. Without
    ``crash_points`` (files outside a merge's output, e.g. in a temporary folder), no step is
    counted."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    mark = step if crash_points else _no_step
    mark(f"write {path.name} (temporary file)")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            mark(f"fsync {path.name} (temporary file)")
            os.fsync(f.fileno())
        mark(f"rename {path.name} into place")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _no_step(name: str) -> None:
    pass


def fsync_dir(path: Path) -> None:
    """Make the entries of folder ``path`` (renames, new files) durable."""
    step(f"fsync folder {path.name}")
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
