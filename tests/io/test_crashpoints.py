"""The crash points' switch: unarmed they do nothing; armed, the N-th step stops the process the
asked way, and the step log names every step (the crash-point harness itself is in
tests/engine/test_crash_points.py and tests/stream/test_crash_points.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from slerp_plugin.io import crashpoints
from slerp_plugin.io.atomic import write_json_atomic


@pytest.fixture(autouse=True)
def _disarmed():
    crashpoints.disarm()
    yield
    crashpoints.disarm()


def test_unarmed_steps_do_nothing(tmp_path):
    for _ in range(3):
        crashpoints.step("anything")
    write_json_atomic(tmp_path / "a.json", {"x": 1})
    assert (tmp_path / "a.json").is_file()


def test_armed_step_raises_at_its_count_and_the_log_names_each_step(tmp_path):
    log = tmp_path / "steps.txt"
    crashpoints.arm(3, "raise", str(log))
    with pytest.raises(crashpoints.InjectedCrash, match="step 3: rename a.json into place"):
        write_json_atomic(tmp_path / "a.json", {"x": 1})
    assert log.read_text().splitlines() == ["write a.json (temporary file)", "fsync a.json (temporary file)",
                                           "rename a.json into place"]
    assert not (tmp_path / "a.json").exists() and list(tmp_path.iterdir()) == [log]  # temporary file gone


@pytest.mark.parametrize("mode,code", [("exit", crashpoints.EXIT_STATUS), ("kill", -9)])
def test_the_environment_arms_a_child_that_stops_without_cleanup(tmp_path, mode, code):
    script = ("import pathlib; from slerp_plugin.io.atomic import write_json_atomic; "
              f"write_json_atomic(pathlib.Path({str(tmp_path)!r}) / 'a.json', 1)")
    env = {crashpoints.CRASH_AT_ENV: f"3:{mode}", crashpoints.CRASH_LOG_ENV: str(tmp_path / "log")}
    r = subprocess.run([sys.executable, "-c", script], env={**os.environ, **env}, timeout=60)
    assert r.returncode == code
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != "log")
    assert len(left) == 1 and left[0].startswith("a.json.") and left[0].endswith(".tmp"), left  # no clean-up


@pytest.mark.parametrize("at,mode", [(0, "raise"), (1, "explode")])
def test_bad_arming_is_refused(at, mode):
    with pytest.raises(ValueError):
        crashpoints.arm(at, mode)  # type: ignore[arg-type]
