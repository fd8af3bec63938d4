"""Safetensors headers, chunked reads and the streamed shard writer."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from slerp_plugin.errors import CheckpointError, OutputWriteError
from slerp_plugin.io.hashing import sha256_file
from slerp_plugin.io.reader import TensorReader
from slerp_plugin.io.safetensors import Checkpoint, OutputTensor, read_header
from slerp_plugin.io.writer import ShardWriter


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


def test_shard_writer_streams_a_valid_file(tmp_path):
    x = torch.randn(10, 3).to(torch.bfloat16)
    y = torch.arange(5, dtype=torch.int64)
    outs = [OutputTensor("x", "BF16", (10, 3)), OutputTensor("y", "I64", (5,))]
    path = tmp_path / "out.safetensors"
    with ShardWriter(path, outs) as w:
        flat = x.reshape(-1)
        w.write(memoryview(flat[:7].view(torch.uint8).numpy()))
        w.write(memoryview(flat[7:].view(torch.uint8).numpy()))
        w.write(memoryview(y.view(torch.uint8).numpy()))
    loaded = load_file(path)
    assert torch.equal(loaded["x"], x) and torch.equal(loaded["y"], y)
    assert w.sha256 == sha256_file(path) and w.size == path.stat().st_size
    assert (8 + struct.unpack("<Q", path.read_bytes()[:8])[0]) % 8 == 0


def test_shard_writer_leaves_nothing_on_error(tmp_path):
    path = tmp_path / "out.safetensors"
    with pytest.raises(RuntimeError):
        with ShardWriter(path, [OutputTensor("x", "F32", (4,))]) as w:
            w.write(b"\0" * 8)
            raise RuntimeError("boom")
    assert not path.exists() and not list(tmp_path.iterdir())
    with pytest.raises(OutputWriteError, match="plan says"):
        with ShardWriter(path, [OutputTensor("x", "F32", (4,))]) as w:
            w.write(b"\0" * 8)
    assert not list(tmp_path.iterdir())
