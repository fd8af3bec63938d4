"""The embedded default: build the demo models and run the ``slerp_merge`` DAG end to end with
``dag.test()`` on Airflow with SQLite (no Hub upload unless ``--target-repo`` is given).

    python -m slerp_plugin.integrations.airflow.demo [--models demo/models] [--t 0.5] [--target-repo org/name]
        [--log FILE] [--verbose]

The terminal shows a few lines of progress and the result (where the model and its report are,
the verdict); Airflow's own output goes to ``--log`` (default ``$AIRFLOW_HOME/demo.log``), or to
the terminal with ``--verbose`` (or ``SLERP_DEBUG=1``).

Airflow reads its settings from the environment at import: the Makefile sets ``AIRFLOW_HOME``
(``.airflow/``), the DAG folder, and ``SLERP_OUTPUT_ROOT`` before calling this.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def _output_to(log: Path | None) -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors 1 and 2, which Airflow's task
    runner and its loggers write to) to ``log`` for the duration; None leaves them as they are."""
    if log is None:
        yield
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "a") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=Path("demo/models"))
    parser.add_argument("--t", type=float, default=0.5)
    parser.add_argument("--target-repo", default="")
    parser.add_argument("--log", type=Path, default=None,
                        help="where Airflow's output goes (default: $AIRFLOW_HOME/demo.log)")
    parser.add_argument("--verbose", action="store_true", help="Airflow's output on the terminal")
    args = parser.parse_args(argv)
    verbose = args.verbose or os.environ.get("SLERP_DEBUG") == "1"
    home = Path(os.environ.get("AIRFLOW_HOME", ".airflow"))
    log = None if verbose else (args.log or home / "demo.log").resolve()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    models = args.models.resolve()
    if not (models / "model_b" / "config.json").is_file():
        from ...demo.pair import build_demo_pair

        print(f"building the demo models in {models}", flush=True)
        with _output_to(log):
            build_demo_pair(models)
    print("preparing Airflow's database (SQLite)", flush=True)
    airflow = Path(sys.executable).parent / "airflow"
    r = subprocess.run([str(airflow), "db", "migrate"], capture_output=True, text=True)
    if r.returncode:
        print(r.stderr[-3000:], file=sys.stderr)
        return 1

    print(f"running the slerp_merge DAG with t={args.t}"
          + (f" (Airflow's log: {log})" if log else ""), flush=True)
    with _output_to(log):
        from airflow.dag_processing.dagbag import DagBag

        bag = DagBag(dag_folder=os.environ.get("AIRFLOW__CORE__DAGS_FOLDER", "dags"))
        if not bag.import_errors:
            run = bag.dags["slerp_merge"].test(run_conf={
                "model_1": str(models / "model_a"), "model_2": str(models / "model_b"), "t": args.t,
                "target_repo": args.target_repo, "eval_max_tokens": 256,
            })
    if bag.import_errors:
        print(f"DAG import errors: {bag.import_errors}", file=sys.stderr)
        return 1
    states = {ti.task_id: str(ti.state) for ti in run.get_task_instances()}
    print(f"\nslerp_merge run {run.run_id}: {run.state}")
    for task_id, state in sorted(states.items()):
        print(f"  {task_id:20s} {state}")
    if str(run.state) != "success":
        if log:
            print(f"the run failed; Airflow's log: {log}", file=sys.stderr)
        return 1
    root = Path(os.environ.get("SLERP_OUTPUT_ROOT", Path.home() / "slerp-merges"))
    outputs = sorted(root.glob("slerp_merge/*/merged"), key=lambda p: p.stat().st_mtime)
    out = outputs[-1]
    print(f"\nmerged model: {out}\nvalidation report: {out / 'validation.json'}\n"
          f"{(out / 'validation.txt').read_text()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
