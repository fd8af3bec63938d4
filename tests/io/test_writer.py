"""Shard writer: streamed, direct or buffered, the same bytes and SHA-256; a failure leaves no file."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import struct
import threading

import pytest
import torch
from safetensors.torch import load_file

from slerp_plugin.errors import OutputWriteError
from slerp_plugin.io.direct import ALIGN
from slerp_plugin.io.hashing import sha256_file
from slerp_plugin.io.reader import TensorReader
from slerp_plugin.io.safetensors import OutputTensor, read_header
from slerp_plugin.io.writer import ShardWriter


def _hash_threads():
    return [t for t in threading.enumerate() if t.name.startswith("slerp-shard-sha256")]


def _write(path, pieces, direct, stage=None, parallel_hash=None):
    tensors = [OutputTensor(f"t{i}", "U8", (len(p),)) for i, p in enumerate(pieces)]
    writer = ShardWriter(path, tensors, direct=direct)
    if stage:
        writer.STAGE_BYTES = stage
    if parallel_hash:
        writer.PARALLEL_HASH_BYTES = parallel_hash
    with writer as w:
        for p in pieces:
            w.write(memoryview(p))
    return w


@pytest.mark.parametrize("parallel_hash", [None, ALIGN])
@pytest.mark.parametrize("stage", [None, ALIGN, 3 * ALIGN])
def test_direct_writer_matches_buffered(tmp_path, stage, parallel_hash):
    """``parallel_hash``: pieces from this size on are hashed on the writer's thread while written."""
    rng = random.Random(stage)
    # sizes around block and stage boundaries, a large piece spanning several stages, a tail
    sizes = [0, 1, ALIGN - 1, ALIGN, ALIGN + 1, 5 * ALIGN + 7, rng.randrange(1, 40_000), 123]
    pieces = [rng.randbytes(n) for n in sizes]
    direct = _write(tmp_path / "direct.safetensors", pieces, True, stage, parallel_hash)
    buffered = _write(tmp_path / "buffered.safetensors", pieces, False, parallel_hash=parallel_hash)
    data = (tmp_path / "direct.safetensors").read_bytes()
    assert data == (tmp_path / "buffered.safetensors").read_bytes()
    assert len(data) == direct.size
    assert direct.sha256 == buffered.sha256 == hashlib.sha256(data).hexdigest()
    infos, _ = read_header(tmp_path / "direct.safetensors")
    with TensorReader() as r:
        for info, piece in zip(infos, pieces, strict=True):
            assert r.read_tensor(info).numpy().tobytes() == piece
    assert not (tmp_path / "direct.safetensors.tmp").exists()


def test_writer_falls_back_when_transfers_are_refused(tmp_path, refuse_direct_transfers):
    pieces = [os.urandom(n) for n in (10_000, 3, 2 * ALIGN)]
    w = _write(tmp_path / "x.safetensors", pieces, True, stage=ALIGN, parallel_hash=ALIGN)
    assert refuse_direct_transfers["n"] == 1  # refused once, then buffered for the rest
    data = (tmp_path / "x.safetensors").read_bytes()
    assert hashlib.sha256(data).hexdigest() == w.sha256 and len(data) == w.size
    assert data.endswith(pieces[-1])


def test_writer_falls_back_when_open_is_refused(tmp_path, refuse_direct_open):
    pieces = [os.urandom(n) for n in (5000, 1)]
    w = _write(tmp_path / "x.safetensors", pieces, True)
    assert hashlib.sha256((tmp_path / "x.safetensors").read_bytes()).hexdigest() == w.sha256


@pytest.mark.parametrize("parallel_hash", [None, ALIGN])
def test_direct_writer_error_leaves_nothing(tmp_path, monkeypatch, parallel_hash):
    real = os.pwrite

    def full(fd, data, pos):
        if pos >= ALIGN:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, pos)

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(OutputWriteError, match="No space left"):
        _write(tmp_path / "x.safetensors", [os.urandom(3 * ALIGN)], True, stage=ALIGN,
               parallel_hash=parallel_hash)
    assert list(tmp_path.iterdir()) == []
    assert not _hash_threads()


def test_writer_failing_on_its_header_leaves_nothing(tmp_path, monkeypatch):
    def full(fd, data, pos):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(OutputWriteError, match="No space left"):
        _write(tmp_path / "x.safetensors", [os.urandom(10)], False)
    assert list(tmp_path.iterdir()) == []
    assert not _hash_threads()


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


def test_a_scratch_shard_is_written_over_its_spare_never_hashed_or_fsynced(tmp_path, monkeypatch):
    synced, advised = [], []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd))
    monkeypatch.setattr(os, "posix_fadvise", lambda *a: advised.append(a))
    monkeypatch.setattr("slerp_plugin.io.writer.WRITEBACK_BYTES", 1024)
    spare = tmp_path / "spare"
    rng = random.Random(5)
    big, small = [rng.randbytes(50_000), rng.randbytes(7)], [rng.randbytes(3000)]
    for n, (pieces, was_spare) in enumerate([(big, False), (small, True), (big, True)]):
        path = tmp_path / f"s{n}.safetensors"
        spare_inode = spare.stat().st_ino if spare.exists() else None
        assert spare.exists() is was_spare
        tensors = [OutputTensor(f"t{i}", "U8", (len(p),)) for i, p in enumerate(pieces)]
        with ShardWriter(path, tensors, direct=True, scratch=spare) as w:
            for p in pieces:
                w.write(memoryview(p))
        # the spare's own file (its pages), cut to this shard's size: a longer tail is gone
        assert (path.stat().st_ino == spare_inode) is was_spare and not spare.exists()
        assert path.stat().st_size == w.size
        assert w.sha256 == ""  # not hashed: nothing checks a scratch shard
        assert [t.numpy().tobytes() for t in load_file(path).values()] == pieces  # a valid file
        path.replace(spare)
    assert synced == [] and advised == []
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path / "x.safetensors", [OutputTensor("x", "U8", (4,))], scratch=spare) as w:
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []  # neither the shard nor the spare it was written over
