"""Hub parents opened for streaming: headers by range reads, small files checked, nothing in the Hub cache."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest

from slerp_plugin.errors import CheckpointError, ConfigError, HubError, HubIntegrityError, RepoNotFoundError
from slerp_plugin.hub.client import upload_folder
from slerp_plugin.io.safetensors import Checkpoint
from slerp_plugin.spec import ModelRef
from slerp_plugin.stream.remote import open_parent


def test_the_checkpoint_matches_the_local_one_and_names_repo_files(hub, demo_bf16, tmp_path):
    commit = upload_folder(demo_bf16[0], "org/p").commit
    parent = open_parent(ModelRef(ref="org/p"), "model_1", tmp_path / "p")
    local = Checkpoint.open(demo_bf16[0])
    assert parent.commit == commit and parent.repo_id == "org/p"
    assert [f.name for f in parent.checkpoint.files] == [f.name for f in local.files]
    for name, info in local.tensors.items():
        remote = parent.checkpoint.tensors[name]
        assert (remote.file, remote.offset, remote.nbytes, remote.shape) == \
            (Path(info.file.name), info.offset, info.nbytes, info.shape)
    for f in local.files:  # the header bytes, kept for hashing the file in order
        head = parent.heads[f.name]
        assert head == f.read_bytes()[: len(head)] and len(head) == 8 + struct.unpack("<Q", head[:8])[0]
    for small in ("config.json", "tokenizer.json", "model.safetensors.index.json"):
        assert (tmp_path / "p" / small).read_bytes() == (demo_bf16[0] / small).read_bytes()
    assert parent.weight_bytes == sum(f.stat().st_size for f in local.files)
    assert not (tmp_path / "hf-cache").exists() or not any((tmp_path / "hf-cache").iterdir())


@pytest.mark.parametrize("probe", [16, 1 << 20])
def test_a_header_is_read_in_one_get_when_it_fits_the_first_read(hub, demo_bf16, tmp_path, monkeypatch,
                                                                  probe):
    monkeypatch.setattr("slerp_plugin.stream.remote.HEAD_PROBE_BYTES", probe)
    monkeypatch.setattr("slerp_plugin.stream.remote.HEAD_PROBE_SHARE", 1)
    upload_folder(demo_bf16[0], "org/probe")
    parent = open_parent(ModelRef(ref="org/probe"), "model_1", tmp_path / "p")
    local = Checkpoint.open(demo_bf16[0])
    assert {n: (i.offset, i.nbytes) for n, i in parent.checkpoint.tensors.items()} == \
        {n: (i.offset, i.nbytes) for n, i in local.tensors.items()}
    for f in local.files:
        gets = [p for m, p, _ in hub.state.requests
                if m == "GET" and p.endswith(f"/resolve/{parent.commit}/{f.name}")]
        assert len(gets) == (2 if probe == 16 else 1), f.name  # length, then the rest; or both at once
        assert parent.heads[f.name] == f.read_bytes()[: len(parent.heads[f.name])]


def test_a_corrupt_header_is_one_line(hub, demo_bf16, tmp_path):
    folder = Path(shutil.copytree(demo_bf16[0], tmp_path / "bad"))
    shard = sorted(folder.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[:8] = struct.pack("<Q", len(data) + 10)  # a header longer than the file
    shard.write_bytes(bytes(data))
    upload_folder(folder, "org/bad")
    pattern = rf"org/bad@[0-9a-f]{{12}}/{shard.name}: corrupt or truncated"
    with pytest.raises(CheckpointError, match=pattern) as e:
        open_parent(ModelRef(ref="org/bad"), "model_2", tmp_path / "x")
    assert "\n" not in str(e.value)


def test_small_files_are_checked_against_the_hub(hub, demo_bf16, tmp_path):
    commit = upload_folder(demo_bf16[0], "org/q").commit
    entry = hub.state.repos["org/q"].commits[commit].files["tokenizer.json"]
    blob = hub.state.blob_path(entry.sha256)
    blob.write_bytes(blob.read_bytes().replace(b"{", b"[", 1))  # same size, other bytes
    with pytest.raises(HubIntegrityError, match="tokenizer.json does not match the Hub's size/hash"):
        open_parent(ModelRef(ref="org/q"), "model_1", tmp_path / "q")


def test_what_cannot_be_streamed_is_refused_by_name(hub, demo_bf16, tmp_path):
    with pytest.raises(ConfigError, match="model_1: ./local is not a Hub id"):
        open_parent(ModelRef(ref="./local"), "model_1", tmp_path / "l")
    with pytest.raises(RepoNotFoundError, match="^model_2: org/none@main: repository not found"):
        open_parent(ModelRef(ref="org/none"), "model_2", tmp_path / "n")
    folder = tmp_path / "binonly"
    folder.mkdir()
    shutil.copy(demo_bf16[0] / "config.json", folder)
    (folder / "pytorch_model.bin").write_bytes(b"not a pickle")
    upload_folder(folder, "org/bin")
    with pytest.raises(HubError, match="^model_1: the repo holds only pickled .bin weights"):
        open_parent(ModelRef(ref="org/bin"), "model_1", tmp_path / "b")
