"""The dashboard's index of merges and run records: each folder is read again only when it changed.

A year of nightly runs is thousands of run folders, each with a manifest of up to a few MB; reading
them all on every request made the dashboard slower by the day. The index keeps, per run folder
and per merge folder, what the dashboard shows, keyed by the folder's identity (inode) and mtime.
Every record this tool writes appears by a rename into its folder (manifest, validation report,
upload record, run and failure records), which changes that folder's mtime, so a request costs
one ``stat`` per folder and re-reads only what changed. The index lives in the API server's memory:
its size is a few hundred bytes per merge, and it does not grow from one request to the next.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

Signature = tuple[int, int]  #: (inode, mtime in ns) of a folder


def signature(folder: Path | str) -> Signature | None:
    """The folder's identity and mtime; None where it is gone."""
    try:
        st = os.stat(str(folder))
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


@dataclass
class _Run:
    folder: Path
    signature: Signature
    dag_id: str
    run_id: str
    records: dict[str, object]  #: the run's own records (run, failure, sweep) by name
    merges: dict[Path, tuple[Signature, object]] = field(default_factory=dict)


class FolderIndex:
    """Run folders ``<root>/<dag_id>/<run>/`` and their merge folders, loaded through ``load_run``
    (the run's records) and ``load_merge`` (one merge folder's entry), cached by signature.

    ``merge_folders(run)`` names the merge folders of a run folder. :meth:`scan` is thread-safe.
    """

    def __init__(self, load_run: Callable[[Path], tuple[str, dict[str, object]]],
                 merge_folders: Callable[[Path], Iterable[Path]],
                 load_merge: Callable[[Path, str, str], object]) -> None:
        self._load_run, self._merge_folders, self._load_merge = load_run, merge_folders, load_merge
        self._runs: dict[str, _Run] = {}
        self._lock = threading.Lock()
        self._last: tuple[tuple[str, ...], float, list[_Run]] | None = None
        self.reads = 0  #: folders (re)read since the index was made, for tests and benchmarks
        self.generation = 0  #: changes whenever a scan found anything added, changed or gone

    def scan(self, roots: Iterable[Path], *, max_age: float = 0.0) -> list[_Run]:
        """Every run under ``roots``, each with its merges, up to date, or as found by a scan of the
        same roots less than ``max_age`` seconds ago."""
        key = tuple(str(r) for r in roots)
        with self._lock:
            now = time.monotonic()
            if self._last is not None and self._last[0] == key and now - self._last[1] < max_age:
                return self._last[2]
            before = self.reads
            seen: dict[str, _Run] = {}
            for root in key:
                for dag_id, dag in _subfolders(root):
                    for _, run in _subfolders(dag):
                        cached = self._fresh_run(run, dag_id)
                        if cached is not None:
                            seen[run] = cached
            if self.reads != before or seen.keys() != self._runs.keys():
                self.generation += 1
            self._runs = seen
            self._last = (key, now, list(seen.values()))
            return self._last[2]

    def _fresh_run(self, folder: str, dag_id: str) -> _Run | None:
        sig = signature(folder)
        if sig is None:
            return None
        run = self._runs.get(folder)
        if run is None or run.signature != sig or run.dag_id != dag_id:
            self.reads += 1
            path = Path(folder)
            run_id, records = self._load_run(path)
            old = run.merges if run is not None else {}
            run = _Run(path, sig, dag_id, run_id, records)
            run.merges = {f: old.get(f, ((-1, -1), None)) for f in self._merge_folders(path)}
        for f, (msig, entry) in list(run.merges.items()):
            now = signature(f)
            if now is None:
                del run.merges[f]
                self.reads += 1
            elif now != msig or entry is None:
                self.reads += 1
                run.merges[f] = (now, self._load_merge(f, run.dag_id, run.run_id))
        return run


def _subfolders(folder: str) -> list[tuple[str, str]]:
    """(name, path) of each folder in ``folder`` (symbolic links left out)."""
    try:
        with os.scandir(folder) as it:
            return [(e.name, e.path) for e in it if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []
