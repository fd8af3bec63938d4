"""File locks: exclusive against everyone, shared among readers, named holders, released when the
holding process dies, the lock file gone with its last holder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from slerp_plugin.io.lock import FileLock, LockBusy, describe_holder

HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from slerp_plugin.io.lock import FileLock
    lock = FileLock.acquire(Path(sys.argv[1]), exclusive=sys.argv[2] == "ex", what="a test holder")
    print("held", flush=True)
    time.sleep(float(sys.argv[3]))
""")


def hold(path, mode="ex", seconds=60.0) -> subprocess.Popen:
    """Another process holding the lock until it is killed (or ``seconds`` pass)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), mode, str(seconds)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_exclusive_excludes_and_names_the_holder(tmp_path):
    path = tmp_path / "x.lock"
    proc = hold(path)
    try:
        with pytest.raises(LockBusy) as e:
            FileLock.acquire(path, exclusive=True)
        assert f"process {proc.pid} on host" in e.value.holder and "(a test holder)" in e.value.holder
        with pytest.raises(LockBusy):
            FileLock.acquire(path, exclusive=False)
    finally:
        proc.kill()
        proc.wait()


def test_the_kernel_releases_the_lock_of_a_killed_process(tmp_path):
    path = tmp_path / "x.lock"
    proc = hold(path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with FileLock.acquire(path, exclusive=True, what="after the kill") as lock:
        assert lock.exclusive and "after the kill" in describe_holder(path)
    assert not path.exists()  # removed by its last holder


def test_shared_holders_coexist_and_an_exclusive_one_waits_for_them(tmp_path):
    path = tmp_path / "x.lock"
    first = FileLock.acquire(path, exclusive=False)
    second = FileLock.acquire(path, exclusive=False)
    got = []
    waiter = threading.Thread(target=lambda: got.append(FileLock.acquire(path, exclusive=True, wait=True)))
    waiter.start()
    time.sleep(0.5)
    assert not got
    first.release()
    time.sleep(0.5)
    assert not got and path.exists()  # one shared holder left: the file stays
    second.release()
    waiter.join(10)
    assert got and got[0].exclusive
    got[0].release()
    assert not path.exists()


def test_waiting_reports_the_holder_and_gives_up_after_a_timeout(tmp_path, monkeypatch):
    from slerp_plugin.io import lock as lock_module

    monkeypatch.setattr(lock_module, "WAIT_LOG_S", 0.4)
    path = tmp_path / "x.lock"
    proc = hold(path)
    notes = []
    try:
        started = time.monotonic()
        with pytest.raises(LockBusy):
            FileLock.acquire(path, exclusive=True, wait=True, timeout=1.0, on_wait=notes.append)
        assert time.monotonic() - started >= 1.0
        # one note at once, then one per WAIT_LOG_S
        assert 2 <= len(notes) <= 3 and all(f"process {proc.pid}" in n for n in notes)
    finally:
        proc.kill()
        proc.wait()
