"""Direct I/O: aligned reads and staged writes give the same bytes as buffered I/O, and a
filesystem that refuses O_DIRECT (at open or at a transfer) silently gets buffered I/O."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import random
import struct
import threading

import pytest
import torch
from model_helpers import load_state

from slerp_plugin.engine.resources import compute_threads, usable_cpus
from slerp_plugin.errors import CheckpointError, OutputWriteError
from slerp_plugin.io.direct import ALIGN, aligned_empty
from slerp_plugin.io.reader import TensorReader, aligned_capacity
from slerp_plugin.io.safetensors import OutputTensor, TensorInfo, read_header
from slerp_plugin.io.writer import ShardWriter
from slerp_plugin.merge import run_merge
from slerp_plugin.slerp import slerp
from slerp_plugin.spec import MergeSpec


def _is_direct(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


@pytest.fixture
def refuse_direct_transfers(monkeypatch):
    """Direct descriptors open, but every transfer on them fails with EINVAL (as on filesystems
    that check alignment differently); counts the refusals."""
    refused = {"n": 0}
    preadv, pwrite = os.preadv, os.pwrite

    def check(fd):
        if _is_direct(fd):
            refused["n"] += 1
            raise OSError(errno.EINVAL, "Invalid argument")

    def fake_preadv(fd, bufs, pos):
        check(fd)
        return preadv(fd, bufs, pos)

    def fake_pwrite(fd, data, pos):
        check(fd)
        return pwrite(fd, data, pos)

    monkeypatch.setattr(os, "preadv", fake_preadv)
    monkeypatch.setattr(os, "pwrite", fake_pwrite)
    return refused


@pytest.fixture
def refuse_direct_open(monkeypatch):
    """``open(..., O_DIRECT)`` fails with EINVAL, as on filesystems without direct I/O."""
    real_open = os.open

    def fake_open(path, flags, *args, **kwargs):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)


def test_aligned_empty_is_aligned():
    for n in (1, ALIGN - 1, ALIGN, 3 * ALIGN + 5):
        buf = aligned_empty(n)
        assert buf.numel() == n and buf.data_ptr() % ALIGN == 0


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


def _random_file(tmp_path, size=50_000):
    data = os.urandom(size)
    path = tmp_path / "blob"
    path.write_bytes(data)
    return path, data


@pytest.mark.parametrize(
    ("direct", "page_cache"), [(True, "bypass"), (True, "keep"), (True, "drop"), (False, "bypass")]
)
def test_read_aligned_returns_the_asked_bytes(tmp_path, direct, page_cache):
    path, data = _random_file(tmp_path)
    rng = random.Random(1)
    with TensorReader(direct=direct) as r:
        for _ in range(50):
            offset = rng.randrange(0, len(data) - 1)
            info = TensorInfo("x", "U8", (len(data) - offset,), path, offset, len(data) - offset)
            start = rng.randrange(0, len(data) - offset)
            n = rng.randrange(0, len(data) - offset - start + 1)
            buf = aligned_empty(aligned_capacity(n))
            skew = r.read_aligned(info, start, n, buf, page_cache)
            assert buf[skew : skew + n].numpy().tobytes() == data[offset + start : offset + start + n]
            # only a direct read starts at the block boundary; page-cache reads put the bytes at 0
            assert skew == ((offset + start) % ALIGN if direct and page_cache == "bypass" else 0)


def test_read_aligned_falls_back_when_refused(tmp_path, refuse_direct_transfers):
    path, data = _random_file(tmp_path)
    info = TensorInfo("x", "U8", (len(data) - 3,), path, 3, len(data) - 3)
    with TensorReader(direct=True) as r:
        for start in (0, 777):
            buf = aligned_empty(aligned_capacity(1000))
            skew = r.read_aligned(info, start, 1000, buf)
            assert skew == 0 and buf[:1000].numpy().tobytes() == data[3 + start : 1003 + start]
    assert refuse_direct_transfers["n"] == 1  # the file is read buffered after the first refusal


def test_direct_read_of_truncated_file_is_reported(tmp_path):
    path, data = _random_file(tmp_path, 3 * ALIGN)
    # claims more than the file holds
    info = TensorInfo("w", "U8", (4 * ALIGN - 100,), path, 100, 4 * ALIGN - 100)
    with TensorReader(direct=True) as r, pytest.raises(CheckpointError, match="truncated"):
        r.read_aligned(info, 0, 4 * ALIGN - 100, aligned_empty(aligned_capacity(4 * ALIGN)))


def _odd_offset_model(folder, tensors):
    """A safetensors file whose data starts at an odd byte (header not padded): legal, rare."""
    folder.mkdir()
    header, offset, blobs = {}, 0, []
    for name, t in tensors.items():
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    body = json.dumps(header).encode()
    if (8 + len(body)) % 2 == 0:
        body += b" "
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(body)) + body + b"".join(blobs))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 1}))
    (folder / "tokenizer.json").write_text("{}")


def test_engine_merges_tensors_at_odd_offsets(tmp_path):
    g = torch.Generator().manual_seed(0)
    a = {"w": torch.randn(300, 50, generator=g).to(torch.bfloat16),
         "v": torch.randn(77, generator=g).to(torch.bfloat16)}
    b = {k: (v.float() + 0.3 * torch.randn(v.shape, generator=g)).to(torch.bfloat16) for k, v in a.items()}
    _odd_offset_model(tmp_path / "a", a)
    _odd_offset_model(tmp_path / "b", b)
    infos, _ = read_header(tmp_path / "a" / "model.safetensors")
    assert any(i.offset % 2 for i in infos)
    run_merge(MergeSpec(model_1=str(tmp_path / "a"), model_2=str(tmp_path / "b"), t=0.4,
                        output=tmp_path / "out", device="cpu", chunk_elements=4096))
    merged = load_state(tmp_path / "out")
    with compute_threads(torch.device("cpu"), None):
        for k in a:
            want = slerp(0.4, a[k].clone(), b[k].clone(), chunk_elements=4096).to(torch.bfloat16)
            assert torch.equal(merged[k], want)


def _merge(pair, out, **options):
    run_merge(MergeSpec(model_1=str(pair[0]), model_2=str(pair[1]), t=0.3, device="cpu",
                        max_shard_size="150KB", output=out, **options))
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}


def test_direct_and_buffered_merges_are_identical(demo_bf16, tmp_path):
    direct = _merge(demo_bf16, tmp_path / "direct")
    assert len(direct) > 1
    assert direct == _merge(demo_bf16, tmp_path / "buffered", direct_io=False)


def test_merge_on_a_filesystem_without_direct_io(demo_bf16, tmp_path, refuse_direct_open):
    refused = _merge(demo_bf16, tmp_path / "refused")  # direct asked for, the filesystem refuses
    assert refused == _merge(demo_bf16, tmp_path / "buffered", direct_io=False)


def test_compute_threads_sets_and_restores():
    before = torch.get_num_threads()
    with compute_threads(torch.device("cpu"), 1) as n:
        assert n == 1 == torch.get_num_threads()
    assert torch.get_num_threads() == before
    with compute_threads(torch.device("cpu"), None) as n:
        assert n == max(1, usable_cpus() - 2)
    assert 1 <= usable_cpus() <= (os.cpu_count() or 1)
