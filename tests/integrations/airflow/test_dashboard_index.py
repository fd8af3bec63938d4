"""The dashboard after a year of runs: folders are read again only when they change, and the merges
are served a page at a time (newest first), filtered by DAG and by t."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from slerp_plugin.integrations.airflow import dashboard, records
from slerp_plugin.integrations.airflow.dashboard_index import FolderIndex
from slerp_plugin.io.atomic import write_json_atomic
from slerp_plugin.validate.report import ValidationReport


def allow_all():
    return lambda ids: set(ids)


def add_merge(root: Path, dag: str, run_id: str, t: float, day: int, name: str = "merged") -> Path:
    """A merge folder as the DAGs leave it, with a minimal manifest and a validation report."""
    run = records.run_dir(root, dag, run_id)
    if not run.is_dir():
        records.write_run(run, dag, run_id)
    out = run / name
    out.mkdir()
    inputs = {r: {"ref": f"org/{r}", "commit": "c" * 40, "path": "/x", "files": []}
              for r in ("model_1", "model_2")}
    write_json_atomic(out / "merge_manifest.json", {
        "created_at": f"2026-{1 + day // 28:02d}-{1 + day % 28:02d}T03:00:00+00:00",
        "spec": {"t": t, "DOT_THRESHOLD": 0.9995}, "inputs": inputs})
    write_report(out, 5.0 + t)
    return out


def write_report(out: Path, ppl: float) -> None:
    report = ValidationReport.model_validate({
        "model": str(out), "parents": ["a", "b"], "created_at": "2026-01-01T00:00:00+00:00", "passed": True,
        "summary": "PASSED", "structural": {"passed": True, "tensors": 3, "problems": []},
        "functional": {"passed": True, "status": "passed", "tokens": 64, "problems": [],
                       "perplexity": {"merged": ppl, "model_1": 6.0, "model_2": 6.5}}})
    write_json_atomic(out / "validation.json", json.loads(report.model_dump_json()))


def index() -> FolderIndex:
    return FolderIndex(dashboard._load_run, dashboard._merge_folders, dashboard.load_entry)


def test_folders_are_read_again_only_when_they_change(tmp_path):
    for day in range(6):
        add_merge(tmp_path, "slerp_nightly_a", f"scheduled__{day}", 0.5, day)
    ix = index()
    assert len(ix.scan([tmp_path])) == 6 and ix.reads == 12  # each run and each merge, once
    generation = ix.generation
    ix.scan([tmp_path])
    assert ix.reads == 12 and ix.generation == generation  # nothing changed: one stat per folder

    changed = records.run_dir(tmp_path, "slerp_nightly_a", "scheduled__3") / "merged"
    write_report(changed, 99.0)  # the validation task finishing later (written by a rename)
    runs = ix.scan([tmp_path])
    assert ix.reads == 13 and ix.generation == generation + 1
    (entry,) = [e for r in runs for _, e in r.merges.values() if e.output == str(changed)]
    assert entry.perplexity["merged"] == 99.0

    shutil.rmtree(records.run_dir(tmp_path, "slerp_nightly_a", "scheduled__0"))
    add_merge(tmp_path, "slerp_sweep", "manual__new", 0.2, 9, "merged-t0.2")
    runs = ix.scan([tmp_path])
    expected = [f"scheduled__{d}" for d in range(1, 6)] + ["manual__new"]
    assert sorted(r.run_id for r in runs) == sorted(expected)
    assert ix.reads == 15  # the new run and its merge only


def test_a_scan_within_max_age_is_shared(tmp_path):
    add_merge(tmp_path, "d", "r1", 0.5, 1)
    ix = index()
    first = ix.scan([tmp_path], max_age=60)
    add_merge(tmp_path, "d", "r2", 0.5, 2)
    assert ix.scan([tmp_path], max_age=60) is first  # the same roots, scanned a moment ago
    assert len(ix.scan([tmp_path], max_age=0)) == 2


@pytest.fixture(scope="module")
def year(tmp_path_factory) -> Path:
    """130 merges: two nightly DAGs for 55 days and 5 sweep runs of 4 t each, one run under a DAG
    id with markup in it."""
    root = tmp_path_factory.mktemp("year")
    for day in range(55):
        add_merge(root, "slerp_nightly_a", f"scheduled__a{day:03d}", 0.5, day)
        add_merge(root, "slerp_nightly_b", f"scheduled__b{day:03d}", 0.3, day)
    for k in range(5):
        for t in (0.2, 0.4, 0.6, 0.8):
            add_merge(root, "slerp_sweep", f"manual__s{k}", t, 60 + k, f"merged-t{t}")
    add_merge(root, "<i>odd", "manual__odd", 0.5, 0)
    return root


def get(root: Path, path: str):
    client = TestClient(dashboard.create_app([root], access=allow_all), headers={"x": "y"})
    return client.get(path)


def test_merges_are_served_a_page_at_a_time_newest_first(year):
    first = get(year, "/api/merges").json()
    assert first["total"] == 131 and first["page"] == 1 and first["pages"] == 3 and len(first["merges"]) == 50
    assert first["merges"][0]["run_id"].startswith("manual__s4")  # the newest runs are the sweeps
    created = [m["created_at"] for m in first["merges"]]
    assert created == sorted(created, reverse=True)
    last = get(year, "/api/merges?page=3").json()
    assert len(last["merges"]) == 31
    seen = {m["output"] for p in (1, 2, 3) for m in get(year, f"/api/merges?page={p}").json()["merges"]}
    assert len(seen) == 131  # every merge on exactly one page
    assert get(year, "/api/merges?page=9").json()["merges"] == []
    assert get(year, "/api/merges?per_page=501").status_code == 422
    assert get(year, "/api/merges?page=0").status_code == 422


def test_filter_by_dag_and_by_t(year):
    only_b = get(year, "/api/merges?dag=slerp_nightly_b").json()
    assert only_b["total"] == 55 and {m["dag_id"] for m in only_b["merges"]} == {"slerp_nightly_b"}
    at = get(year, "/api/merges?t=0.4").json()
    assert at["total"] == 5 and {m["t"] for m in at["merges"]} == {0.4}
    assert get(year, "/api/merges?t=1.5").status_code == 422
    assert "slerp_sweep" in only_b["dags"]  # what the DAG filter offers


def test_the_page_links_its_neighbours_plots_only_its_own_sweeps_and_escapes_names(year):
    html = get(year, "/").text
    assert 'href="?page=2"' in html and "← newer" not in html and "page 1 of 3" in html
    assert html.count("<svg") == 5  # the five sweeps are the newest runs, all on the first page
    assert "<i>odd" not in html and "&lt;i&gt;odd" in html
    page3 = get(year, "/?page=3&dag=slerp_nightly_a").text
    assert "<svg" not in page3 and "page 2 of 2" not in page3
    filtered = get(year, "/?dag=slerp_nightly_a&page=2").text
    assert '<a href="?dag=slerp_nightly_a">← newer</a>' in filtered and "older →" not in filtered
    assert '<option value="slerp_nightly_a" selected>' in filtered
