"""A crash-point harness: run ``slerp-merge`` stopped at the N-th step of the output protocol
(:mod:`slerp_plugin.io.crashpoints`), for every N the run reaches, then run it again.

Each run is a child of a fork server that has imported the package and torch once and composed the
command's config (:mod:`crash_harness_warmup`), so a run costs a fraction of a second, not an
interpreter start. The child applies the caller's environment and
working directory, arms the crash point and calls the command's :func:`main`; ``exit``/``kill``
stop it with no cleanup at all, ``raise`` lets every ``finally`` run.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

_CTX = multiprocessing.get_context("forkserver")
_CTX.set_forkserver_preload(["torch", "slerp_plugin.cli.main", "slerp_plugin.merge",
                             "slerp_plugin.stream.pipeline", "huggingface_hub", "crash_harness_warmup"])


def _start_server() -> None:
    """Start the fork server, unless it runs, with this folder on its import path (Python 3.11's fork
    server does not take the parent's ``sys.path``), so that it can preload the warm-up module."""
    from multiprocessing import forkserver

    old = os.environ.get("PYTHONPATH")
    here = str(Path(__file__).resolve().parent)
    os.environ["PYTHONPATH"] = os.pathsep.join([here, old]) if old else here
    try:
        forkserver.ensure_running()
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old


def _child(argv: list[str], env: dict[str, str], cwd: str, stdout: str, stderr: str,
           crash: tuple[int | None, str, str | None] | None = None, program: str = "slerp-merge") -> None:
    """In the forked process: the caller's environment, folder and output files, the crash point
    ``(at, mode, log)`` armed if given, then ``program`` (the command's :func:`main`, or another
    console script) and an exit with its status."""
    import importlib

    os.environ.clear()
    os.environ.update(env)
    import huggingface_hub.constants

    importlib.reload(huggingface_hub.constants)  # read from the environment when the server imported it
    os.chdir(cwd)
    for fd, path in ((1, stdout), (2, stderr)):
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(out, fd)
        os.close(out)
    from slerp_plugin.cli.main import main

    if crash is not None:
        from slerp_plugin.io import crashpoints

        # a killed run leaves its temporary folders: keep them inside the test's own folder
        tempfile.tempdir = os.path.join(cwd, ".harness-tmp")
        os.makedirs(tempfile.tempdir, exist_ok=True)
        crashpoints.arm(*crash)  # type: ignore[arg-type]
    code = main(argv) if program == "slerp-merge" else _console_script(program, argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _console_script(name: str, argv: list[str]) -> int:
    """The exit status of console script ``name`` called with ``argv``, as its wrapper script's
    ``sys.exit(entry())`` would end the process."""
    from importlib.metadata import entry_points

    (script,) = entry_points(group="console_scripts", name=name)
    sys.argv = [name, *argv]
    try:
        status = script.load()()
    except SystemExit as e:
        status = e.code
    if status is None or isinstance(status, int):
        return status or 0
    print(status, file=sys.stderr)
    return 1


def run_command(argv: list[str], cwd: Path, env: dict[str, str] | None = None,
                timeout: float = 300, program: str = "slerp-merge") -> subprocess.CompletedProcess:
    """Console script ``program argv`` (default: ``slerp-merge``) run to its end in ``cwd`` with
    ``env`` (default: this process's), as :func:`subprocess.run` with ``capture_output=True,
    text=True`` would report it, forked from the warm server instead of a new interpreter (what a run
    does after start-up is the same: the server started as any interpreter does, import hooks
    included)."""
    with tempfile.TemporaryDirectory(prefix="cli-run-") as folder:
        out, err = Path(folder) / "stdout", Path(folder) / "stderr"
        env = dict(os.environ if env is None else env)
        code = _fork((list(argv), env, str(cwd), str(out), str(err), None, program), timeout)
        if code is None:
            raise subprocess.TimeoutExpired([program, *argv], timeout)
        return subprocess.CompletedProcess([program, *argv], code,
                                           out.read_text() if out.exists() else "",
                                           err.read_text() if err.exists() else "")


def _fork(args: tuple, timeout: float) -> int | None:
    """``_child(*args)`` forked from the server; its exit status, or None (killed) past ``timeout`` s."""
    _start_server()
    p = _CTX.Process(target=_child, args=args)
    p.start()
    p.join(timeout)
    if p.exitcode is None:
        p.kill()
        p.join()
        return None
    return p.exitcode


@dataclass
class Outcome:
    """How one run ended: its exit status (negative: killed by that signal) and what it printed."""

    code: int
    output: str


@dataclass
class Harness:
    """Runs of ``slerp-merge argv`` in ``cwd`` with ``env`` (default: this process's)."""

    argv: list[str]
    cwd: Path
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    timeout: float = 120.0
    runs: int = 0

    def run(self, at: int | None = None, mode: str = "raise", log: Path | None = None,
            argv: list[str] | None = None) -> Outcome:
        """One run, stopped at step ``at`` (None: not stopped) the ``mode`` way."""
        self.runs += 1
        out = self.cwd / f".harness-{self.runs}.log"
        code = _fork((argv or self.argv, self.env, str(self.cwd), str(out), str(out),
                      (at, mode, str(log) if log else None)), self.timeout)
        if code is None:
            raise AssertionError(f"run {self.runs} (step {at}, {mode}) did not finish in {self.timeout} s")
        text = out.read_text() if out.exists() else ""
        out.unlink(missing_ok=True)
        return Outcome(code, text)

    def steps(self, argv: list[str] | None = None) -> tuple[Outcome, list[str]]:
        """An uninterrupted run and the names of the steps it passed, in order."""
        log = self.cwd / f".harness-steps-{self.runs}.txt"
        outcome = self.run(log=log, argv=argv)
        names = log.read_text().splitlines() if log.exists() else []
        log.unlink(missing_ok=True)
        return outcome, names


def expected_stop(mode: str) -> int:
    """The exit status of a run stopped the ``mode`` way (``raise``: the command's internal-error
    status, any non-zero)."""
    from slerp_plugin.io.crashpoints import EXIT_STATUS

    return {"exit": EXIT_STATUS, "kill": -9}.get(mode, 0)


def crash_points(steps: list[str]) -> list[int]:
    """The step numbers to stop at: every step but those named ``fsync ...``. A process stopped
    just before an fsync and one stopped just after it leave the same files (the page cache
    outlives the process; fsync matters only when the machine itself goes down), so each fsync
    point repeats the one after it."""
    return [n for n, name in enumerate(steps, 1) if not name.startswith("fsync ")]
