"""Named steps of the output protocol, where a test can stop the process (fault injection).

Every filesystem or Hub step that changes what a merge leaves behind (a folder created, a marker
written, a temporary file fsynced, a rename, a journal entry, a pre-upload, a commit) calls
:func:`step` first. Unarmed, a step costs one attribute read. Armed, the N-th step of the process
stops it there, the way a crash would; the tests then rerun the same command and check that it
finishes without help with a bit-identical result (see docs/design.md, "Crash safety").

Armed by :func:`arm`, or in a child process by the environment:

- ``SLERP_PLUGIN_CRASH_AT=N:mode``: stop at step ``N`` (1-based); ``mode`` is ``raise`` (an
  :class:`InjectedCrash` exception, so ``finally`` blocks run), ``exit`` (``os._exit(70)``: no
  cleanup) or ``kill`` (``SIGKILL`` to the process itself);
- ``SLERP_PLUGIN_CRASH_LOG=path``: append each step's name to ``path``, one per line (to count the
  steps an uninterrupted run reaches);
- ``SLERP_PLUGIN_CRASH_DIR=folder``: one-shot crash points for long-running services (an Airflow
  worker): each file in ``folder`` holds ``text:mode``; the first step whose name contains
  ``text`` in any process deletes that file and stops its process, so a retry runs through.
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass
from typing import Literal

CRASH_AT_ENV = "SLERP_PLUGIN_CRASH_AT"
CRASH_LOG_ENV = "SLERP_PLUGIN_CRASH_LOG"
CRASH_DIR_ENV = "SLERP_PLUGIN_CRASH_DIR"
EXIT_STATUS = 70

Mode = Literal["raise", "exit", "kill"]
MODES: tuple[Mode, ...] = ("raise", "exit", "kill")


class InjectedCrash(RuntimeError):
    """The process was stopped at an armed crash point (``mode=raise``)."""


@dataclass
class _Armed:
    at: int | None
    mode: Mode
    log: str | None
    folder: str | None = None
    count: int = 0


_lock = threading.Lock()
_armed: _Armed | None = None
_read_env = False


def arm(at: int | None, mode: Mode = "raise", log: str | None = None) -> None:
    """Stop this process at its ``at``-th step from now (None: never) and/or log each step's name.

    Raises:
        ValueError: an unknown ``mode`` or an ``at`` below 1.
    """
    global _armed, _read_env
    if mode not in MODES:
        raise ValueError(f"crash mode must be one of {', '.join(MODES)}, not {mode!r}")
    if at is not None and at < 1:
        raise ValueError(f"crash step must be 1 or more, not {at}")
    with _lock:
        _armed = _Armed(at, mode, log) if (at is not None or log) else None
        _read_env = True


def disarm() -> None:
    """No crash point and no step log (the state of a process started without the environment)."""
    arm(None)


def _from_env() -> None:
    global _armed, _read_env
    _read_env = True
    spec, log = os.environ.get(CRASH_AT_ENV), os.environ.get(CRASH_LOG_ENV)
    folder = os.environ.get(CRASH_DIR_ENV)
    at, mode = None, "raise"
    if spec:
        n, _, m = spec.partition(":")
        at, mode = int(n), (m or "raise")
    if at is not None or log or folder:
        _armed = _Armed(at, mode, log, folder)  # type: ignore[arg-type]


def step(name: str) -> None:
    """Pass the protocol step ``name`` (e.g. ``"rename model-00001-of-00003.safetensors"``): log it
    and stop here if this is the armed step.

    Raises:
        InjectedCrash: this is the armed step and the mode is ``raise``.
    """
    if not _read_env:
        with _lock:
            if not _read_env:
                _from_env()
    armed = _armed
    if armed is None:
        return
    with _lock:
        armed.count += 1
        n = armed.count
        if armed.log:
            with open(armed.log, "a") as f:
                f.write(f"{name}\n")
    if armed.at == n:
        _stop(armed.mode, f"stopped at step {n}: {name}")
    if armed.folder:
        _one_shot(armed.folder, name)


def _one_shot(folder: str, name: str) -> None:
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        try:
            with open(entry.path) as f:
                text, _, mode = f.read().strip().rpartition(":")
        except OSError:
            continue
        if text and text in name:
            try:
                os.unlink(entry.path)  # whoever deletes it is the one that stops
            except OSError:
                continue
            _stop(mode if mode in MODES else "raise", f"stopped at {name} ({entry.name})")  # type: ignore[arg-type]


def _stop(mode: Mode, what: str) -> None:
    if mode == "raise":
        raise InjectedCrash(what)
    if mode == "exit":
        os._exit(EXIT_STATUS)
    os.kill(os.getpid(), signal.SIGKILL)
