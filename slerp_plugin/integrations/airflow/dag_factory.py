"""What the DAGs share: trigger-form params, retries and the retry policy, GPU routing, timeouts.

The only module of the package that imports Airflow (``airflow.sdk``). Settings come from the
environment so one image serves a laptop and a cluster:

- ``SLERP_OUTPUT_ROOT`` (default ``~/slerp-merges``): where merges are written (a shared volume
  when several workers cooperate);
- ``SLERP_GPU_QUEUE`` (default ``gpu``) and ``SLERP_GPU_POOL`` (default ``default_pool``): where the
  merge and the functional validation run;
- ``SLERP_RETRIES`` (default 3), ``SLERP_RETRY_DELAY_S`` (default 30; doubled on each retry up to
  30 minutes); ``SLERP_RECIPES_DIR`` (default ``dags/recipes``): the nightly recipe files.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import ExceptionRetryPolicy, Param, RetryAction, RetryRule, task

from ...errors import TRANSIENT_ERRORS, SlerpPluginError
from . import records, tasks

log = logging.getLogger(__name__)

TIMEOUTS = {
    "resolve": timedelta(minutes=15),
    "download": timedelta(hours=8),  # ~145 GB per 72B parent
    "merge": timedelta(hours=12),
    "validate": timedelta(hours=6),
    "publish": timedelta(hours=8),
    "stream": timedelta(hours=16),  # download, merge and upload of 72B overlapped
    "summary": timedelta(minutes=10),
}


#: where a streamed run keeps the manifest and upload record it published (no model files)
STREAM_RECORDS = "streamed"


def output_root() -> Path:
    return Path(os.environ.get("SLERP_OUTPUT_ROOT", Path.home() / "slerp-merges")).expanduser()


def recipes_dir() -> Path:
    return Path(os.environ.get("SLERP_RECIPES_DIR", Path(__file__).resolve().parents[1] / "dags" / "recipes"))


def retry_policy() -> ExceptionRetryPolicy:
    """Retry network/Hub outages and interrupted merges; fail fast on anything permanent."""
    return ExceptionRetryPolicy(
        rules=[
            RetryRule(exception=[*TRANSIENT_ERRORS, ConnectionError, TimeoutError],
                      action=RetryAction.RETRY, reason="transient: network, Hub 5xx or truncated download"),
            RetryRule(exception=SlerpPluginError, action=RetryAction.FAIL,
                      reason="permanent: bad config, unknown repo/revision, auth, or failed validation"),
            RetryRule(exception=[ValueError, TypeError, KeyError], action=RetryAction.FAIL,
                      reason="permanent: invalid input"),
        ],
        default=RetryAction.DEFAULT,  # e.g. a lost worker or an unexpected error: normal retries
    )


def default_args() -> dict[str, Any]:
    """Retries with exponential backoff and the retry policy, for every task; a task that fails for
    good leaves a failure record for the dashboard."""
    return {
        "owner": "slerp_plugin",
        "retries": int(os.environ.get("SLERP_RETRIES", 3)),
        "retry_delay": timedelta(seconds=float(os.environ.get("SLERP_RETRY_DELAY_S", 30))),
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": timedelta(minutes=30),
        "retry_policy": retry_policy(),
        "on_failure_callback": record_failure,
    }


def record_failure(context: dict[str, Any]) -> None:
    """A task's failure callback: the run's failure record (task, try, one-line error) for the
    dashboard. Never raises: a callback error would only hide the task's own."""
    try:
        ti = context["ti"]
        folder = records.run_dir(output_root(), ti.dag_id, ti.run_id)
        records.write_run(folder, ti.dag_id, ti.run_id)
        records.write_failure(folder, ti.task_id, getattr(ti, "try_number", None),
                              context.get("exception") or "failed")
    except Exception as e:  # the task's failure stands; say why the record is missing
        log.warning("could not record the failure for the dashboard: %s", e)


def gpu() -> dict[str, Any]:
    """Routing for GPU work (merge, functional validation)."""
    return {"queue": os.environ.get("SLERP_GPU_QUEUE", "gpu"),
            "pool": os.environ.get("SLERP_GPU_POOL", "default_pool")}


