"""Where a merge writes, and what it may replace or delete.

The rules (the README states them too):

- A merge writes into ``<output>.partial`` and appears at ``<output>`` by one rename when complete.
- Both carry this tool's marker file (:data:`OUTPUT_MARKER`) naming the very output they belong to.
  Nothing is deleted or replaced unless it carries the marker for this output: never an input,
  never the working directory, never a folder the user made (an empty folder is the one thing
  taken over, by the final rename).
- ``overwrite`` replaces only an earlier merge of this output: it is moved aside, and deleted once
  the new one is in place.
- An exclusive lock on the output (:func:`output_lock`) keeps two merges out of each other's way;
  the kernel releases it when its process dies.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from .. import __version__
from ..errors import OutputExistsError, OutputLockedError, OutputWriteError
from ..formats.manifest import Manifest
from ..io.atomic import fsync_dir, write_json_atomic
from ..io.crashpoints import step
from ..io.lock import FileLock, LockBusy
from ..io.model_files import OUTPUT_MARKER
from ..spec import MergeSpec

if TYPE_CHECKING:
    from .plan import MergePlan

log = logging.getLogger(__name__)

State = Literal["partial", "complete"]


def output_path(spec: MergeSpec) -> Path:
    return Path(spec.output).expanduser().resolve()


def partial_path(output: Path) -> Path:
    return output.with_name(output.name + ".partial")


def write_marker(folder: Path, output: Path, state: State) -> None:
    """Mark ``folder`` as this tool's ``state`` of ``output``."""
    write_json_atomic(folder / OUTPUT_MARKER, {"tool": "slerp_plugin", "version": __version__,
                                             "output": str(output), "state": state})


