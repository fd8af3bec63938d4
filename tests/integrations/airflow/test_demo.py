"""The embedded default (``make demo``): demo models built, the slerp_merge DAG run end to end on
Airflow with SQLite, and where the merge is printed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from model_helpers import ROOT

pytestmark = pytest.mark.slow


def test_demo_runs_the_dag_and_prints_the_merge(tmp_path):
    pytest.importorskip("airflow")
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path / "airflow"),
           "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "SLERP_OUTPUT_ROOT": str(tmp_path / "merges"),
           "SLERP_GPU_POOL": "default_pool", "SLERP_RECIPES_DIR": str(tmp_path / "recipes")}
    (tmp_path / "recipes").mkdir()
    r = subprocess.run([sys.executable, "-m", "slerp_plugin.integrations.airflow.demo", "--models",
                        str(tmp_path / "models"), "--t", "0.4"], env=env, cwd=tmp_path, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "slerp_merge run " in r.stdout and ": success" in r.stdout
    merged = next((tmp_path / "merges" / "slerp_merge").glob("*/merged"))
    assert f"merged model: {merged}" in r.stdout and "PASSED" in r.stdout
    assert (tmp_path / "models" / "model_b" / "config.json").is_file()
    # quiet: a few lines of progress and the result; Airflow's own output is in the log it names
    log = tmp_path / "airflow" / "demo.log"
    assert f"Airflow's log: {log}" in r.stdout and "[DAG TEST]" not in r.stdout + r.stderr
    assert len((r.stdout + r.stderr).splitlines()) < 40, r.stdout + r.stderr
    assert "slerp_merge" in log.read_text()
