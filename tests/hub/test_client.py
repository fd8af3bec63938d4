"""Hub I/O with the real huggingface_hub client against the local Hub-compatible test server."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from model_helpers import HUB_TOKEN, ROOT, load_state

from slerp_plugin.errors import (
    DiskFullError,
    HubAuthError,
    HubError,
    HubUnavailableError,
    RepoNotFoundError,
    RevisionNotFoundError,
)
from slerp_plugin.formats.manifest import Manifest
from slerp_plugin.hub import client as H


def publish(hub, folder: Path, repo_id: str, tag: str | None = None) -> str:
    up = H.upload_folder(folder, repo_id)
    if tag:
        from huggingface_hub import HfApi

        HfApi(endpoint=hub.url, token=HUB_TOKEN).create_tag(repo_id, tag=tag, revision=up.commit)
    return up.commit


def test_round_trip_by_branch_tag_and_sha(hub, demo_bf16):
    a = demo_bf16[0]
    sha = publish(hub, a, "org/model-a", tag="v1")
    for rev in (None, "main", "v1", sha):
        d = H.download_model("org/model-a", rev)
        assert d.commit == sha and d.revision == rev
        names = {f.name for f in d.files}
        assert names == {p.name for p in a.iterdir()}
        for name in names:
            assert (d.path / name).read_bytes() == (a / name).read_bytes(), name
        assert all(len(h) == 64 for h in d.hashes().values())


def test_download_takes_only_what_a_merge_needs(hub, demo_bf16, tmp_path):
    folder = Path(shutil.copytree(demo_bf16[0], tmp_path / "m"))
    (folder / "pytorch_model.bin").write_bytes(b"pickle!")
    (folder / "notes.txt").write_text("not needed")
    publish(hub, folder, "org/extra")
    d = H.download_model("org/extra")
    assert not (d.path / "pytorch_model.bin").exists() and not (d.path / "notes.txt").exists()
    assert (d.path / "model.safetensors.index.json").exists()


def test_bin_only_repo_needs_allow_bin(hub, demo_bf16, tmp_path):
    folder = tmp_path / "binmodel"
    folder.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_bf16[0] / f, folder / f)
    state = load_state(demo_bf16[0])
    torch.save(state, folder / "pytorch_model.bin")
    publish(hub, folder, "org/bin")
    with pytest.raises(HubError, match="only pickled .bin weights; pass allow_bin"):
        H.download_model("org/bin")
    d = H.download_model("org/bin", allow_bin=True)
    converted = load_state(d.path)
    assert set(converted) == set(state) and all(torch.equal(converted[k], state[k]) for k in state)


class Payload:
    """A pickle that would run a command when loaded without ``weights_only``."""

    def __init__(self, victim):
        self.victim = victim

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.victim}",)


def test_a_malicious_bin_is_refused_in_one_line_and_runs_nothing(hub, demo_bf16, tmp_path):
    from slerp_plugin.errors import CheckpointError

    folder = tmp_path / "evil"
    folder.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_bf16[0] / f, folder / f)
    victim = tmp_path / "pwned"
    torch.save({"w": Payload(victim)}, folder / "pytorch_model.bin")
    publish(hub, folder, "org/evil")
    refused = "pytorch_model.bin refused: it is not a pickle of plain tensors"
    with pytest.raises(CheckpointError, match=refused) as e:
        H.download_model("org/evil", allow_bin=True)
    assert "\n" not in str(e.value) and "weights_only" not in str(e.value)
    assert not victim.exists()
    snapshot_root = Path(hub.state.blob_dir).parent / "hf-cache"
    assert not list(snapshot_root.rglob("slerp_plugin_safetensors/*"))  # nothing half-converted left


def test_upload_retried_after_500_on_commit_makes_one_commit(hub, demo_bf16):
    H.upload_folder(demo_bf16[0], "org/retry")  # creates the repo: initial commit + 1
    hub.state.fail("POST", r"/api/models/org/retry/commit/", 500, times=2)
    up = H.upload_folder(demo_bf16[1], "org/retry")
    assert up.new_commit and hub.state.commit_count("org/retry") == 3
    again = H.upload_folder(demo_bf16[1], "org/retry")  # identical: no new commit, not even empty
    assert not again.new_commit and again.commit == up.commit
    assert hub.state.commit_count("org/retry") == 3


def test_commit_that_landed_but_whose_answer_was_lost_is_not_repeated(hub, demo_bf16):
    H.upload_folder(demo_bf16[0], "org/lost")
    hub.state.fail("POST", r"/api/models/org/lost/commit/", 500, times=1, after=True)
    up = H.upload_folder(demo_bf16[1], "org/lost", commit_message="merge b")
    assert hub.state.commit_count("org/lost") == 3  # initial, a, b — b only once
    head = hub.state.repos["org/lost"].branches["main"]
    assert up.commit == head and up.url.endswith(head)


def test_transient_503s_on_download_are_retried(hub, demo_bf16):
    sha = publish(hub, demo_bf16[0], "org/flaky")
    hub.state.fail("GET", r"/api/models/org/flaky", 503, times=2)
    hub.state.fail("GET", r"/org/flaky/resolve/", 503, times=2)
    d = H.download_model("org/flaky")
    assert d.commit == sha and (d.path / "config.json").is_file()


def test_a_connection_reset_mid_file_is_resumed_and_verified(hub, demo_bf16):
    publish(hub, demo_bf16[0], "org/reset")
    shards = sorted(demo_bf16[0].glob("*.safetensors"))
    hub.state.reset(hub.state.large_file_gets("org/reset"), after_bytes=1000, times=3)
    d = H.download_model("org/reset")
    assert hub.state.resets[0].times == 0  # every reset was hit
    for src in shards:
        assert (d.path / src.name).read_bytes() == src.read_bytes()


def test_the_test_hub_serves_ranges_at_a_set_bandwidth(hub, demo_bf16):
    import httpx

    publish(hub, demo_bf16[0], "org/bw")
    src = sorted(demo_bf16[0].glob("*.safetensors"))[0]
    url = f"{hub.url}/org/bw/resolve/main/{src.name}"
    part = httpx.get(url, headers={"Range": "bytes=10-1033"})
    assert part.status_code == 206 and part.content == src.read_bytes()[10:1034]
    assert part.headers["Content-Range"] == f"bytes 10-1033/{src.stat().st_size}"
    assert httpx.get(url, headers={"Range": "bytes=-16"}).content == src.read_bytes()[-16:]
    assert httpx.get(url, headers={"Range": f"bytes={src.stat().st_size}-"}).status_code == 416
    hub.state.bandwidth["down"] = 200_000
    started = time.monotonic()
    assert httpx.get(url).content == src.read_bytes()
    assert time.monotonic() - started >= src.stat().st_size / 200_000 * 0.9


def test_slow_responses_still_succeed(hub, demo_bf16):
    publish(hub, demo_bf16[0], "org/slow")
    hub.state.fail("GET", r"/api/models/org/slow", 0, times=1, delay=1.0)
    assert H.resolve_revision("org/slow")


def test_permanent_errors_are_clear_and_not_retried(hub, demo_bf16, monkeypatch):
    publish(hub, demo_bf16[0], "org/known")
    calls = len(hub.state.requests)
    with pytest.raises(RepoNotFoundError) as e:
        H.download_model("org/unknown")
    assert not e.value.transient and "org/unknown" in str(e.value) and "\n" not in str(e.value)
    assert len(hub.state.requests) - calls == 1  # not retried
    with pytest.raises(RevisionNotFoundError, match="org/known@nope: revision not found"):
        H.download_model("org/known", "nope")
    with pytest.raises(HubAuthError, match="not authorised"):
        H.upload_folder(demo_bf16[0], "org/other", token="hf_wrong_token_123456")
    hub.state.repos["org/known"].gated = True
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubAuthError, match="gated"):
        H.resolve_revision("org/known")


def test_network_down_is_transient_after_retries(monkeypatch):
    monkeypatch.setenv("SLERP_PLUGIN_HUB_BACKOFF", "0.01")
    with pytest.raises(HubUnavailableError, match="cannot reach the Hub") as e:
        H.resolve_revision("org/x", endpoint="http://127.0.0.1:9", retries=2)
    assert e.value.transient


def test_disk_full_is_permanent():
    err = H._translate(OSError(errno.ENOSPC, "No space left on device", "/cache/blob"), "org/x", None)
    assert isinstance(err, DiskFullError) and not err.transient and "no space left" in str(err)


def test_merge_from_hub_ids_through_the_cli_and_publish(hub, demo_bf16, tmp_path):
    sha_a = publish(hub, demo_bf16[0], "org/a", tag="v1")
    sha_b = publish(hub, demo_bf16[1], "org/b")
    env = {**os.environ, "SLERP_PLUGIN_HUB_BACKOFF": "0.01"}
    out = tmp_path / "merged"
    r = subprocess.run(
        [sys.executable, "-m", "slerp_plugin", "--config-path", str(ROOT / "config/_get_started"),
         "--config-name", "llm_slerp", "modelpool.models.model_1=org/a@v1", "modelpool.models.model_2=org/b",
         "modelpool.tokenizer=org/a@v1", "method.t=0.3", f"+method.model_save_path={out}",
         "+push_to_hub=org/merged"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    man = Manifest.read(out)
    assert man.inputs["model_1"].commit == sha_a and man.inputs["model_1"].revision == "v1"
    assert man.inputs["model_2"].commit == sha_b
    assert all(f.sha256 for f in man.inputs["model_1"].files)
    assert hub.state.commit_count("org/merged") == 2
    head = hub.state.repos["org/merged"].commits[hub.state.repos["org/merged"].branches["main"]]
    assert head.title == f"SLERP merge of org/a@{sha_a[:12]} and org/b@{sha_b[:12]} (t=0.3)"
    assert "published:" in r.stdout
    # the token is in the environment of that run, and nowhere in what it said or wrote
    assert HUB_TOKEN not in r.stdout + r.stderr
    for p in out.rglob("*"):
        if p.is_file():
            assert HUB_TOKEN.encode() not in p.read_bytes(), p
    up = subprocess.run([sys.executable, "-m", "slerp_plugin", "upload", str(out), "org/merged"],
                        env=env, capture_output=True, text=True, timeout=300)
    assert up.returncode == 0 and up.stdout.startswith("unchanged:"), up.stderr
    assert hub.state.commit_count("org/merged") == 2


def test_cli_errors_for_hub_failures(hub, demo_bf16, tmp_path):
    env = {**os.environ, "SLERP_PLUGIN_HUB_BACKOFF": "0.01"}
    base = [sys.executable, "-m", "slerp_plugin", "--config-path", str(ROOT / "config/_get_started"),
            "--config-name", "llm_slerp", f"+method.model_save_path={tmp_path / 'o'}"]
    r = subprocess.run([*base, "modelpool.models.model_1=org/missing"], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    lines = [x for x in r.stderr.splitlines() if x.startswith("slerp-merge: error:")]
    assert r.returncode == 7 and len(lines) == 1
    assert "model_1: org/missing@main: repository not found" in lines[0]
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"
    r = subprocess.run([*base], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 7 and "cannot reach the Hub" in r.stderr
    assert not (tmp_path / "o").exists()


def test_token_never_logged(hub, demo_bf16, caplog, capfd):
    import logging

    caplog.set_level(logging.DEBUG)
    hub.state.fail("POST", r"/commit/", 500, times=1)
    H.upload_folder(demo_bf16[0], "org/logged")
    with pytest.raises(HubError):
        H.download_model("org/nope")
    with pytest.raises(HubAuthError) as e:
        H.upload_folder(demo_bf16[0], "org/x", token="hf_secretsecretsecret")
    captured = capfd.readouterr()
    text = caplog.text + captured.out + captured.err + str(e.value)
    assert HUB_TOKEN not in text and "hf_secretsecretsecret" not in text
