"""How long Airflow takes to parse each DAG file: ``airflow dags report`` on a fresh SQLite home.

    python bench/dag_parse.py [--limit 1.0]

Parses this repository's dags/ with one recipe in a temporary SLERP_RECIPES_DIR, prints each file's
parse time in seconds and exits 1 when a file takes longer than ``--limit`` seconds (default 1.0).
Every task of a DAG run parses its DAG file again before it starts, so this time is paid once per
task. (tests/dags/test_parse.py checks that nothing heavy is imported at parse time.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "name: bench\nmodel_1: org/a\nmodel_2: org/b\nt: 0.5\n"


def seconds(duration: str) -> float:
    """``0:00:00.051416`` → 0.051416."""
    h, m, s = duration.split(":")
    return timedelta(hours=int(h), minutes=int(m), seconds=float(s)).total_seconds()


def parse_times() -> list[dict]:
    """``airflow dags report``'s rows (``file``, ``duration``, ``dags``) for this repository's dags/,
    on a fresh SQLite home with one recipe."""
    with tempfile.TemporaryDirectory() as home:
        recipes = Path(home, "recipes")
        recipes.mkdir()
        (recipes / "bench.yaml").write_text(RECIPE)
        venv_bin = str(Path(sys.executable).parent)
        env = {**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}", "AIRFLOW_HOME": home,
               "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
               "SLERP_RECIPES_DIR": str(recipes)}
        subprocess.run(["airflow", "db", "migrate"], env=env, check=True, capture_output=True)
        out = subprocess.run(["airflow", "dags", "report", "-o", "json"], env=env, check=True,
                             capture_output=True, text=True).stdout
    return json.loads(out[out.index("[{"):])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=float, default=1.0, help="seconds a DAG file may take to parse")
    args = ap.parse_args(argv)
    slow = []
    print(f"{'file':<20} {'parse s':>8}  dags")
    for row in sorted(parse_times(), key=lambda r: r["file"]):
        s = seconds(row["duration"])
        print(f"{row['file']:<20} {s:>8.3f}  {', '.join(row['dags'])}")
        if s > args.limit:
            slow.append(row["file"])
    if slow:
        print(f"slower than {args.limit} s: {', '.join(slow)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