def marker(folder: Path) -> dict | None:
    """The marker of ``folder``, or None where there is none (or it is not ours)."""
    try:
        doc = json.loads((folder / OUTPUT_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("tool") == "slerp_plugin" else None


def carries_marker(folder: Path, output: Path, state: State) -> bool:
    """Whether ``folder`` is this tool's ``state`` of this very ``output``."""
    doc = marker(folder)
    return doc is not None and doc.get("output") == str(output) and doc.get("state") == state


def is_empty_dir(path: Path) -> bool:
    """Whether ``path`` is a folder (not a link to one) with nothing in it."""
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def unmarked_beginning(folder: Path) -> bool:
    """Whether ``folder`` holds only what this tool writes into a working folder before its marker:
    nothing, the marker's own temporary file, an empty ``.slerp_state/shards/``. (Earlier versions
    made the working folder first and marked it second, and a crash between left this state.)"""
    if not folder.is_dir() or folder.is_symlink():
        return False
    for entry in folder.rglob("*"):
        rel = entry.relative_to(folder).as_posix()
        if entry.is_symlink():
            return False
        if entry.is_dir() and rel in (".slerp_state", ".slerp_state/shards"):
            continue
        marker_tmp = "/" not in rel and rel.startswith(f"{OUTPUT_MARKER}.") and rel.endswith(".tmp")
        if entry.is_file() and marker_tmp:
            continue
        return False
    return True


def remove_ours(folder: Path) -> None:
    """Delete ``folder``, which carries this tool's marker, the marker last: a crash midway leaves
    a folder that is still recognisably ours (or an empty one)."""
    step(f"remove {folder.name}")
    for child in folder.iterdir():
        if child.name == OUTPUT_MARKER:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    step(f"remove {folder.name}: its marker")
    (folder / OUTPUT_MARKER).unlink(missing_ok=True)
    folder.rmdir()


def check_output(spec: MergeSpec, inputs: Mapping[str, Path], *, allow_finished: bool = False) -> bool:
    """Refuse an output that would touch what the merge did not make.

    With ``allow_finished``, an earlier merge this tool finished at the output is not refused here
    even without ``overwrite``: True is returned, and the caller refuses it unless it is this very
    merge (:func:`already_merged`), which a re-run after a crash just past the final rename finds.

    Raises:
        OutputExistsError: the output or its ``.partial`` overlaps an input, is (or holds) the
            working directory, or exists without this tool's marker for it (or exists and
            ``overwrite`` is off), with what to do.
    """
    out = output_path(spec)
    partial = partial_path(out)
    cwd = Path.cwd().resolve()
    if out == cwd or cwd.is_relative_to(out):
        raise OutputExistsError(f"output {out} is the current directory or holds it; choose a new folder",
                                path=out)
    for role, p in inputs.items():
        for target in (out, partial):
            if target == p or p.is_relative_to(target) or target.is_relative_to(p):
                raise OutputExistsError(f"output {target} overlaps the {role} folder {p}; choose another "
                                        "path", path=target)
    finished = allow_finished and not spec.overwrite and carries_marker(out, out, "complete")
    if not finished:
        _check_replaceable(out, spec.overwrite)
    check_partial(out)
    return finished


def already_merged(plan: MergePlan) -> bool:
    """Whether ``<output>`` is this tool's finished merge of this very plan (same inputs, options
    and shards: its manifest's plan fingerprint)."""
    if not carries_marker(plan.output, plan.output, "complete"):
        return False
    try:
        return Manifest.read(plan.output).plan_fingerprint == plan.fingerprint
    except (OSError, ValueError):
        return False


def refuse_existing(out: Path) -> None:
    """Refuse an output that exists and is not to be replaced.

    Raises:
        OutputExistsError: always, with what to do.
    """
    _check_replaceable(out, overwrite=False)


def check_partial(out: Path) -> None:
    """Refuse an ``<output>.partial`` that holds something this tool did not make for ``out``.

    Raises:
        OutputExistsError: with what to do.
    """
    partial = partial_path(out)
    if partial.exists() and not unmarked_beginning(partial) and not (
            carries_marker(partial, out, "partial") or carries_marker(partial, out, "complete")):
        raise OutputExistsError(f"{partial} exists but is not an unfinished merge of {out}; remove it "
                                "yourself or choose another output", path=partial)


def _check_replaceable(out: Path, overwrite: bool) -> None:
    if not (out.exists() or out.is_symlink()):
        return
    if not out.is_dir():
        raise OutputExistsError(f"output {out} exists and is not a folder; choose another path", path=out)
    if is_empty_dir(out):
        if os.path.ismount(out):
            raise OutputExistsError(f"output {out} is a mount point; write the merge into a folder inside it",
                                    path=out)
        return
    if not overwrite:
        raise OutputExistsError(f"output {out} already exists; choose another model_save_path, or set "
                                "overwrite=true to replace an earlier merge", path=out)
    if not carries_marker(out, out, "complete"):
        raise OutputExistsError(f"output {out} is not a merge slerp-merge made for this path, so it is never "
                                "replaced; remove it yourself or choose another path", path=out)


def move_into_place(plan: MergePlan) -> None:
    """Move the finished ``<output>.partial`` to ``<output>``. An earlier merge there is replaced
    only with ``overwrite``: moved aside first and deleted after the rename; an empty folder is
    taken over.

    Raises:
        OutputExistsError: ``<output>`` appeared during the merge and may not be replaced (the
            result stays in ``.partial``).
    """
    out, partial = plan.output, plan.partial
    if out.exists() or out.is_symlink():
        try:
            _check_replaceable(out, plan.spec.overwrite)
        except OutputExistsError as e:
            raise OutputExistsError(f"{e.message}; the finished merge is in {partial}", path=out) from e
        if is_empty_dir(out):
            step(f"remove the empty folder {out.name}")
            out.rmdir()
        else:
            aside = out.with_name(f"{out.name}.replaced-{os.getpid()}")
            step(f"move the earlier {out.name} aside")
            os.replace(out, aside)
    step(f"rename {partial.name} to {out.name}")
    os.replace(partial, out)
    fsync_dir(out.parent)
    remove_replaced(out)


def remove_replaced(out: Path) -> None:
    """Delete the earlier merges of ``out`` that :func:`move_into_place` moved aside (a crash may have left
    one, or an empty folder, behind). Only with the output locked exclusively."""
    for old in out.parent.glob(f"{out.name}.replaced-*"):
        if old.is_dir() and not old.is_symlink() and carries_marker(old, out, "complete"):
            remove_ours(old)
            log.info("removed the earlier merge of %s", out)
        elif is_empty_dir(old):  # what a crash in remove_ours can leave
            old.rmdir()


def lock_path(output: Path) -> Path:
    """The lock file of ``output``: beside it, hidden."""
    return output.with_name(f".{output.name}.slerp-lock")


def output_lock(output: Path, *, exclusive: bool, wait: bool, what: str) -> FileLock:
    """Lock ``output``: exclusive for a whole merge or for finishing it, shared for workers that
    each merge some of its shards. Without ``wait`` a held lock is an error at once; with it (Airflow
    retries, which may find an orphaned attempt still running) this waits, logging who holds it.

    Raises:
        OutputLockedError: held by another process, naming it (without ``wait``).
        OutputWriteError: the lock file cannot be created.
    """
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        return FileLock.acquire(lock_path(output), exclusive=exclusive, wait=wait, what=what,
                                on_wait=lambda who: log.info("waiting for %s: locked by %s", output, who))
    except LockBusy as e:
        raise OutputLockedError(f"output {output} is locked by {e.holder}; wait for it to finish or choose "
                                "another output", path=output) from e
    except OSError as e:
        raise OutputWriteError(f"cannot lock {output}: {e.strerror or e}", path=output) from e
