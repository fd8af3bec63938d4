"""slerp_sweep: merge at several t values (mapped), validate each, publish the best one.

The best merge is the one with the lowest validation perplexity; the others stay on disk. The
summary holds the perplexity-vs-t table.
"""

from __future__ import annotations

from airflow.sdk import Param, dag, get_current_context, task

from slerp_plugin.integrations.airflow import tasks as pipeline
from slerp_plugin.integrations.airflow.dag_factory import (
    TIMEOUTS,
    default_args,
    gpu,
    merge_params,
    output_root,
)

PARAMS = merge_params()
PARAMS.pop("t")
PARAMS.pop("merge_workers")
PARAMS["t_values"] = Param([0.3, 0.5, 0.7], type="array",
                           items={"type": "number", "minimum": 0, "maximum": 1}, minItems=1,
                           title="t values", description="the t values to merge and compare")


@dag(dag_id="slerp_sweep", schedule=None, catchup=False, params=PARAMS, default_args=default_args(),
     tags=["slerp", "sweep"], doc_md=__doc__)
def slerp_sweep():
    def params(t=None) -> dict:
        p = dict(get_current_context()["params"])
        return {**p, "t": t} if t is not None else {**p, "t": p["t_values"][0]}

    @task(execution_timeout=TIMEOUTS["resolve"])
    def resolve() -> dict:
        return pipeline.resolve_inputs(params())

    @task(execution_timeout=TIMEOUTS["download"])
    def download(inputs: dict) -> dict:
        return {role: pipeline.download_input(entry, weights=role != "tokenizer")
                for role, entry in inputs.items()}

    @task(execution_timeout=TIMEOUTS["resolve"])
    def t_values() -> list[float]:
        return list(get_current_context()["params"]["t_values"])

    @task(execution_timeout=TIMEOUTS["merge"], **gpu())
    def merge_and_validate(inputs: dict, t: float) -> dict:
        ctx = get_current_context()
        out = pipeline.output_path(output_root(), ctx["dag"].dag_id, ctx["run_id"], f"-t{t}")
        return pipeline.merge_and_validate(params(t), inputs, str(out))

    @task(execution_timeout=TIMEOUTS["summary"])
    def best(results: list[dict]) -> dict:
        return pipeline.best_of_sweep(list(results))

    @task(execution_timeout=TIMEOUTS["publish"])
    def publish(choice: dict) -> dict:
        p = get_current_context()["params"]
        return {**choice, "upload": pipeline.publish(choice["output"], p["target_repo"], p["private"])}

    inputs = download(resolve())
    results = merge_and_validate.partial(inputs=inputs).expand(t=t_values())
    publish(best(results))


slerp_sweep()
