"""Model references resolved: local folders as they are, Hub ids downloaded, errors naming the role."""

from __future__ import annotations

import pytest

from slerp_plugin.errors import HubUnavailableError, ModelNotFoundError, RepoNotFoundError
from slerp_plugin.hub.client import upload_folder
from slerp_plugin.hub.sources import looks_like_hub_id, resolve_inputs, resolve_model
from slerp_plugin.io.model_files import ResolvedModel
from slerp_plugin.spec import MergeSpec, ModelRef


def test_what_looks_like_a_hub_id(tmp_path):
    assert looks_like_hub_id("org/name") and looks_like_hub_id("org/name@v1")
    assert not looks_like_hub_id("./org/name") and not looks_like_hub_id("/abs/path")
    assert not looks_like_hub_id("just-a-name")
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").mkdir()
    assert not looks_like_hub_id(str(tmp_path / "org" / "name"))


def test_local_folders_pass_through_and_other_names_are_refused(demo_bf16):
    assert resolve_model(ModelRef(ref=str(demo_bf16[0])), "model_1").commit is None
    with pytest.raises(ModelNotFoundError, match="model_2: model folder not found: nothing-here"):
        resolve_model(ModelRef(ref="nothing-here"), "model_2")


def test_hub_ids_are_downloaded_pinned_and_failures_name_the_role(hub, demo_bf16):
    up = upload_folder(demo_bf16[0], "org/a")
    got = resolve_model(ModelRef(ref="org/a"), "model_1")
    assert got.commit == up.commit and (got.path / "config.json").is_file() and got.hashes
    with pytest.raises(RepoNotFoundError, match="^model_2: org/missing@main: repository not found") as e:
        resolve_model(ModelRef(ref="org/missing"), "model_2")
    assert e.value.__cause__ is not None


def test_hub_unreachable_is_transient(monkeypatch):
    monkeypatch.setenv("SLERP_PLUGIN_HUB_BACKOFF", "0.001")
    with pytest.raises(HubUnavailableError, match="^tokenizer: .*cannot reach the Hub"):
        resolve_model(ModelRef(ref="org/nowhere"), "tokenizer", weights=False)


def test_resolve_inputs_keeps_what_is_given_and_shares_model_1_as_tokenizer(demo_bf16, tmp_path):
    spec = MergeSpec(model_1=str(demo_bf16[0]), model_2="org/never-downloaded", t=0.5, output=str(tmp_path))
    given = {"model_2": ResolvedModel(demo_bf16[1])}
    inputs = resolve_inputs(spec, given)
    assert inputs["model_2"] is given["model_2"] and inputs["tokenizer"] is inputs["model_1"]
