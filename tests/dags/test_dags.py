"""The DAGs: import cleanly, reject bad params up front, run end to end with dag.test()."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
import yaml
from dag_helpers import states, tries

from slerp_plugin.formats.manifest import Manifest

HUB_TOKEN = "hf_test_token_write"

pytest.importorskip("airflow")


def test_every_dag_imports(dagbag):
    recipe = {"name": "demo", "model_1": "org/a", "model_2": "org/b", "t": 0.5}
    (dagbag.recipes / "demo.yaml").write_text(yaml.safe_dump(recipe))
    bag = dagbag()
    assert bag.import_errors == {}
    assert {"slerp_merge", "slerp_sweep", "slerp_nightly_demo"} <= set(bag.dags)
    nightly = bag.dags["slerp_nightly_demo"]
    assert nightly.catchup is False and "0 2 * * *" in repr(nightly.timetable)
    merge = bag.dags["slerp_merge"]
    for task_id in ("merge", "finalize", "validate"):
        assert merge.get_task(task_id).queue == "gpu"
    assert merge.get_task("download_model_1").queue != "gpu"
    for task in merge.tasks:
        assert task.retries >= 1 and task.execution_timeout is not None and task.retry_policy is not None


def test_bad_recipe_is_an_import_error_naming_the_file(dagbag):
    (dagbag.recipes / "broken.yaml").write_text("name: x\nmodel_1: a/b\nmodel_2: c/d\nt: 3\n")
    bag = dagbag()
    assert any("broken.yaml" in err and "t:" in err for err in bag.import_errors.values())


def test_params_reject_t_out_of_range_before_any_task(dagbag, demo_bf16):
    from airflow.sdk.exceptions import ParamValidationError

    dag = dagbag().dags["slerp_merge"]
    with pytest.raises(ParamValidationError):
        dag.test(run_conf={"model_1": str(demo_bf16[0]), "model_2": str(demo_bf16[1]), "t": 1.5})
    assert not dagbag.outputs.exists()


def test_merge_dag_end_to_end_with_hub_retries_and_publish(dagbag, demo_bf16, hub):
    from slerp_plugin.hub.client import upload_folder

    upload_folder(demo_bf16[0], "org/a")
    upload_folder(demo_bf16[1], "org/b")
    # more 503s than the in-task retries absorb (5 attempts): the download task fails once with a
    # transient error and Airflow retries it
    hub.state.fail("GET", r"/api/models/org/a/revision/[0-9a-f]{40}$", 503, times=5)
    hub.state.fail("GET", r"/org/a/resolve/", 503, times=2)
    dag = dagbag().dags["slerp_merge"]
    dr = dag.test(run_conf={"model_1": "org/a", "model_2": "org/b", "t": 0.3, "target_repo": "org/merged",
                            "eval_max_tokens": 128})
    st = states(dr)
    assert str(dr.state) == "success", st
    assert st.pop("stream_to_hub") == "skipped" and all(s == "success" for s in st.values()), st
    assert tries(dr)["download_model_1"] == 2
    assert hub.state.commit_count("org/merged") == 2
    out = next(dagbag.outputs.glob("slerp_merge/*/merged"))
    man = Manifest.read(out)
    assert man.spec["t"] == 0.3 and man.inputs["model_1"].ref == "org/a" and man.inputs["model_1"].commit
    report = json.loads((out / "validation.json").read_text())
    assert report["passed"] and report["functional"]["status"] == "passed"
    assert HUB_TOKEN not in (out / "merge_manifest.json").read_text()


def test_merge_dag_streams_hub_to_hub_when_asked(dagbag, demo_bf16, hub):
    from slerp_plugin.hub.client import list_files, resolve_revision, upload_folder

    upload_folder(demo_bf16[0], "org/a")
    upload_folder(demo_bf16[1], "org/b")
    hub.state.reset(r"/org/b/resolve/.*safetensors$", after_bytes=3000, times=2)
    dag = dagbag().dags["slerp_merge"]
    dr = dag.test(run_conf={"model_1": "org/a", "model_2": "org/b", "t": 0.3, "target_repo": "org/streamed",
                            "stream": True, "max_shard_size": "200KB"})
    st = states(dr)
    assert str(dr.state) == "success", st
    assert st["stream_to_hub"] == "success"
    assert st["download_model_1"] == "skipped" and st["plan"] == "skipped" and st["publish"] == "skipped"
    assert dag.get_task("stream_to_hub").queue == "gpu"
    assert hub.state.commit_count("org/streamed") == 2
    names = {f.name for f in list_files("org/streamed", resolve_revision("org/streamed"))}
    assert {"model.safetensors.index.json", "merge_manifest.json", "config.json"} <= names
    assert not list(dagbag.outputs.glob("slerp_merge/*/merged*"))  # nothing of the models kept locally
    assert not list(dagbag.outputs.rglob("*.safetensors"))
    from slerp_plugin.integrations.airflow.dashboard import collect_merges

    (entry,) = collect_merges([dagbag.outputs])  # on the dashboard with its Hub commit
    assert entry.readable and entry.t == 0.3 and entry.hub_repo == "org/streamed"
    assert entry.hub_commit == resolve_revision("org/streamed") and entry.parents[0].ref == "org/a"
    assert "validation.json" in names and entry.validation == "passed"  # the gate ran in the stream
    assert set(entry.perplexity) == {"merged", "model_1", "model_2"} and entry.eval_tokens


def test_a_stream_failing_its_gate_publishes_nothing_and_is_not_retried(dagbag, demo_bf16, hub, monkeypatch):
    from slerp_plugin.hub.client import upload_folder
    from slerp_plugin.integrations.airflow.dashboard import collect_merges
    from slerp_plugin.stream import evaluation as gate

    upload_folder(demo_bf16[0], "org/a")
    upload_folder(demo_bf16[1], "org/b")
    real = gate.judge
    # the real figures, judged by a gate no merge passes (a merge that breaks both parents is slow
    # to make; tests/stream/test_gate.py makes one)
    monkeypatch.setattr(gate, "judge", lambda evals, **kw: real(evals, **{**kw, "margin": -0.99}))
    dag = dagbag().dags["slerp_merge"]
    dr = dag.test(run_conf={"model_1": "org/a", "model_2": "org/b", "t": 0.3, "target_repo": "org/streamed",
                            "stream": True, "max_shard_size": "200KB"})
    assert str(dr.state) == "failed" and states(dr)["stream_to_hub"] == "failed"
    assert tries(dr)["stream_to_hub"] == 1  # a failed gate is a verdict, not an outage
    assert hub.state.commit_count("org/streamed") == 1  # the repo was created; nothing committed
    (entry,) = collect_merges([dagbag.outputs])
    assert entry.validation == "failed" and set(entry.perplexity) == {"merged", "model_1", "model_2"}


def test_an_interrupted_stream_is_retried_by_airflow_and_resumes(dagbag, demo_bf16, hub, monkeypatch):
    from slerp_plugin.errors import HubUnavailableError
    from slerp_plugin.hub.client import upload_folder
    from slerp_plugin.stream import spool

    upload_folder(demo_bf16[0], "org/a")
    upload_folder(demo_bf16[1], "org/b")
    real = spool.fetch_spool
    seen = {"failed": False}

    def network_gone_once(spool, role, *a, **kw):
        if spool.index == 2 and kw.get("write", True) and not seen["failed"]:
            deadline = time.monotonic() + 30
            while not list(dagbag.outputs.rglob("*.hub.json")) and time.monotonic() < deadline:
                time.sleep(0.01)  # once the first shard is on the Hub
            seen["failed"] = True
            raise HubUnavailableError("connection lost (simulated)")
        return real(spool, role, *a, **kw)

    monkeypatch.setattr(spool, "fetch_spool", network_gone_once)
    puts_before = sum(1 for m, _, _ in hub.state.requests if m == "PUT")
    dag = dagbag().dags["slerp_merge"]
    dr = dag.test(run_conf={"model_1": "org/a", "model_2": "org/b", "t": 0.5, "target_repo": "org/streamed",
                            "stream": True, "max_shard_size": "60KB"})
    assert str(dr.state) == "success", states(dr)
    assert seen["failed"] and tries(dr)["stream_to_hub"] == 2
    assert hub.state.commit_count("org/streamed") == 2
    total = len([n for n in hub.state.repos["org/streamed"].commits[
        hub.state.repos["org/streamed"].branches["main"]].files if n.endswith(".safetensors")])
    puts = sum(1 for m, _, _ in hub.state.requests if m == "PUT") - puts_before
    assert total > 3 and puts == total  # every shard sent once: the retry sent only what was missing


def test_interrupted_merge_is_retried_and_resumes(dagbag, demo_bf16, monkeypatch):
    from slerp_plugin.io import writer as checkpoint

    original = checkpoint.ShardWriter.write
    seen = {"bytes": 0, "failed": False}

    def write(self, data):
        original(self, data)
        seen["bytes"] += memoryview(data).nbytes
        if seen["bytes"] > 150_000 and not seen["failed"]:
            seen["failed"] = True
            raise InterruptedError("worker lost mid-merge (simulated)")

    monkeypatch.setattr(checkpoint.ShardWriter, "write", write)
    dag = dagbag().dags["slerp_merge"]
    dr = dag.test(run_conf={"model_1": str(demo_bf16[0]), "model_2": str(demo_bf16[1]), "t": 0.5,
                            "max_shard_size": "100KB", "validate_functional": False})
    assert str(dr.state) == "success", states(dr)
    assert seen["failed"] and tries(dr)["merge"] == 2
    out = next(dagbag.outputs.glob("slerp_merge/*/merged"))
    assert Manifest.read(out).resume["reused_shards"] >= 1


def test_invalid_t_inside_the_merge_fails_fast(dagbag, demo_bf16):
    from slerp_plugin.errors import ConfigError
    from slerp_plugin.integrations.airflow.tasks import spec_from_params

    with pytest.raises(ConfigError, match="t: must be between 0 and 1"):
        spec_from_params({"model_1": "a", "model_2": "b", "t": 2}, "o")


def test_nightly_skips_unchanged_parents_and_merges_new_revisions(dagbag, demo_bf16, hub, tmp_path):
    import shutil

    from slerp_plugin.hub.client import upload_folder

    upload_folder(demo_bf16[0], "org/a")
    upload_folder(demo_bf16[1], "org/b")
    recipe = {"name": "ab", "model_1": "org/a", "model_2": "org/b", "t": 0.4, "target_repo": "org/ab-nightly",
              "validate_functional": False}
    (dagbag.recipes / "ab.yaml").write_text(yaml.safe_dump(recipe))
    dag = dagbag().dags["slerp_nightly_ab"]

    first = dag.test()
    assert str(first.state) == "success" and states(first)["publish"] == "success"
    assert hub.state.commit_count("org/ab-nightly") == 2

    second = dag.test()
    st = states(second)
    assert str(second.state) == "success"
    assert st["parents_changed"] == "success" and st["plan"] == "skipped" and st["publish"] == "skipped", st

    changed = Path(shutil.copytree(demo_bf16[1], tmp_path / "b2"))
    (changed / "README.md").write_text("a new revision of model b\n")
    upload_folder(changed, "org/b")
    third = dag.test()
    assert states(third)["publish"] == "success"
    assert hub.state.commit_count("org/ab-nightly") == 3


def test_sweep_publishes_the_best_t(dagbag, demo_bf16, hub, capfd):
    dag = dagbag().dags["slerp_sweep"]
    dr = dag.test(run_conf={"model_1": str(demo_bf16[0]), "model_2": str(demo_bf16[1]),
                            "t_values": [0.2, 0.5, 0.8], "target_repo": "org/sweep", "eval_max_tokens": 64})
    st = states(dr)
    assert str(dr.state) == "success", st
    assert [k for k in st if k.startswith("merge_and_validate[")] == [
        "merge_and_validate[0]", "merge_and_validate[1]", "merge_and_validate[2]"]
    outs = sorted(dagbag.outputs.glob("slerp_sweep/*/merged-t*"))
    assert [p.name for p in outs] == ["merged-t0.2", "merged-t0.5", "merged-t0.8"]
    reports = {p.name: json.loads((p / "validation.json").read_text())["functional"] for p in outs}
    ppl = {name: f["perplexity"]["merged"] for name, f in reports.items()}
    # the parents were evaluated once, before the merges: 3 + 2 perplexity runs, not 3 × 3
    assert st["evaluate_parents"] == "success"
    for f in reports.values():
        assert f["evaluations"]["model_1"]["cached"] and f["evaluations"]["model_2"]["cached"]
        assert not f["evaluations"]["merged"]["cached"]
    assert len(list((dagbag.outputs / ".evaluations").glob("*.json"))) == 2
    best = min(ppl, key=ppl.get)
    published = hub.state.repos["org/sweep"]
    head = published.commits[published.branches["main"]]
    assert f"t={best.removeprefix('merged-t')}" in head.title
    out = capfd.readouterr()
    lines = (out.out + out.err).splitlines()
    errors = [line for line in lines if re.search(r"\[(error|critical)\s*\]", line)]
    assert errors == [], "a successful sweep logs no errors"
    # small parents: a merge per t, not one pass
    assert st["sweep_in_one_pass"] == "skipped" and st["publish_chosen"] == "skipped"


def test_a_sweep_above_the_size_runs_in_one_pass_and_writes_only_the_chosen_merge(dagbag, demo_bf16, hub):
    dag = dagbag().dags["slerp_sweep"]
    dr = dag.test(run_conf={"model_1": str(demo_bf16[0]), "model_2": str(demo_bf16[1]),
                            "t_values": [0.8, 0.2, 0.5], "target_repo": "org/sweep1", "eval_max_tokens": 64,
                            "one_pass_above_gb": 0})
    st = states(dr)
    assert str(dr.state) == "success", st
    assert st["sweep_in_one_pass"] == st["merge_chosen"] == st["publish_chosen"] == "success"
    assert st["evaluate_parents"] == st["publish"] == "skipped"
    assert not any(k.startswith("merge_and_validate[") for k in st)
    (run,) = dagbag.outputs.glob("slerp_sweep/*/sweep")
    sweep = json.loads((run / "sweep.json").read_text())
    assert [p["t"] for p in sweep["points"]] == [0.2, 0.5, 0.8] and sweep["best_t"] is not None
    best = sweep["best_t"]
    assert [p.name for p in run.parent.glob("merged*")] == [f"merged-t{best}"]  # one model written
    record = json.loads((run.parent / "sweep.json").read_text())
    assert record["mode"] == "one-pass" and record["chosen_t"] == best and len(record["points"]) == 3
    validated = json.loads((run.parent / f"merged-t{best}" / "validation.json").read_text())["functional"]
    chosen = next(p for p in sweep["points"] if p["t"] == best)
    assert validated["perplexity"]["merged"] == pytest.approx(chosen["perplexity"], rel=1e-4)
    published = hub.state.repos["org/sweep1"]
    assert f"t={best}" in published.commits[published.branches["main"]].title


def test_a_one_pass_sweep_of_hub_parents_downloads_nothing_and_streams_the_chosen_t(dagbag, demo_bf16, hub):
    from slerp_plugin.hub.client import list_files, resolve_revision, upload_folder

    upload_folder(demo_bf16[0], "org/a")
    upload_folder(demo_bf16[1], "org/b")
    dag = dagbag().dags["slerp_sweep"]
    dr = dag.test(run_conf={"model_1": "org/a", "model_2": "org/b", "t_values": [0.2, 0.7],
                            "target_repo": "org/swept", "stream": True, "max_shard_size": "200KB",
                            "eval_max_tokens": 64, "one_pass_above_gb": 0})
    st = states(dr)
    assert str(dr.state) == "success", st
    assert st["sweep_in_one_pass"] == st["merge_chosen"] == st["publish_chosen"] == "success"
    assert st["download_all"] == st["evaluate_parents"] == "skipped"
    assert not list(dagbag.outputs.rglob("*.safetensors"))  # parents read by range, the winner streamed
    assert not (Path(os.environ["HF_HUB_CACHE"]) / "models--org--a").exists()
    (run,) = dagbag.outputs.glob("slerp_sweep/*/sweep")
    sweep = json.loads((run / "sweep.json").read_text())
    best = sweep["best_t"]
    record = json.loads((run.parent / "sweep.json").read_text())
    assert record["chosen_t"] == best and record["chosen_output"].startswith("org/swept@")
    assert hub.state.commit_count("org/swept") == 2  # created, then the one publishing commit
    names = {f.name for f in list_files("org/swept", resolve_revision("org/swept"))}
    assert {"validation.json", "merge_manifest.json", "model.safetensors.index.json"} <= names
    gate = json.loads((run.parent / "streamed" / "validation.json").read_text())["functional"]
    chosen = next(p for p in sweep["points"] if p["t"] == best)
    assert gate["perplexity"]["merged"] == pytest.approx(chosen["perplexity"], rel=1e-4)
    assert gate["perplexity"]["model_1"] == pytest.approx(record["parents"]["model_1"], rel=1e-6)
