"""LFS pre-upload: shards sent before the commit, recognised later by SHA-256, published in one commit."""

from __future__ import annotations

import hashlib

import pytest

from slerp_plugin.errors import HubError
from slerp_plugin.hub import lfs
from slerp_plugin.hub.client import list_files, resolve_revision


def test_preuploaded_files_are_published_by_one_commit_from_their_sha256_alone(hub, tmp_path, monkeypatch):
    from huggingface_hub.lfs import UploadInfo

    lfs.ensure_repo("org/pre")
    shard = tmp_path / "model-00001-of-00001.safetensors"
    shard.write_bytes(b"\x01\x02" * 50_000)
    sha = hashlib.sha256(shard.read_bytes()).hexdigest()
    assert lfs.lfs_present("org/pre", [(sha, 100_000)]) == set()
    hashed = []  # files whose SHA-256 huggingface_hub would read from them: none, it is given
    real = UploadInfo.from_path.__func__
    monkeypatch.setattr(UploadInfo, "from_path",
                        classmethod(lambda cls, path: hashed.append(path) or real(cls, path)))
    lfs.preupload("org/pre", shard, shard.name, sha)
    assert hashed == []
    assert lfs.lfs_present("org/pre", [(sha, 100_000), ("0" * 64, 5)]) == {sha}
    shard.unlink()  # what a streaming merge does once a shard is up
    (tmp_path / "config.json").write_text("{}")
    from huggingface_hub import CommitOperationAdd

    ops = [lfs.uploaded_file(shard.name, sha, 100_000),
           CommitOperationAdd(path_in_repo="config.json", path_or_fileobj=str(tmp_path / "config.json"))]
    before = hub.state.commit_count("org/pre")
    up = lfs.commit_uploaded("org/pre", ops, "SLERP merge of a and b (t=0.5)")
    assert up.new_commit and hub.state.commit_count("org/pre") == before + 1
    files = {f.name: f for f in list_files("org/pre", resolve_revision("org/pre"))}
    assert files[shard.name].sha256 == sha and files[shard.name].size == 100_000


def test_a_commit_whose_answer_was_lost_is_not_made_twice(hub, tmp_path):
    lfs.ensure_repo("org/lost")
    (tmp_path / "a.json").write_text("{}")
    from huggingface_hub import CommitOperationAdd

    hub.state.fail("POST", r"/commit/main$", status=500, times=1, after=True)  # lands, answer lost
    before = hub.state.commit_count("org/lost")
    ops = [CommitOperationAdd(path_in_repo="a.json", path_or_fileobj=str(tmp_path / "a.json"))]
    lfs.commit_uploaded("org/lost", ops, "SLERP merge of x and y (t=0.1)")
    assert hub.state.commit_count("org/lost") == before + 1


def test_an_upload_the_hub_refuses_is_one_line(hub, tmp_path):
    lfs.ensure_repo("org/bad")
    f = tmp_path / "x.safetensors"
    f.write_bytes(b"abc" * 1000)
    with pytest.raises(HubError) as e:
        lfs.preupload("org/bad", f, f.name, "0" * 64)  # not the file's SHA-256: the Hub says 400
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("hub_storage", ["lfs"])
def test_an_object_another_repo_holds_is_uploaded_again(hub, tmp_path):
    """As on the Hub, a repo's LFS objects are its own: the streaming benchmarks' uploads are real
    even when another repo holds the same bytes."""
    shard = tmp_path / "model.safetensors"
    shard.write_bytes(b"\x03" * 100_000)
    sha = hashlib.sha256(shard.read_bytes()).hexdigest()
    for repo in ("org/first", "org/second"):
        lfs.ensure_repo(repo)
        before = hub.state.upload_requests()
        assert lfs.lfs_present(repo, [(sha, 100_000)]) == set()
        lfs.preupload(repo, shard, shard.name, sha)
        assert hub.state.upload_requests() == before + 1 and lfs.lfs_present(repo, [(sha, 100_000)]) == {sha}
    lfs.preupload("org/second", shard, shard.name, sha)  # its own object: not sent again
    assert hub.state.upload_requests() == before + 1
