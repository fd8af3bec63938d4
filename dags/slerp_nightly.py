"""slerp_nightly_<name>: one scheduled DAG per recipe file in $SLERP_RECIPES_DIR (dags/recipes).

Each run resolves the parents' revisions and skips the merge (visibly: the check task says why and
the rest is skipped) when they, and t, match the last published merge's manifest; otherwise it
merges, validates and publishes like slerp_merge. catchup is off.
"""

from __future__ import annotations

from airflow.sdk import dag

from slerp_plugin.integrations.airflow.dag_factory import (
    default_args,
    merge_params,
    merge_pipeline,
    recipes_dir,
)
from slerp_plugin.integrations.airflow.recipes import load_recipes

for _recipe in load_recipes(recipes_dir()):

    @dag(dag_id=_recipe.dag_id, schedule=_recipe.schedule, catchup=False,
         params=merge_params(**_recipe.params()), default_args=default_args(),
         tags=["slerp", "nightly"], doc_md=__doc__)
    def _nightly():
        merge_pipeline(nightly=True)

    globals()[_recipe.dag_id] = _nightly()
