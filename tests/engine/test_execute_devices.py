"""The engine on each device it supports: ``cpu`` always, ``cuda`` where a CUDA device is present
(``bash bench/gpu_check.sh`` runs these on a lent GPU machine).

The pair is built with safetensors alone (no transformers), so these run wherever torch does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from model_helpers import CUDA, DEVICES, EXACT_D, float64_cosine, load_state
from safetensors.torch import save_file

from slerp_plugin.engine import buffers, compute_threads
from slerp_plugin.formats.manifest import Manifest
from slerp_plugin.io.direct import ALIGN
from slerp_plugin.kernel import slerp
from slerp_plugin.merge import run_merge
from slerp_plugin.spec import MergeSpec
from slerp_plugin.validate import ulp_distance

T = 0.3
CHUNK = 1024
IO_BLOCK = 4096  # bytes: 2048 bf16 elements, two kernel chunks


def _write(folder: Path, state: dict[str, torch.Tensor]) -> Path:
    """A model folder: the tensors in two input shards with an index, a config and a tokenizer file."""
    folder.mkdir(parents=True)
    names = list(state)
    half = len(names) // 2
    weight_map = {}
    for i, group in enumerate((names[:half], names[half:])):
        shard = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: state[n] for n in group}, folder / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, shard))
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    return folder


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    """bf16 pair covering every branch: multi-block matrices (SLERP), equal norms (LERP, d = 1), an
    anti-parallel matrix (LERP, d = -1) and a zero tensor (unnormalised)."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)

    a = {"model.embed_tokens.weight": randn(300, 64), "model.layers.0.q_proj.weight": randn(64, 64),
         "model.layers.0.norm.weight": torch.ones(64, dtype=torch.bfloat16),
         "model.layers.0.anti.weight": randn(32, 32),
         "model.layers.0.zero.weight": torch.zeros(16, 16, dtype=torch.bfloat16),
         "lm_head.weight": randn(300, 64)}
    b = {k: (v.float() + torch.randn(v.shape, generator=g) * 0.006).to(torch.bfloat16) for k, v in a.items()}
    b["model.layers.0.norm.weight"] = a["model.layers.0.norm.weight"].clone()
    b["model.layers.0.anti.weight"] = -a["model.layers.0.anti.weight"]
    root = tmp_path_factory.mktemp("device-pair")
    return _write(root / "model_a", a), _write(root / "model_b", b)


