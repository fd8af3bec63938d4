"""Airflow on SQLite in a temporary AIRFLOW_HOME, migrated once per session, for DAG checks."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_HOME = tempfile.mkdtemp(prefix="airflow-home-")
atexit.register(shutil.rmtree, _HOME, True)
os.environ.update({
    "AIRFLOW_HOME": _HOME,
    "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
    "SLERP_RETRY_DELAY_S": "0.2",
})


@pytest.fixture(scope="session")
def airflow_db():
    pytest.importorskip("airflow")
    r = subprocess.run([str(Path(sys.executable).parent / "airflow"), "db", "migrate"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return _HOME


@pytest.fixture
def dagbag(airflow_db, tmp_path, monkeypatch):
    """A fresh DagBag, with outputs and nightly recipes in temporary folders."""
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("SLERP_OUTPUT_ROOT", str(tmp_path / "merges"))
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    monkeypatch.setenv("SLERP_RECIPES_DIR", str(recipes))

    def load() -> DagBag:
        return DagBag(dag_folder=str(ROOT / "dags"))

    load.recipes = recipes
    load.outputs = tmp_path / "merges"
    return load
