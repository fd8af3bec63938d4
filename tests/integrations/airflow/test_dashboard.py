"""The SLERP merges dashboard: only for authenticated users, every field escaped, untrusted files
validated, failed runs and sweeps shown with what matters."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from fastapi import HTTPException, Request
from fastapi.testclient import TestClient
from model_helpers import ROOT

from slerp_plugin.integrations.airflow import records
from slerp_plugin.integrations.airflow.dashboard import (
    MergeEntry,
    Sweep,
    collect_merges,
    create_app,
    ppl_decimals,
)
from slerp_plugin.merge import run_merge
from slerp_plugin.spec import MergeSpec
from slerp_plugin.validate import EvalSettings, validate_merge, write_report

RUN = "manual__2026-11-28T02:00:00+00:00"
SWEEP = "manual__2026-11-28T03:00:00+00:00"
HIDDEN = "scheduled__2026-11-28T04:00:00+00:00"


def fake_access(request: Request):
    """Stands in for Airflow's authentication: a user is whoever the header names; the user
    ``viewer`` may not read the DAG ``secret_dag``."""
    user = request.headers.get("x-test-user")
    if not user:
        raise HTTPException(401, "Not authenticated")
    return lambda ids: {d for d in ids if not (user == "viewer" and d == "secret_dag")}


def client(root: Path, user: str | None = "admin") -> TestClient:
    headers = {"x-test-user": user} if user else {}
    return TestClient(create_app([root], access=fake_access), headers=headers)


def run_folder(root: Path, dag: str, run_id: str) -> Path:
    folder = records.run_dir(root, dag, run_id)
    records.write_run(folder, dag, run_id)
    return folder


@pytest.fixture(scope="module")
def root(demo_bf16, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dash")
    one = run_folder(root, "slerp_merge", RUN) / "merged"
    run_merge(MergeSpec(model_1=str(demo_bf16[0]), model_2=str(demo_bf16[1]), t=0.3, output=str(one)))
    write_report(validate_merge(one, demo_bf16, settings=EvalSettings(max_tokens=64)))
    (one / "hub_upload.json").write_text(json.dumps(
        {"published": True, "repo": "org/merged", "commit": "a" * 40, "url": "https://hub.example/org/merged"}))
    sweep = run_folder(root, "slerp_sweep", SWEEP)
    for i, (t, ppl, ok) in enumerate(((0.8, 610.25, False), (0.2, 540.004, True), (0.5, 540.001, True))):
        dst = sweep / f"merged-t{t}"
        shutil.copytree(one, dst)
        (dst / "hub_upload.json").unlink()
        man = json.loads((dst / "merge_manifest.json").read_text())
        man["spec"]["t"] = t
        man["created_at"] = f"2026-11-28T03:0{i}:00+00:00"
        (dst / "merge_manifest.json").write_text(json.dumps(man))
        rep = json.loads((dst / "validation.json").read_text())
        rep["passed"] = ok
        rep["functional"]["perplexity"] = {"merged": ppl, "model_1": 535.0, "model_2": 545.0}
        (dst / "validation.json").write_text(json.dumps(rep))
    records.write_sweep(sweep, 0.5, str(sweep / "merged-t0.5"))
    failed = run_folder(root, "slerp_merge", "manual__2026-11-28T05:00:00+00:00")
    records.write_failure(failed, "download_model_1", 4, RuntimeError("org/x@main: repository not found"))
    shutil.copytree(one, run_folder(root, "secret_dag", HIDDEN) / "merged")
    bad = run_folder(root, "slerp_merge", "broken_run") / "merged"
    bad.mkdir(parents=True)
    (bad / "merge_manifest.json").write_text("{not json")
    return root


def test_nothing_is_shown_to_anonymous_callers(root):
    anonymous = client(root, user=None)
    for path in ("/", "/api/merges", f"/runs/slerp_merge/{RUN}", f"/plot/slerp_sweep/{SWEEP}.svg"):
        r = anonymous.get(path)
        assert r.status_code == 401, path
        assert "org/merged" not in r.text and "slerp_merge" not in r.text
    assert anonymous.get("/openapi.json").status_code == 404  # not published (and never a 500)
    assert client(root).get("/openapi.json").status_code == 404


def test_api_lists_merges_failures_and_unreadable_folders(root, demo_bf16):
    data = client(root).get("/api/merges").json()
    by_run = {(e["dag_id"], e["run_id"], Path(e["output"]).name): e for e in data["merges"]}
    one = by_run[("slerp_merge", RUN, "merged")]
    assert one["readable"] and one["t"] == 0.3 and one["validation"] == "passed"
    assert [p["ref"] for p in one["parents"]] == [str(demo_bf16[0]), str(demo_bf16[1])]
    assert one["hub_repo"] == "org/merged" and one["hub_commit"] == "a" * 40
    assert one["eval_tokens"] == 64 and one["eval_text"] == "the bundled text"
    assert one["run_link"] == "/dags/slerp_merge/runs/manual__2026-11-28T02%3A00%3A00%2B00%3A00"
    assert by_run[("slerp_merge", "broken_run", "merged")]["readable"] is False
    (failure,) = data["failed_runs"]
    assert failure["failure"]["task_id"] == "download_model_1"
    assert "repository not found" in failure["failure"]["error"]
    assert ("secret_dag", HIDDEN, "merged") in by_run
    viewer = client(root, user="viewer").get("/api/merges").json()
    assert {e["dag_id"] for e in viewer["merges"]} == {"slerp_merge", "slerp_sweep"}  # not secret_dag


def test_page_shows_failures_sweeps_and_close_values(root):
    page = client(root).get("/").text
    assert "Failed runs" in page and "download_model_1" in page and "repository not found" in page
    merges = page[page.index("<h2>Merges"):]
    assert merges.count('<span class="badge bad">FAIL</span>') == 1 and "UNREADABLE" in merges
    assert ">540.0040<" in page and ">540.0010<" in page  # told apart where two decimals would not
    assert "← chosen" in page and "model_2 (parent)" in page and "<svg" in page
    sweep_rows = page[page.index("Sweeps"):page.index("<h2>Merges")]
    assert sweep_rows.index(">0.2<") < sweep_rows.index(">0.5<") < sweep_rows.index(">0.8<")  # sorted by t
    assert "model_1 alone has a lower perplexity than every merge" in sweep_rows  # 535 < 540.001
    assert "of the bundled text" in page and "64 tokens" in page
    readable = str(records.run_dir(root, "slerp_merge", RUN) / "merged")
    assert readable in page and "%" not in readable  # folder names a person can read and type


def test_the_run_page_is_compact(root):
    r = client(root).get(f"/runs/slerp_merge/{RUN}")
    assert r.status_code == 200 and "1 merge(s)" in r.text and 'class="cards"' in r.text


def test_everything_shown_is_escaped_and_only_http_links_are_made(root, tmp_path):
    evil = tmp_path / "evil"
    shutil.copytree(root, evil)
    folder = records.run_dir(evil, "slerp_merge", RUN) / "merged"
    man = json.loads((folder / "merge_manifest.json").read_text())
    man["inputs"]["model_1"]["ref"] = "<script>alert('ref')</script>"
    (folder / "merge_manifest.json").write_text(json.dumps(man))
    (folder / "hub_upload.json").write_text(json.dumps(
        {"published": True, "repo": "org/merged", "commit": "b" * 40, "url": "javascript:alert(1)"}))
    bad = records.run_dir(evil, "slerp_merge", "broken_run") / "merged"
    man["spec"]["DOT_THRESHOLD"] = "<script>alert('dot')</script>"
    (bad / "merge_manifest.json").write_text(json.dumps(man))
    records.write_failure(records.run_dir(evil, "slerp_merge", "manual__2026-11-28T05:00:00+00:00"),
                          "<b>task</b>", 1, "<img src=x onerror=alert(1)>")
    page = client(evil).get("/").text
    assert "<script>" not in page and "<img src=x" not in page and "<b>task" not in page
    assert "&lt;script&gt;alert(&#39;ref&#39;)&lt;/script&gt;" in page
    assert "javascript:" not in page
    entries = {e.output: e for e in collect_merges([evil])}
    assert entries[str(bad)].readable is False  # the string DOT_THRESHOLD does not validate


def test_decimals_tell_close_values_apart():
    assert ppl_decimals([527.6, 515.9]) == 2
    assert ppl_decimals([540.001, 540.004]) == 4
    assert ppl_decimals([1.0000001, 1.0]) == 6 and ppl_decimals([]) == 2


def test_collect_tolerates_missing_roots(tmp_path):
    assert collect_merges([tmp_path / "nope"]) == []


def test_plugin_declares_the_app_and_views():
    pytest.importorskip("airflow")
    spec = importlib.util.spec_from_file_location("slerp_dashboard_plugin",
                                                  ROOT / "plugins" / "slerp_dashboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    plugin = module.SlerpDashboardPlugin
    assert plugin.fastapi_apps[0]["url_prefix"] == "/slerp"
    views = {v["destination"]: v for v in plugin.external_views}
    assert views["nav"]["href"] == "/slerp/" and "{RUN_ID}" in views["dag_run"]["href"]
    anonymous = TestClient(plugin.fastapi_apps[0]["app"])
    assert anonymous.get("/api/merges").status_code in (401, 403)  # Airflow's own authentication


def test_a_parent_is_named_only_when_it_beats_every_merge():
    def sweep(parents: dict[str, float]) -> Sweep:
        merges = [MergeEntry.model_construct(perplexity={"merged": p}) for p in (12.0, 10.5)]
        return Sweep(dag_id="d", run_id="r", merges=merges, parents=parents)

    assert sweep({"model_1": 10.4, "model_2": 11.0}).best_parent == "model_1"
    assert sweep({"model_1": 10.6, "model_2": 11.0}).best_parent is None
    assert sweep({}).best_parent is None


def test_a_one_pass_sweep_is_shown_from_its_record_even_when_nothing_passed(tmp_path):
    run = run_folder(tmp_path, "slerp_sweep", SWEEP)
    points = [{"t": 0.7, "perplexity": 31.5, "passed": False},
              {"t": 0.3, "perplexity": 20.25, "passed": True},
              {"t": 0.5, "perplexity": None, "passed": False}]
    records.write_sweep(run, 0.3, None, mode="one-pass", points=points,
                        parents={"model_1": 20.0, "model_2": 30.0}, eval_tokens=256, eval_text="<b>text</b>",
                        report=str(run / "sweep"))
    failed = run_folder(tmp_path, "slerp_sweep", HIDDEN)
    records.write_sweep(failed, None, None, mode="one-pass", points=points[:1], parents={"model_1": 20.0})
    page = client(tmp_path).get(f"/runs/slerp_sweep/{SWEEP}").text  # no merge folder in the run
    rows = page[page.index("Sweeps"):]
    assert "one pass: every t evaluated without writing its merge" in rows
    assert rows.index(">0.3<") < rows.index(">0.5<") < rows.index(">0.7<") and "← chosen" in rows
    assert "20.25" in rows and "31.50" in rows
    assert "&lt;b&gt;text&lt;/b&gt;" in rows and "<b>text</b>" not in rows
    plot = client(tmp_path).get(f"/plot/slerp_sweep/{SWEEP}.svg")
    assert plot.status_code == 200 and "chosen (t=0.3)" in plot.text
    rows = client(tmp_path).get(f"/runs/slerp_sweep/{HIDDEN}").text
    assert "31.50" in rows and "← chosen" not in rows