def _merge(pair: tuple[Path, Path], out: Path, device: str, buffer_memory: str | int) -> tuple[dict, int]:
    """Merge on ``device``; returns each tensor's branch and the bytes read."""
    result = run_merge(MergeSpec.build(model_1=str(pair[0]), model_2=str(pair[1]), output=str(out), t=T,
                                       device=device, chunk_elements=CHUNK, buffer_memory=buffer_memory))
    return {r.name: r.branch for r in result.manifest.tensors}, result.manifest.timings["bytes_read"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("buffer_memory", ["192MB", 1], ids=["held", "read-twice"])
def test_engine_on_a_device_matches_the_kernel_there(pair, tmp_path, monkeypatch, device, buffer_memory):
    """Bit for bit what :func:`slerp` gives on the same device, whether a tensor's blocks are kept
    between the two passes or read twice."""
    monkeypatch.setattr(buffers, "IO_BLOCK_BYTES", IO_BLOCK)
    out = tmp_path / "merged"
    branches, bytes_read = _merge(pair, out, device, buffer_memory)
    weights = sum(f.stat().st_size for p in pair for f in p.glob("*.safetensors"))
    assert (bytes_read > weights) if buffer_memory == 1 else (bytes_read < weights)
    assert branches == {"model.embed_tokens.weight": "slerp", "model.layers.0.q_proj.weight": "slerp",
                        "model.layers.0.norm.weight": "lerp", "model.layers.0.anti.weight": "lerp",
                        "model.layers.0.zero.weight": "unnormalised", "lm_head.weight": "slerp"}
    a, b, m = load_state(pair[0]), load_state(pair[1]), load_state(out)
    assert set(m) == set(a)
    dev = torch.device(device)
    for k in a:
        # clone(): fresh, aligned buffers like the engine's (BLAS dot rounding depends on alignment)
        with compute_threads(dev, None):
            want = slerp(T, a[k].clone().to(dev), b[k].clone().to(dev), chunk_elements=CHUNK)
        assert torch.equal(m[k], want.to(torch.bfloat16).cpu()), k
    for rec in Manifest.read(out).tensors:  # d is the float64 cosine on every device
        assert abs(rec.d - float64_cosine(a[rec.name], b[rec.name])) <= EXACT_D, rec.name


@CUDA
def test_cuda_and_cpu_merges_agree_within_one_ulp(pair, tmp_path, monkeypatch):
    """The devices' float64 sums add in different orders, so d may differ in its last bits and
    the scalars, rarely, in theirs: at most one bf16 ulp apart, and the same branch for every tensor."""
    monkeypatch.setattr(buffers, "IO_BLOCK_BYTES", IO_BLOCK)
    on_cpu = _merge(pair, tmp_path / "cpu", "cpu", "192MB")[0]
    on_cuda = _merge(pair, tmp_path / "cuda", "cuda", "192MB")[0]
    assert on_cpu == on_cuda
    c, g = load_state(tmp_path / "cpu"), load_state(tmp_path / "cuda")
    for k in c:
        assert int(ulp_distance(c[k], g[k]).max()) <= 1, k


@CUDA
def test_pinned_pool_hands_a_buffer_out_again_only_after_its_copy():
    pool = buffers.BufferPool(1, 1 << 20, pinned=True)
    buf = pool.take(1 << 20)
    assert buf.is_pinned() and buf.data_ptr() % ALIGN == 0
    on_gpu = torch.empty(1 << 20, dtype=torch.uint8, device="cuda")
    torch.cuda._sleep(200_000_000)  # the stream stays busy, so the copy below is still queued
    on_gpu.copy_(buf, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    pool.give(buf, copied)
    again = pool.take(1 << 20)
    assert again.data_ptr() == buf.data_ptr() and copied.query()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("buffer_memory", ["192MB", 1], ids=["held", "read-twice"])
def test_one_read_at_several_t_on_a_device_writes_what_each_t_alone_writes(pair, tmp_path, monkeypatch,
                                                                           device, buffer_memory):
    """``ShardMerge.at_each_t`` (the sweep's merge) on the device: each t's shards are the bytes a
    merge at that t alone writes there."""
    from slerp_plugin.engine.execute import MergeTarget, ShardMerge
    from slerp_plugin.engine.resume import WorkingFolder
    from slerp_plugin.io.reader import TensorReader
    from slerp_plugin.merge import plan_merge

    monkeypatch.setattr(buffers, "IO_BLOCK_BYTES", IO_BLOCK)
    ts = (0.2, 0.7)

    def spec(out: Path, t: float) -> MergeSpec:
        return MergeSpec.build(model_1=str(pair[0]), model_2=str(pair[1]), output=str(out), t=t,
                               device=device, chunk_elements=CHUNK, buffer_memory=buffer_memory,
                               direct_io=False)

    alone = {t: run_merge(spec(tmp_path / f"alone-{t}", t)).output for t in ts}
    plans = {t: plan_merge(spec(tmp_path / f"once-{t}", t)) for t in ts}
    folders = {t: WorkingFolder(plan) for t, plan in plans.items()}
    for folder in folders.values():
        folder.prepare(exclusive=True)
    first = plans[ts[0]]
    with TensorReader() as reader, compute_threads(first.device, None):
        for i in range(len(first.shards)):
            ShardMerge.at_each_t([MergeTarget(folders[t], plans[t].shards[i]) for t in ts], reader).run_each()
    for t in ts:
        for shard in plans[t].shards:
            written = folders[t].shard_path(shard).read_bytes()
            assert written == (alone[t] / shard.file).read_bytes(), (t, shard.file)
