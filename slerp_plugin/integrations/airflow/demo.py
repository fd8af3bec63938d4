"""The embedded default: build the demo models and run the ``slerp_merge`` DAG end to end with
``dag.test()`` on Airflow with SQLite (no Hub upload unless ``--target-repo`` is given).

    python -m slerp_plugin.integrations.airflow.demo [--models demo/models] [--t 0.5] [--target-repo org/name]

Airflow reads its settings from the environment at import: the Makefile sets ``AIRFLOW_HOME``
(``.airflow/``), the DAG folder, and ``SLERP_OUTPUT_ROOT`` before calling this.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=Path("demo/models"))
    parser.add_argument("--t", type=float, default=0.5)
    parser.add_argument("--target-repo", default="")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    models = args.models.resolve()
    if not (models / "model_b" / "config.json").is_file():
        from ...demo.pair import build_demo_pair

        build_demo_pair(models)
    airflow = Path(sys.executable).parent / "airflow"
    r = subprocess.run([str(airflow), "db", "migrate"], capture_output=True, text=True)
    if r.returncode:
        print(r.stderr[-3000:], file=sys.stderr)
        return 1

    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=os.environ.get("AIRFLOW__CORE__DAGS_FOLDER", "dags"))
    if bag.import_errors:
        print(f"DAG import errors: {bag.import_errors}", file=sys.stderr)
        return 1
    run = bag.dags["slerp_merge"].test(run_conf={
        "model_1": str(models / "model_a"), "model_2": str(models / "model_b"), "t": args.t,
        "target_repo": args.target_repo, "eval_max_tokens": 256,
    })
    states = {ti.task_id: str(ti.state) for ti in run.get_task_instances()}
    print(f"\nslerp_merge run {run.run_id}: {run.state}")
    for task_id, state in sorted(states.items()):
        print(f"  {task_id:20s} {state}")
    if str(run.state) != "success":
        return 1
    root = Path(os.environ.get("SLERP_OUTPUT_ROOT", Path.home() / "slerp-merges"))
    outputs = sorted(root.glob("slerp_merge/*/merged"), key=lambda p: p.stat().st_mtime)
    out = outputs[-1]
    print(f"\nmerged model: {out}\nvalidation report: {out / 'validation.json'}\n"
          f"{(out / 'validation.txt').read_text()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