def _model_param(title: str, description: str, default: str = "") -> Param:
    return Param(default, type="string", minLength=1, title=title, description=description)


def _optional(value: Any, title: str, description: str) -> Param:
    # nullable, so that the trigger form accepts an empty field
    return Param(value or None, type=["null", "string"], title=title, description=description)


def _number(value: Any, title: str, description: str, kind: str = "number", **bounds: float) -> Param:
    """A number param whose bounds are checked when the run is created, not silently applied by the
    form: the UI's number field clamps to a schema's own ``minimum``/``maximum``, so the bounds sit
    in ``allOf``, where the form ignores them and the server's validation (an error shown in the
    form, HTTP 400 over REST) does not."""
    return Param(value, type=kind, title=title, description=description, allOf=[bounds])


def merge_params(**defaults: Any) -> dict[str, Param]:
    """The trigger form of a merge: models, t, thresholds, dtype, target repo, validation."""
    d = {"model_1": "", "model_2": "", "t": 0.5, **defaults}
    return {
        "model_1": _model_param("Model 1 (t = 0)", "Hub id org/name or a local folder on the workers",
                                d["model_1"]),
        "model_1_revision": _optional(d.get("model_1_revision"), "Model 1 revision",
                                      "branch, tag or commit sha (empty: main)"),
        "model_2": _model_param("Model 2 (t = 1)", "Hub id org/name or a local folder on the workers",
                                d["model_2"]),
        "model_2_revision": _optional(d.get("model_2_revision"), "Model 2 revision",
                                      "branch, tag or commit sha (empty: main)"),
        "tokenizer": _optional(d.get("tokenizer"), "Tokenizer", "Hub id or folder (empty: model 1's)"),
        "t": _number(d["t"], "t", "interpolation factor between 0 and 1: 0 gives model 1, 1 gives model 2",
                     minimum=0, maximum=1),
        "DOT_THRESHOLD": _number(d.get("DOT_THRESHOLD", 0.9995), "DOT_THRESHOLD",
                                 "|cos| above this uses LERP (more than 0, at most 1)",
                                 exclusiveMinimum=0, maximum=1),
        "epsilon": _number(d.get("epsilon", 1e-8), "epsilon", "norms at or below this are not normalised",
                           exclusiveMinimum=0),
        "dtype": Param(d.get("dtype", "auto"), type="string", enum=["auto", "bfloat16", "float16", "float32"],
                       title="dtype", description="load/output dtype (auto: as model 1)"),
        "target_repo": _optional(d.get("target_repo"), "Target repo",
                                 "Hub repo to publish to (empty: do not publish)"),
        "private": Param(d.get("private", False), type="boolean", title="Private",
                         description="create the target repo as private"),
        "validate_functional": Param(d.get("validate_functional", True), type="boolean",
                                     title="Functional validation",
                                     description="perplexity gate against the parents (off: structure and "
                                                 "spot checks only)"),
        "validation_margin": _number(d.get("validation_margin", 0.10), "Validation margin",
                                     "allowed perplexity excess over the worse parent (0.1 = 10%)",
                                     minimum=0),
        "eval_max_tokens": _number(d.get("eval_max_tokens", 512), "Evaluation tokens",
                                   "tokens of text for perplexity (at least 16)", kind="integer", minimum=16),
        "merge_workers": _number(d.get("merge_workers", 1), "Merge workers",
                                 "parallel merge tasks over output shards (shared volume)", kind="integer",
                                 minimum=1),
        "max_shard_size": Param(d.get("max_shard_size", "5GB"), type="string", title="Max shard size",
                                description="bytes per output shard, e.g. 5GB"),
        "stream": Param(d.get("stream", False), type="boolean", title="Stream Hub to Hub",
                        description="merge Hub parents straight into the target repo within the disk budget: "
                                    "parents read by range, each shard spot-checked and uploaded once "
                                    "merged, published only if the perplexity gate passes (no local copy)"),
        "disk_budget": _optional(d.get("disk_budget"), "Disk budget",
                                 "streaming only: disk the merge may hold at once, e.g. 60GB (empty: three "
                                 "output shards with their inputs)"),
    }


