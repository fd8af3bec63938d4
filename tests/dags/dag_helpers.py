"""Helpers for reading dag.test() results."""

from __future__ import annotations


def states(dag_run) -> dict[str, str]:
    """task id (with map index) → final state."""
    out = {}
    for ti in dag_run.get_task_instances():
        key = ti.task_id if ti.map_index < 0 else f"{ti.task_id}[{ti.map_index}]"
        out[key] = str(ti.state)
    return out


def tries(dag_run) -> dict[str, int]:
    return {ti.task_id: ti.try_number for ti in dag_run.get_task_instances()}
