"""The pipeline's steps as plain functions: params validated again, retries told apart, outputs
placed per run, the nightly skip decision, the sweep's choice."""

from __future__ import annotations

import pytest

from slerp_plugin.errors import ConfigError, HubUnavailableError, ModelNotFoundError, ValidationGateError
from slerp_plugin.integrations.airflow import tasks


def test_params_become_a_spec_and_are_checked_again(demo_bf16, tmp_path):
    params = {"model_1": str(demo_bf16[0]), "model_2": "org/b", "model_2_revision": "v2", "t": 0.25,
              "dtype": "auto", "max_shard_size": "", "device": None}
    spec = tasks.spec_from_params(params, tmp_path / "out")
    assert spec.t == 0.25 and spec.model_2.revision == "v2" and spec.dtype is None
    assert spec.max_shard_size == 5_000_000_000 and spec.device == "auto"
    with pytest.raises(ConfigError, match="t: must be between 0 and 1"):
        tasks.spec_from_params({**params, "t": 1.5}, tmp_path / "out")
    with pytest.raises(ConfigError, match="model_1: missing"):
        tasks.spec_from_params({**params, "model_1": ""}, tmp_path / "out")


def test_transient_errors_are_told_from_permanent_ones():
    assert tasks.is_transient(HubUnavailableError("503")) and tasks.is_transient(ConnectionError())
    assert not tasks.is_transient(ConfigError("bad t")) and not tasks.is_transient(ValidationGateError("x"))
    assert not tasks.is_transient(ValueError())


def test_output_path_is_stable_per_run(tmp_path):
    a = tasks.output_path(tmp_path, "slerp_merge", "manual__2026-12-01T02:00:00+00:00")
    assert a == tasks.output_path(tmp_path, "slerp_merge", "manual__2026-12-01T02:00:00+00:00")
    assert a.parent.parent == tmp_path / "slerp_merge" and a.name == "merged" and "/" not in a.parent.name


def test_resolve_inputs_checks_local_folders(demo_bf16):
    inputs = tasks.resolve_inputs({"model_1": str(demo_bf16[0]), "model_2": str(demo_bf16[1]), "t": 0.5})
    assert inputs["model_1"]["commit"] is None and inputs["tokenizer"]["same_as"] == "model_1"
    with pytest.raises(ModelNotFoundError, match="model_2: model folder not found"):
        tasks.resolve_inputs({"model_1": str(demo_bf16[0]), "model_2": "/no/such", "t": 0.5})


def test_resolve_inputs_refuses_a_merge_that_cannot_fit_before_downloading(demo_bf16, tmp_path, monkeypatch,
                                                                             caplog):
    from collections import namedtuple

    from slerp_plugin import preflight
    from slerp_plugin.errors import OutputWriteError

    params = {"model_1": str(demo_bf16[0]), "model_2": str(demo_bf16[1]), "t": 0.5}
    with caplog.at_level("INFO"):
        tasks.resolve_inputs(params, output=tmp_path / "run" / "merged")
    assert "preflight: output: " in caplog.text and "preflight: disk at " in caplog.text
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: usage(10**9, 10**9, 0))
    with pytest.raises(OutputWriteError, match="^not enough disk space"):
        tasks.resolve_inputs(params, output=tmp_path / "run" / "merged")


def test_parents_changed_compares_commits_and_t():
    now = {"model_1": {"ref": "org/a", "commit": "a" * 40}, "model_2": {"ref": "org/b", "commit": "b" * 40}}
    last = {"inputs": {"model_1": {"commit": "a" * 40}, "model_2": {"commit": "b" * 40}}, "spec": {"t": 0.5}}
    assert tasks.parents_changed(now, None, 0.5) == {"changed": True, "reason": "no earlier merge published"}
    assert tasks.parents_changed(now, last, 0.5)["changed"] is False
    assert tasks.parents_changed(now, last, 0.4)["reason"] == "t changed"
    moved = {**now, "model_2": {"ref": "org/b", "commit": "c" * 40}}
    assert "model_2 org/b moved to cccccccccccc" == tasks.parents_changed(moved, last, 0.5)["reason"]


def test_best_of_sweep_takes_the_lowest_passing_perplexity():
    results = [{"t": 0.7, "output": "c", "validation": {"passed": True, "perplexity": {"merged": 9.0}}},
               {"t": 0.3, "output": "a", "validation": {"passed": False, "perplexity": {"merged": 1.0}}},
               {"t": 0.5, "output": "b", "validation": {"passed": True, "perplexity": {"merged": 5.0}}}]
    best = tasks.best_of_sweep(results)
    assert best["t"] == 0.5 and [r["t"] for r in best["sweep"]] == [0.7, 0.3, 0.5]
    assert best["table"].splitlines()[2].startswith("| 0.3 |")
    with pytest.raises(ValidationGateError, match="no t value"):
        tasks.best_of_sweep([results[1]])


def test_latest_output_and_an_unpublished_merge(tmp_path):
    assert tasks.latest_output(tmp_path) is None
    tasks.record_latest(tmp_path, "/merges/x")
    assert tasks.latest_output(tmp_path) == "/merges/x"
    assert tasks.publish("/merges/x", "") == {"published": False, "output": "/merges/x"}


def test_plan_groups_spread_shards_over_workers(demo_bf16, tmp_path):
    params = {"model_1": str(demo_bf16[0]), "model_2": str(demo_bf16[1]), "t": 0.5, "max_shard_size": "100KB"}
    inputs = tasks.resolve_inputs(params)
    groups = tasks.plan_groups(params, inputs, str(tmp_path / "m"), workers=2)
    flat = sorted(i for g in groups for i in g)
    assert len(groups) == 2 and flat == list(range(len(flat))) and len(flat) > 2


def test_sweep_mode_auto_weighs_local_folders_and_hub_listings_without_downloading(hub, demo_bf16, tmp_path):
    from slerp_plugin.hub import client as H

    weights = sum(f.stat().st_size for d in demo_bf16 for f in d.glob("*.safetensors"))
    roles = dict(zip(("model_1", "model_2"), demo_bf16, strict=True))
    local = {role: {"ref": str(d), "path": str(d)} for role, d in roles.items()}
    remote = {role: {"ref": f"org/{role}", "commit": H.upload_folder(d, f"org/{role}").commit}
              for role, d in roles.items()}
    for inputs in (local, remote):
        assert tasks.sweep_mode({"one_pass_above_gb": (weights - 1) / 1e9}, inputs) == "one-pass"
        assert tasks.sweep_mode({"one_pass_above_gb": weights / 1e9}, inputs) == "merge-each"
    assert not (tmp_path / "hf-cache").exists() or not list((tmp_path / "hf-cache").rglob("*.safetensors"))
    assert tasks.sweep_mode({"sweep_mode": "one-pass"}, {}) == "one-pass"
    with pytest.raises(ConfigError, match="sweep_mode"):
        tasks.sweep_mode({"sweep_mode": "sometimes"}, remote)