def quiet(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a task's function with the libraries' progress bars off and torch's statistics quiet:
    Airflow logs whatever a task writes to stderr at ERROR level."""
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # also transformers' bars
        if "huggingface_hub" in sys.modules:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
        logging.getLogger("torch").setLevel(logging.WARNING)  # e.g. FakeTensor cache stats at exit
        return fn(*args, **kwargs)

    return run


def _params() -> dict:
    from airflow.sdk import get_current_context

    return get_current_context()["params"]


def _this_run() -> Path:
    """The current run's folder (:func:`records.run_dir`), with its run record written."""
    from airflow.sdk import get_current_context

    ctx = get_current_context()
    run = records.run_dir(output_root(), ctx["dag"].dag_id, ctx["run_id"])
    records.write_run(run, ctx["dag"].dag_id, ctx["run_id"])
    return run


def _run_dir() -> Path:
    from airflow.sdk import get_current_context

    return output_root() / get_current_context()["dag"].dag_id


@task(execution_timeout=TIMEOUTS["resolve"])
@quiet
def resolve() -> dict:
    """Each input's reference and, for Hub ids, the commit its revision points to now; a merge
    that cannot fit on disk fails here, before any download."""
    from airflow.sdk import get_current_context

    p = _params()
    if "t_values" in p:  # a sweep: one output per t, checked as each is merged
        return tasks.resolve_inputs({**p, "t": p["t_values"][0]})
    ctx = get_current_context()
    return tasks.resolve_inputs(p, output=tasks.output_path(output_root(), ctx["dag"].dag_id, ctx["run_id"]))


@task.branch(execution_timeout=TIMEOUTS["resolve"])
@quiet
def route(inputs: dict) -> str | list[str]:
    """``stream``: the streaming task; otherwise the downloads of the local pipeline."""
    if _params().get("stream"):
        return "stream_to_hub"
    return [f"download_{role}" for role in ("model_1", "model_2", "tokenizer")]


@task(execution_timeout=TIMEOUTS["stream"])
@quiet
def stream_to_hub(inputs: dict) -> dict:
    """Hub parents merged straight into the target repo, shard by shard (``stream``)."""
    run = _this_run()
    output = run / "merged"
    result = tasks.stream_to_hub(_params(), str(output), record_dir=str(run / STREAM_RECORDS),
                                 output_root=output_root())
    records.clear_failure(run)
    return result


@task.short_circuit(execution_timeout=TIMEOUTS["resolve"])
@quiet
def parents_changed(inputs: dict) -> bool:
    """Nightly runs: go on only if a parent (or t) changed since the last published merge."""
    p = _params()
    last = tasks.last_published_manifest(p["target_repo"], tasks.latest_output(_run_dir()))
    verdict = tasks.parents_changed(inputs, last, p["t"])
    print(f"{'merging' if verdict['changed'] else 'skipping'}: {verdict['reason']}")
    return verdict["changed"]


@task(execution_timeout=TIMEOUTS["download"])
@quiet
def download(inputs: dict, role: str) -> dict:
    """One input fetched (Hub) or passed through (local folder)."""
    return tasks.download_input(inputs[role], weights=role != "tokenizer")


@task(execution_timeout=TIMEOUTS["resolve"])
@quiet
def plan(model_1: dict, model_2: dict, tokenizer: dict) -> dict:
    """The output folder of this run and its shards split into groups for the merge workers."""
    from airflow.sdk import get_current_context

    ctx = get_current_context()
    inputs = {"model_1": model_1, "model_2": model_2, "tokenizer": tokenizer}
    records.write_run(records.run_dir(output_root(), ctx["dag"].dag_id, ctx["run_id"]), ctx["dag"].dag_id,
                      ctx["run_id"])
    output = str(tasks.output_path(output_root(), ctx["dag"].dag_id, ctx["run_id"]))
    groups = tasks.plan_groups(_params(), inputs, output, _params()["merge_workers"])
    return {"inputs": inputs, "output": output, "groups": groups}


@task(execution_timeout=TIMEOUTS["summary"])
@quiet
def groups(p: dict) -> list[list[int]]:
    return p["groups"]


@task(execution_timeout=TIMEOUTS["merge"])
@quiet
def merge(p: dict, indices: list[int]) -> dict:
    """One group of output shards merged (resuming an interrupted attempt)."""
    return tasks.merge_group(_params(), p["inputs"], p["output"], indices)


@task(execution_timeout=TIMEOUTS["merge"])
@quiet
def finalize(p: dict, merged: list[dict]) -> dict:
    """Index, configs, manifest and card written; the output published by one rename."""
    return tasks.finalize_merge(_params(), p["inputs"], p["output"])


@task(execution_timeout=TIMEOUTS["validate"])
@quiet
def validate(p: dict, result: dict) -> dict:
    """The validation gate against the parents."""
    return tasks.validate_output(result["output"], p["inputs"], _params(), output_root())


@task(execution_timeout=TIMEOUTS["publish"])
@quiet
def publish(result: dict, validation: dict, nightly: bool = False) -> dict:
    """The merge uploaded to the target repo, if one is set."""
    up = tasks.publish(result["output"], _params()["target_repo"], _params()["private"])
    if nightly:
        tasks.record_latest(_run_dir(), result["output"])
    return up


@task(execution_timeout=TIMEOUTS["summary"])
@quiet
def summary(result: dict, validation: dict, upload: dict) -> dict:
    """The run's outcome in one log entry; an earlier failure record of the run is cleared."""
    records.clear_failure(Path(result["output"]).parent)
    return tasks.summary(result, validation, upload)


def merge_pipeline(nightly: bool = False) -> None:
    """Add the merge tasks to the DAG being defined (inside a ``@dag`` function):

    resolve → [skip check, nightly only] → route → download ×3 (parallel) → plan → merge (mapped
    over shard groups, GPU queue) → finalize → validate → publish → summary; or, with the ``stream``
    param, route → stream_to_hub (GPU queue).
    """
    inputs = resolve()
    branch = route(inputs)
    if nightly:
        parents_changed(inputs) >> branch
    branch >> stream_to_hub.override(**gpu())(inputs)
    downloads = [download.override(task_id=f"download_{role}")(inputs, role)
                 for role in ("model_1", "model_2", "tokenizer")]
    for d in downloads:
        branch >> d
    p = plan(*downloads)
    merged = merge.override(**gpu()).partial(p=p).expand(indices=groups(p))
    result = finalize.override(**gpu())(p, merged)
    validation = validate.override(**gpu())(p, result)
    summary(result, validation, publish(result, validation, nightly=nightly))


def sweep_params(**defaults: Any) -> dict[str, Param]:
    """The trigger form of a sweep: a merge's form with a list of t values instead of one t."""
    params = merge_params(**defaults)
    for name in ("t", "merge_workers"):
        params.pop(name)
    params["stream"].description = ("one-pass mode: stream the chosen t from the Hub parents to the "
                                    "target repo behind the gate, nothing downloaded (a merge per t is "
                                    "always local)")
    params["t_values"] = Param(defaults.get("t_values", [0.3, 0.5, 0.7]), type="array",
                               items={"type": "number", "minimum": 0, "maximum": 1}, minItems=1, maxItems=64,
                               title="t values", description="the t values to merge and compare, each 0 to 1")
    params["sweep_mode"] = Param(
        defaults.get("sweep_mode", "auto"), type="string", enum=["auto", "one-pass", "merge-each"],
        title="Sweep mode", description="one-pass: every t evaluated in one read of the parents without "
        "writing a model, then only the best merged; merge-each: a merge per t, each validated and kept; "
        "auto: one-pass when the parents are larger than the size below")
    params["one_pass_above_gb"] = Param(
        defaults.get("one_pass_above_gb", 20), type="number", minimum=0, title="One pass above (GB)",
        description="auto mode: parents' weights (both together, GB) above which the sweep runs in one pass")
    return params


@task(execution_timeout=TIMEOUTS["download"])
@quiet
def download_all(inputs: dict) -> dict:
    """Every input fetched (Hub) or passed through (local folders)."""
    return {role: tasks.download_input(entry, weights=role != "tokenizer") for role, entry in inputs.items()}


@task(execution_timeout=TIMEOUTS["resolve"])
@quiet
def t_values() -> list[float]:
    return list(_params()["t_values"])


@task(execution_timeout=TIMEOUTS["merge"])
@quiet
def merge_and_validate(inputs: dict, t: float) -> dict:
    """One point of the sweep: merged and validated (a failed gate is recorded, not raised)."""
    from airflow.sdk import get_current_context

    ctx = get_current_context()
    out = tasks.output_path(output_root(), ctx["dag"].dag_id, ctx["run_id"], f"-t{t}")
    records.write_run(out.parent, ctx["dag"].dag_id, ctx["run_id"])
    return tasks.merge_and_validate({**_params(), "t": t, "stream": False}, inputs, str(out), output_root())


@task(execution_timeout=TIMEOUTS["validate"])
@quiet
def evaluate_parents(inputs: dict) -> dict:
    """Both parents evaluated once into the shared cache, before the merges that compare with them."""
    return tasks.evaluate_parents(inputs, _params(), output_root())


@task(execution_timeout=TIMEOUTS["summary"])
@quiet
def best(results: list[dict]) -> dict:
    """The sweep's choice: the lowest merged perplexity among the points that passed."""
    # by index, not by iteration: iterating asks for one item past the end, which Airflow logs as an error
    choice = tasks.best_of_sweep([results[i] for i in range(len(results))])
    records.write_sweep(Path(choice["output"]).parent, choice["t"], choice["output"])
    return choice


@task(execution_timeout=TIMEOUTS["publish"])
@quiet
def publish_choice(choice: dict) -> dict:
    """The chosen merge uploaded to the target repo, if one is set."""
    p = _params()
    if (choice.get("upload") or {}).get("published"):  # streamed to the target repo already
        return choice
    records.clear_failure(Path(choice["output"]).parent)
    return {**choice, "upload": tasks.publish(choice["output"], p["target_repo"], p["private"])}


@task.branch(execution_timeout=TIMEOUTS["resolve"])
@quiet
def sweep_route(inputs: dict) -> str:
    """One pass (every t evaluated without writing a model) or a merge per t (``sweep_mode``)."""
    if tasks.sweep_mode(_params(), inputs) == "one-pass":
        return "sweep_in_one_pass"
    return "download_all"


@task(execution_timeout=TIMEOUTS["stream"])
@quiet
def sweep_in_one_pass(inputs: dict) -> dict:
    """Every t evaluated in one read of the parents (Hub parents by range); the table, plot and
    choice recorded."""
    return tasks.sweep_in_one_pass(_params(), inputs, str(_this_run()), output_root())


@task(execution_timeout=TIMEOUTS["stream"])
@quiet
def merge_chosen(inputs: dict, swept: dict) -> dict:
    """The one-pass sweep's chosen t merged and validated, or streamed to the target repo behind the
    gate (``stream``): the only model the sweep makes."""
    from airflow.sdk import get_current_context

    ctx = get_current_context()
    t = swept["t"]
    out = tasks.output_path(output_root(), ctx["dag"].dag_id, ctx["run_id"], f"-t{t}")
    choice = tasks.merge_chosen(_params(), inputs, t, str(out), output_root(),
                                record_dir=str(out.parent / STREAM_RECORDS))
    record = records.read_record(out.parent, records.SWEEP_RECORD, records.SweepRecord)
    one_pass = record.model_dump(exclude={"chosen_t", "chosen_output"}) if record is not None else {}
    records.write_sweep(out.parent, t, choice["output"], **one_pass)
    records.clear_failure(out.parent)
    return {**choice, "table": swept["table"]}


def sweep_pipeline() -> None:
    """Add the sweep's tasks to the DAG being defined: resolve → route by ``sweep_mode``: either
    download → evaluate the parents (once, GPU queue) → merge and validate (mapped over t, GPU
    queue) → best → publish; or every t in one pass, Hub parents read by range (GPU queue) → merge
    or stream the chosen t (GPU queue) → publish."""
    resolved = resolve.override(task_id="resolve")()
    branch = sweep_route(resolved)
    inputs = download_all(resolved)
    parents = evaluate_parents.override(**gpu())(inputs)
    results = merge_and_validate.override(**gpu()).partial(inputs=inputs).expand(t=t_values())
    branch >> inputs >> parents >> results
    publish_choice.override(task_id="publish")(best(results))
    swept = sweep_in_one_pass.override(**gpu())(resolved)
    branch >> swept
    publish_choice.override(task_id="publish_chosen")(merge_chosen.override(**gpu())(resolved, swept))
