"""The SLERP merges dashboard: endpoints over sample manifests, unreadable ones listed, sweep plot."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from model_helpers import ROOT

from slerp_plugin.integrations.airflow.dashboard import collect_merges, create_app
from slerp_plugin.merge import run_merge
from slerp_plugin.spec import MergeSpec
from slerp_plugin.validate import validate_merge, write_report

RUN = "manual__2026-11-28T02:00:00+00:00"
SWEEP = "manual__2026-11-28T03:00:00+00:00"


@pytest.fixture(scope="module")
def root(demo_bf16, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dash")
    one = root / "slerp_merge" / quote(RUN, safe="") / "merged"
    run_merge(MergeSpec(model_1=str(demo_bf16[0]), model_2=str(demo_bf16[1]), t=0.3, output=str(one)))
    write_report(validate_merge(one, demo_bf16, max_tokens=64))
    (one / "hub_upload.json").write_text(json.dumps(
        {"published": True, "repo": "org/merged", "commit": "a" * 40, "url": "https://hub/org/merged/commit/aaa"}))
    for i, (t, ppl, ok) in enumerate(((0.2, 540.0, True), (0.5, 530.5, True), (0.8, 610.25, False))):
        dst = root / "slerp_sweep" / quote(SWEEP, safe="") / f"merged-t{t}"
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
    bad = root / "slerp_merge" / "broken_run" / "merged"
    bad.mkdir(parents=True)
    (bad / "merge_manifest.json").write_text("{not json")
    return root


def test_api_lists_merges_and_unreadable_manifests(root, demo_bf16):
    client = TestClient(create_app([root]))
    entries = client.get("/api/merges").json()
    assert len(entries) == 5
    by_run = {(e["dag_id"], e["run_id"], Path(e["output"]).name): e for e in entries}
    one = by_run[("slerp_merge", RUN, "merged")]
    assert one["readable"] and one["t"] == 0.3 and one["validation"] == "passed"
    assert [p["ref"] for p in one["parents"]] == [str(demo_bf16[0]), str(demo_bf16[1])]
    assert len(one["parents"]) == 2 and one["hub_repo"] == "org/merged" and one["hub_commit"] == "a" * 40
    assert set(one["perplexity"]) == {"merged", "model_1", "model_2"}
    assert one["run_link"] == f"/dags/slerp_merge/runs/{quote(RUN)}"
    broken = by_run[("slerp_merge", "broken_run", "merged")]
    assert broken["readable"] is False and "unreadable" in broken["error"]


def test_page_shows_numbers_failures_and_the_sweep_plot(root):
    client = TestClient(create_app([root]))
    r = client.get("/")
    assert r.status_code == 200
    page = r.text
    assert page.count("<span class=badge-bad>FAIL</span>") == 1
    assert "UNREADABLE" in page and page.count("<span class=badge-ok>PASS</span>") == 3
    assert ">0.3<" in page and ">610.25<" in page and ">530.50<" in page
    assert "<svg" in page and "perplexity against t" in page
    assert "org/merged" in page


def test_sweep_plot_and_run_page(root):
    client = TestClient(create_app([root]))
    svg = client.get(f"/plot/slerp_sweep/{quote(SWEEP, safe='')}.svg")
    assert svg.status_code == 200 and svg.headers["content-type"].startswith("image/svg+xml")
    assert svg.text.lstrip().startswith("<?xml") and "<svg" in svg.text
    assert client.get("/plot/slerp_merge/nope.svg").status_code == 404
    run = client.get(f"/runs/slerp_merge/{quote(RUN, safe='')}")
    assert run.status_code == 200 and "1 merge(s)" in run.text


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
