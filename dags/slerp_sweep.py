"""slerp_sweep: merge at several t values (mapped), validate each, publish the best one.

The best merge is the one with the lowest validation perplexity; the others stay on disk. The
"SLERP merges" page plots and tables the sweep with the parents and the chosen t.
"""

from __future__ import annotations

from airflow.sdk import dag

from slerp_plugin.integrations.airflow.dag_factory import default_args, sweep_params, sweep_pipeline


@dag(dag_id="slerp_sweep", schedule=None, catchup=False, params=sweep_params(), default_args=default_args(),
     tags=["slerp", "sweep"], doc_md=__doc__)
def slerp_sweep():
    sweep_pipeline()


slerp_sweep()
