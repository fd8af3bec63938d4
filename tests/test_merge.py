"""One call from a spec to a finished merge: Hub inputs resolved, the read-ahead used, progress shown,
the result published."""

from __future__ import annotations

from model_helpers import folder_bytes, spec_for

from slerp_plugin import merge
from slerp_plugin.formats.manifest import Manifest
from slerp_plugin.hub.client import upload_folder
from slerp_plugin.io import prefetch
from slerp_plugin.spec import MergeSpec


def test_hub_inputs_and_push_to_hub(hub, demo_bf16, tmp_path):
    upload_folder(demo_bf16[0], "org/a")
    upload_folder(demo_bf16[1], "org/b")
    spec = MergeSpec(model_1="org/a", model_2="org/b@main", t=0.3, output=str(tmp_path / "from-hub"),
                     push_to_hub="org/merged", private=True)
    plan = merge.plan_merge(spec)
    assert plan.commits["model_1"] and plan.known_hashes  # Hub checksums are not recomputed
    result = merge.run_merge(spec)
    assert result.upload is not None and result.upload.repo_id == "org/merged" and result.upload.new_commit
    assert hub.state.repos["org/merged"].private
    local = merge.run_merge(spec_for(demo_bf16, tmp_path / "local"))
    hub_files, local_files = folder_bytes(result.output), folder_bytes(local.output)
    assert hub_files.keys() == local_files.keys()
    assert hub_files["model.safetensors"] == local_files["model.safetensors"]  # the same weights, bit for bit
    assert Manifest.read(result.output).inputs["model_2"].commit == plan.commits["model_2"]


def test_the_read_ahead_is_taken_over_and_changes_no_bit(demo_bf16, tmp_path, monkeypatch):
    monkeypatch.setenv("SLERP_PLUGIN_CACHE", str(tmp_path / "cache"))
    handle = prefetch.start(demo_bf16, budget=1 << 30)
    assert handle.wait(timeout=60)
    with_ = merge.run_merge(spec_for(demo_bf16, tmp_path / "with"), prefetch=handle)
    assert not handle._thread.is_alive()  # its hashers were taken over, which stops it
    without = merge.run_merge(spec_for(demo_bf16, tmp_path / "without"))
    weights = "model.safetensors"
    assert folder_bytes(with_.output)[weights] == folder_bytes(without.output)[weights]


def test_progress_bar_when_asked(demo_bf16, tmp_path, capsys):
    merge.run_merge(spec_for(demo_bf16, tmp_path / "m", show_pbar=True))
    assert "merging" in capsys.readouterr().err
