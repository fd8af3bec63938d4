"""Safetensors headers, chunked reads and the streamed shard writer."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from slerp_plugin.errors import CheckpointError
from slerp_plugin.io.reader import TensorReader
from slerp_plugin.io.safetensors import Checkpoint, read_header


@pytest.fixture
def st_file(tmp_path):
    tensors = {
        "a": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "b": torch.randn(5, 7).to(torch.bfloat16),
        "c": torch.tensor(3.0, dtype=torch.float64),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    return path, tensors


def test_header_and_chunked_reads_match_safetensors(st_file):
    path, tensors = st_file
    infos, meta = read_header(path)
    assert meta == {"format": "pt"}
    by_name = {i.name: i for i in infos}
    assert set(by_name) == set(tensors)
    with TensorReader() as r:
        for name, t in tensors.items():
            info = by_name[name]
            assert info.shape == tuple(t.shape)
            whole = r.read_tensor(info)
            assert torch.equal(whole.reshape(t.shape), t)
            flat = t.reshape(-1)
            if flat.numel() > 3:
                assert torch.equal(r.read_tensor(info, 2, 3), flat[2:5])


def test_truncated_file_is_reported(st_file):
    path, _ = st_file
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        read_header(path)


@pytest.mark.parametrize(
    "payload,match",
    [
        (b"\x01\x02", "truncated"),
        (struct.pack("<Q", 10**12) + b"{}", "corrupt or truncated"),
        (struct.pack("<Q", 5) + b"{nope", "corrupt safetensors header"),
        (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
    ],
)
def test_corrupt_headers_are_reported(tmp_path, payload, match):
    p = tmp_path / "model.safetensors"
    p.write_bytes(payload)
    with pytest.raises(CheckpointError, match=match):
        read_header(p)


def test_inconsistent_offsets_are_reported(tmp_path):
    header = json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    p = tmp_path / "model.safetensors"
    p.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(CheckpointError, match="do not fit"):
        read_header(p)


def test_sharded_checkpoint_with_missing_shard(demo_bf16, tmp_path):
    import shutil

    a, _ = demo_bf16
    copy = tmp_path / "a"
    shutil.copytree(a, copy)
    ck = Checkpoint.open(copy)
    assert len(ck.files) > 1
    ck.files[-1].unlink()
    with pytest.raises(CheckpointError, match="missing"):
        Checkpoint.open(copy)


def test_folder_without_safetensors(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="pickled PyTorch weights"):
        Checkpoint.open(tmp_path)
    with pytest.raises(CheckpointError, match="not a directory"):
        Checkpoint.open(tmp_path / "nope")


