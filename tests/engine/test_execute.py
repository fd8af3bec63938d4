"""The streaming engine on tiny model pairs: equality with the kernel, files, manifest, errors."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from model_helpers import (
    BRANCH_MARGIN,
    EXACT_D,
    assert_matches_kernel,
    float64_cosine,
    fusionbench_d,
    load_state,
    read_json,
    spec_for,
)

from slerp_plugin.engine import buffers, compute_threads, execute, merge_shards
from slerp_plugin.errors import (
    CheckpointError,
)
from slerp_plugin.io.safetensors import read_header
from slerp_plugin.kernel import DEFAULT_CHUNK_ELEMENTS, slerp
from slerp_plugin.merge import plan_merge, run_merge
from slerp_plugin.spec import MergeSpec


@pytest.mark.parametrize(
    ("chunk", "io_block", "buffer_memory", "read_twice"),
    [
        (DEFAULT_CHUNK_ELEMENTS, buffers.IO_BLOCK_BYTES, "192MB", False),  # defaults
        (1024, 2 * 2048, "192MB", False),  # multi-block tensors held in memory between the passes
        (1024, 2 * 2048, 6 * 2 * 8192, True),  # tensors of ≤ 2 blocks held, larger ones read twice
        (1024, 2 * 2048, 1, True),  # the smallest pool: every multi-block tensor read twice
        (1024, 1024, "192MB", False),  # blocks smaller than a chunk: one chunk per block
    ],
)
def test_bf16_sharded_pair_matches_kernel_and_loads(
    demo_bf16, tmp_path, monkeypatch, chunk, io_block, buffer_memory, read_twice
):
    monkeypatch.setattr(buffers, "IO_BLOCK_BYTES", io_block)
    out = tmp_path / "merged"
    result = run_merge(spec_for(demo_bf16, out, chunk_elements=chunk, max_shard_size="150KB",
                                buffer_memory=buffer_memory))
    assert result.output == out.resolve()
    assert_matches_kernel(demo_bf16, out, 0.3, chunk)
    weights = sum(f.stat().st_size for p in demo_bf16 for f in p.glob("*.safetensors"))
    bytes_read = result.manifest.timings["bytes_read"]
    assert (bytes_read > weights) if read_twice else (weights - 2 * 100_000 < bytes_read < weights)
    index = read_json(out / "model.safetensors.index.json")
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert not (out.parent / "merged.partial").exists()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("The quick brown fox", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits.float()).all()


@pytest.mark.parametrize("cache_budget", [0, 1 << 40])
def test_tensors_read_twice_go_through_the_page_cache_when_it_has_room(
    demo_bf16, tmp_path, monkeypatch, cache_budget
):
    """Tensors too big to hold between the passes: kept in the page cache after pass 1 (read once
    from the disk) when the memory the kernel reports leaves room, else read from the disk twice."""
    from slerp_plugin.io.reader import TensorReader

    modes = []
    read_aligned = TensorReader.read_aligned

    def spy(self, info, start, nbytes, buf, page_cache="bypass"):
        modes.append(page_cache)
        return read_aligned(self, info, start, nbytes, buf, page_cache)

    monkeypatch.setattr(TensorReader, "read_aligned", spy)
    monkeypatch.setattr(execute, "page_cache_budget", lambda: cache_budget)
    monkeypatch.setattr(buffers, "IO_BLOCK_BYTES", 2 * 2048)
    out = tmp_path / "merged"
    run_merge(spec_for(demo_bf16, out, chunk_elements=1024, max_shard_size="150KB", buffer_memory=1))
    assert_matches_kernel(demo_bf16, out, 0.3, 1024)
    if cache_budget:
        assert modes.count("keep") == modes.count("drop") > 0
    else:
        assert set(modes) == {"bypass"}


def test_fp32_tied_single_file_pair(demo_fp32_tied, tmp_path):
    out = tmp_path / "merged"
    run_merge(spec_for(demo_fp32_tied, out, t=0.5))
    state = load_state(out)
    assert "lm_head.weight" not in state  # tied: stored once, as in the parents
    assert_matches_kernel(demo_fp32_tied, out, 0.5, DEFAULT_CHUNK_ELEMENTS)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.float32
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_t0_reproduces_model_1(demo_bf16, tmp_path):
    run_merge(spec_for(demo_bf16, tmp_path / "m", t=0.0))
    a, m = load_state(demo_bf16[0]), load_state(tmp_path / "m")
    assert all(torch.equal(a[k], m[k]) for k in a)


def test_corrupt_input_shard_fails_before_writing(demo_bf16, tmp_path):
    import shutil

    b_dir = tmp_path / "b"
    shutil.copytree(demo_bf16[1], b_dir)
    shard = sorted(b_dir.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    out = tmp_path / "m"
    with pytest.raises(CheckpointError, match="truncated"):
        run_merge(spec_for((demo_bf16[0], b_dir), out))
    assert not out.exists()


@pytest.mark.parametrize("failing", ["write", "hash"])
def test_a_failing_write_or_hash_fails_the_merge_with_its_own_error_instead_of_hanging(
        demo_bf16, tmp_path, monkeypatch, failing):
    """The failure comes slowly, while the merge fills every output (or input) buffer: buffers the
    failed thread would have given back are never needed again, and the merge stops with that error."""
    import threading
    import time

    from slerp_plugin.errors import OutputWriteError
    from slerp_plugin.io import writer

    def fail_slowly(*args, **kwargs):
        time.sleep(0.5)
        raise OutputWriteError(f"/out/x.tmp: {failing} failed: No space left on device")

    if failing == "write":
        monkeypatch.setattr(writer.ShardWriter, "write", fail_slowly)
    else:
        monkeypatch.setattr(execute.ShardMerge, "_hash_input", staticmethod(fail_slowly))
    import shutil

    monkeypatch.setattr(buffers, "IO_BLOCK_BYTES", 2048)  # many blocks: every buffer is soon in use
    pair = [shutil.copytree(p, tmp_path / p.name) for p in demo_bf16]  # never hashed yet: not in the cache
    out = tmp_path / "m"
    raised: list[BaseException] = []

    def merge() -> None:
        try:
            run_merge(spec_for(pair, out, chunk_elements=1024))
        except BaseException as e:  # noqa: BLE001 - handed to the test
            raised.append(e)

    worker = threading.Thread(target=merge, daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "the merge hangs after a failed " + failing
    assert len(raised) == 1 and isinstance(raised[0], OutputWriteError), raised
    assert f"{failing} failed: No space left on device" in str(raised[0])
    assert not out.exists()


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


def test_each_shard_frees_its_buffers_even_without_the_cyclic_gc(demo_bf16, tmp_path, monkeypatch):
    """The command pauses the cyclic garbage collector: a shard's buffer pools must be freed by
    reference counting alone, or every shard of a large model would keep its pools."""
    import gc
    import weakref

    pools = []
    init = buffers.BufferPool.__init__

    def track(self, *args, **kwargs):
        init(self, *args, **kwargs)
        pools.append(weakref.ref(self))

    monkeypatch.setattr(buffers.BufferPool, "__init__", track)
    plan = plan_merge(spec_for(demo_bf16, tmp_path / "m", max_shard_size="100KB"))
    enabled = gc.isenabled()
    gc.disable()
    try:
        merge_shards(plan)
        assert len(plan.shards) > 2 and len(pools) == 2 * len(plan.shards)
        assert [p for p in pools if p() is not None] == []
    finally:
        if enabled:
            gc.enable()


@pytest.fixture(scope="module")
def near_parallel_models(demo_bf16, tmp_path_factory):
    """The demo pair plus one 3M-element tensor whose float64 cosine is ≈ 1 − 5e-6, where float32
    reductions (FusionBench's) are off by 1e-6–1e-4 depending on the host; and that cosine."""
    from model_helpers import near_parallel_pair, write_model

    root = tmp_path_factory.mktemp("near_parallel")
    a, b = near_parallel_pair()
    pair = tuple(write_model(root / name, {**load_state(src), "model.big.weight": big}, src)
                 for name, src, big in (("a", demo_bf16[0], a), ("b", demo_bf16[1], b)))
    return pair, float64_cosine(a, b)


def test_norm_precision_float32_reproduces_fusionbench_branch_choices(near_parallel_models, tmp_path):
    from slerp_plugin.formats.manifest import Manifest
    from slerp_plugin.kernel import slerp_reference

    pair, d = near_parallel_models
    tau = d - BRANCH_MARGIN  # the exact d is above it; this host's float32 d may lie on either side
    fb = run_merge(spec_for(pair, tmp_path / "fb", DOT_THRESHOLD=tau, norm_precision="float32")).output
    exact = run_merge(spec_for(pair, tmp_path / "exact", DOT_THRESHOLD=tau)).output
    records = {m: {t.name: t for t in Manifest.read(m).tensors} for m in (fb, exact)}
    big = load_state(pair[0])["model.big.weight"], load_state(pair[1])["model.big.weight"]
    assert records[fb]["model.big.weight"].d == float(fusionbench_d(*big))
    assert records[exact]["model.big.weight"].branch == "lerp"
    assert abs(records[exact]["model.big.weight"].d - d) <= EXACT_D
    assert {t.norm_precision for t in records[fb].values()} == {"float32"}
    assert {t.norm_precision for t in records[exact].values()} == {"float64"}
    a, b, got = load_state(pair[0]), load_state(pair[1]), load_state(fb)
    with compute_threads(torch.device("cpu"), None):
        for name in a:  # FusionBench's op order, run here, bit for bit: its branches and its values
            want = slerp_reference(0.3, a[name], b[name], tau).to(torch.bfloat16)
            assert torch.equal(got[name], want), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("read_twice", [False, True])
def test_every_recorded_d_is_the_float64_cosine(near_parallel_models, tmp_path, monkeypatch, dtype,
                                                read_twice):
    """Held in memory or read twice, in blocks and chunks of any size: the manifest's d of every
    tensor is the float64 cosine of the parents' tensors, so the branch is the same on any host."""
    from model_helpers import write_model

    from slerp_plugin.formats.manifest import Manifest

    pair = near_parallel_models[0]
    if dtype != torch.bfloat16:
        pair = tuple(write_model(tmp_path / p.name, {k: v.to(dtype) for k, v in load_state(p).items()}, p)
                     for p in pair)
    if read_twice:
        monkeypatch.setattr(buffers, "IO_BLOCK_BYTES", 1 << 20)
    spec = spec_for(pair, tmp_path / "m", chunk_elements=(1 << 19) if not read_twice else 12_289,
                    buffer_memory=1 if read_twice else "192MB")
    manifest = Manifest.read(run_merge(spec).output)
    a, b = load_state(pair[0]), load_state(pair[1])
    assert len(manifest.tensors) == len(a)
    for rec in manifest.tensors:
        assert abs(rec.d - float64_cosine(a[rec.name], b[rec.name])) <= EXACT_D, rec.name


def test_norm_precision_float32_on_a_tensor_too_large_to_hold_is_a_warning(near_parallel_models, tmp_path,
                                                                          monkeypatch):
    from slerp_plugin.formats.manifest import Manifest

    monkeypatch.setattr(buffers, "IO_BLOCK_BYTES", 1 << 20)  # the 6 MB tensor takes 6 blocks
    pair, d = near_parallel_models
    spec = spec_for(pair, tmp_path / "m", DOT_THRESHOLD=d - BRANCH_MARGIN, norm_precision="float32",
                    buffer_memory=1)
    man = Manifest.read(run_merge(spec).output)
    big = next(t for t in man.tensors if t.name == "model.big.weight")
    assert big.norm_precision == "float64" and big.branch == "lerp"
    warning = "norm_precision=float32: 1 tensor(s) larger than buffer_memory"
    assert any(warning in w and "model.big.weight" in w
               for w in man.warnings)


@pytest.mark.parametrize("norm_precision", ["float64", "float32"])
@pytest.mark.parametrize("read_twice", [False, True])
def test_one_read_at_several_t_writes_what_a_merge_at_each_t_writes(near_parallel_models, tmp_path,
                                                                     monkeypatch, norm_precision, read_twice):
    """``ShardMerge.at_each_t``: each input block read once, and every t's shard the bytes (and
    records) a merge at that t alone writes, through SLERP and LERP, held tensors and ones read
    twice, float64 and FusionBench's float32 norms."""
    from dataclasses import replace

    from slerp_plugin.engine import ShardPlan, plan_resolved
    from slerp_plugin.engine.resume import WorkingFolder
    from slerp_plugin.formats.manifest import Manifest
    from slerp_plugin.io.reader import TensorReader

    pair, d = near_parallel_models
    if read_twice:
        monkeypatch.setattr(buffers, "IO_BLOCK_BYTES", 1 << 20)
    options = dict(chunk_elements=12_289 if read_twice else 1 << 19,
                   buffer_memory=1 if read_twice else "192MB", DOT_THRESHOLD=d - BRANCH_MARGIN,
                   norm_precision=norm_precision, max_shard_size="150KB",
                   direct_io=False)
    ts = (0.1, 0.5, 0.85)
    alone = {t: run_merge(spec_for(pair, tmp_path / f"alone-{t}", t=t, **options)).output for t in ts}
    plans = {t: plan_resolved(spec_for(pair, tmp_path / f"once-{t}", t=t, **options)) for t in ts}
    folders = {t: WorkingFolder(plan) for t, plan in plans.items()}
    for folder in folders.values():
        folder.prepare(exclusive=True)
    base = plans[ts[0]]
    assert len(base.shards) > 1
    reads = []
    read_aligned = TensorReader.read_aligned
    monkeypatch.setattr(TensorReader, "read_aligned",
                        lambda self, info, start, nbytes, *a: reads.append(nbytes) or read_aligned(
                            self, info, start, nbytes, *a))
    records = {t: [] for t in ts}
    with TensorReader() as reader, compute_threads(base.device, base.spec.threads):  # as merge_shards
        for i in range(len(base.shards)):
            targets = [execute.MergeTarget(folders[t], plans[t].shards[i]) for t in ts]
            for t, outcome in zip(ts, execute.ShardMerge.at_each_t(targets, reader).run_each(), strict=True):
                records[t] += outcome.tensors
    once = sum(j.a.nbytes + j.b.nbytes for s in base.shards for j in s.jobs)
    assert (sum(reads) > once) if read_twice else (sum(reads) == once)  # as a merge at one t reads
    for t in ts:
        manifest = {r.name: r for r in Manifest.read(alone[t]).tensors}
        assert {r.name: (r.branch, r.d, r.t) for r in records[t]} == \
            {n: (r.branch, r.d, r.t) for n, r in manifest.items()}
        assert {r.branch for r in records[t]} == {"slerp", "lerp"}
        for shard in plans[t].shards:  # bit for bit
            written = folders[t].shard_path(shard).read_bytes()
            assert written == (alone[t] / shard.file).read_bytes(), (t, shard.file)

    other = plans[ts[1]].shards[0]
    wrong = ShardPlan(other.index, other.file, [replace(other.jobs[0], out_dtype="F32"), *other.jobs[1:]])
    with pytest.raises(ValueError, match="differ in t alone"):
        execute.ShardMerge.at_each_t([execute.MergeTarget(folders[ts[0]], base.shards[0]),
                                      execute.MergeTarget(folders[ts[1]], wrong)], TensorReader())
    other_spec = plan_resolved(spec_for(pair, tmp_path / "other", t=ts[1], **{**options, "epsilon": 1e-6}))
    with pytest.raises(ValueError, match="differ in t alone"):
        execute.ShardMerge.at_each_t([execute.MergeTarget(folders[ts[0]], base.shards[0]),
                                      execute.MergeTarget(WorkingFolder(other_spec), other_spec.shards[0])],
                                     TensorReader())
