"""slerp_merge: a SLERP merge triggered from the UI (or the REST API) with t and two models.

resolve revisions → download both (in parallel) → plan → merge (mapped over shard groups, GPU
queue) → finalize → validate → publish (if a target repo is given) → summary.
The tasks are defined once in slerp_plugin.integrations.airflow.dag_factory; their logic is in
slerp_plugin.integrations.airflow.tasks.
"""

from __future__ import annotations

from airflow.sdk import dag

from slerp_plugin.integrations.airflow.dag_factory import default_args, merge_params, merge_pipeline


@dag(dag_id="slerp_merge", schedule=None, catchup=False, params=merge_params(),
     default_args=default_args(), tags=["slerp", "merge"], doc_md=__doc__)
def slerp_merge():
    merge_pipeline()


slerp_merge()
