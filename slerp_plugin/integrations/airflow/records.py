"""The folder of a DAG run under ``$SLERP_OUTPUT_ROOT`` and the small records the pipeline leaves in
it for the "SLERP merges" dashboard.

``<root>/<dag_id>/<run folder>/`` holds the run's merge(s) (``merged``, ``merged-t0.3``, ...) and:

- ``run.json``: the DAG id and the run id (the folder name is a readable form of the run id);
- ``failure.json``: the task that failed last, its try and its one-line error (removed when the
  run succeeds after all);
- ``sweep.json``: a sweep's chosen t and output; for a one-pass sweep also each t's perplexity and
  verdict, the parents' perplexities and where its report is (``sweep/``).

Records are written atomically and read as untrusted input: a record that does not validate is
ignored.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ...errors import first_line, redact_secrets
from ...io.atomic import write_json_atomic

RUN_RECORD = "run.json"
FAILURE_RECORD = "failure.json"
SWEEP_RECORD = "sweep.json"
MAX_RECORD_BYTES = 16 << 20  #: a record larger than this is not read


class RunRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")

    dag_id: str = Field(max_length=250)
    run_id: str = Field(max_length=250)


class FailureRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")

    task_id: str = Field(max_length=250)
    try_number: int | None = None
    error: str = Field(max_length=2000)
    at: str = Field(max_length=64)


class SweepPointRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")

    t: float = Field(ge=0, le=1)
    perplexity: float | None = None
    passed: bool


class SweepRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")

    chosen_t: float | None = None  #: None: no t passed the gate
    chosen_output: str | None = Field(None, max_length=4096)
    mode: Literal["merge-each", "one-pass"] = "merge-each"
    points: list[SweepPointRecord] = Field(default_factory=list, max_length=64)  #: one-pass: each t
    parents: dict[Literal["model_1", "model_2"], float] = Field(default_factory=dict)
    eval_tokens: int | None = None
    eval_text: str | None = Field(None, max_length=250)
    report: str | None = Field(None, max_length=4096)


def run_folder_name(run_id: str) -> str:
    """A readable folder name for a run id: letters, digits and ``._+-`` kept, the rest ``-``
    (``manual__2026-12-01T02:00:00+00:00`` → ``manual__2026-12-01T02-00-00+00-00``)."""
    name = re.sub(r"[^A-Za-z0-9._+-]", "-", run_id)
    return name if name not in ("", ".", "..") else f"run-{name}"


def run_dir(output_root: str | Path, dag_id: str, run_id: str) -> Path:
    """Where a run's merges and records live: the same folder on every retry, so a retry resumes."""
    return Path(output_root) / dag_id / run_folder_name(run_id)


def write_run(folder: Path, dag_id: str, run_id: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / RUN_RECORD, RunRecord(dag_id=dag_id, run_id=run_id).model_dump())


def write_failure(folder: Path, task_id: str, try_number: int | None, error: BaseException | str) -> None:
    """Record that ``task_id`` failed with ``error`` (its first line, secrets redacted)."""
    text = first_line(error)
    record = FailureRecord(task_id=task_id, try_number=try_number, error=redact_secrets(text)[:2000],
                           at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / FAILURE_RECORD, record.model_dump())


def clear_failure(folder: Path) -> None:
    (folder / FAILURE_RECORD).unlink(missing_ok=True)


def write_sweep(folder: Path, chosen_t: float | None, chosen_output: str | None, **one_pass: Any) -> None:
    """Record a sweep's choice (``one_pass``: the other fields of :class:`SweepRecord`)."""
    folder.mkdir(parents=True, exist_ok=True)
    record = SweepRecord(chosen_t=chosen_t, chosen_output=chosen_output, **one_pass)
    write_json_atomic(folder / SWEEP_RECORD, record.model_dump())


def read_record(folder: Path, name: str, model: type[BaseModel]) -> BaseModel | None:
    """A record of ``folder`` validated as ``model``; None where absent or invalid."""
    path = folder / name
    try:
        if path.stat().st_size > MAX_RECORD_BYTES:
            return None
        return model.model_validate_json(path.read_bytes())
    except (OSError, ValidationError, ValueError):
        return None
