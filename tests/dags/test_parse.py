"""DAG files parse fast: they import Airflow and the package's light modules, nothing heavy."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from model_helpers import ROOT

HEAVY = ("torch", "transformers", "hydra", "mergekit", "safetensors", "huggingface_hub", "matplotlib",
         "slerp_plugin.engine", "slerp_plugin.validate", "slerp_plugin.merge")


@pytest.mark.parametrize("dag_file", sorted(p.name for p in (ROOT / "dags").glob("*.py")))
def test_a_dag_file_imports_nothing_heavy(dag_file, tmp_path, airflow_db):
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    recipe = {"name": "r", "model_1": "org/a", "model_2": "org/b", "t": 0.5}
    (recipes / "r.yaml").write_text(yaml.safe_dump(recipe))
    path = str(ROOT / "dags" / dag_file)
    code = (f"import runpy, sys, time; t = time.perf_counter(); runpy.run_path({path!r}); "
            f"print(round(time.perf_counter() - t, 2), sorted(m for m in {HEAVY!r} if m in sys.modules))")
    env = {**os.environ, "SLERP_RECIPES_DIR": str(recipes)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    seconds, heavy = r.stdout.strip().split(" ", 1)
    assert heavy == "[]", f"{dag_file} imports {heavy} while it is parsed"
