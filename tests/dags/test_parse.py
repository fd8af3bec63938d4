"""DAG files parse fast and the UI plugins load fast: they import Airflow and the package's light
modules, nothing heavy (every Airflow process loads the plugins, every task's supervisor included)."""

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
    env = {**os.environ, "SLERP_RECIPES_DIR": str(recipes)}
    assert loads_nothing_heavy(ROOT / "dags" / dag_file, HEAVY, env) == []


#: what a plugin may not load: the dashboard reads validation reports (``slerp_plugin.validate.report``),
#: never what computes them
PLUGIN_HEAVY = (*(m for m in HEAVY if m != "slerp_plugin.validate"), "slerp_plugin.validate.cache",
                "slerp_plugin.validate.gate", "slerp_plugin.stream", "numpy")


@pytest.mark.parametrize("plugin_file", sorted(p.name for p in (ROOT / "plugins").glob("*.py")))
def test_a_plugin_file_imports_nothing_heavy(plugin_file, airflow_db):
    assert loads_nothing_heavy(ROOT / "plugins" / plugin_file, PLUGIN_HEAVY, dict(os.environ)) == []


def loads_nothing_heavy(path, heavy: tuple[str, ...], env: dict[str, str]) -> list[str]:
    """The modules of ``heavy`` that running the file ``path`` in a fresh interpreter loads."""
    code = (f"import runpy, sys; runpy.run_path({str(path)!r}); "
            f"print(sorted(m for m in {heavy!r} if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return yaml.safe_load(r.stdout.strip().splitlines()[-1])
