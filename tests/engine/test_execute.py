"""The streaming engine on tiny model pairs: equality with the kernel, files, manifest, errors."""

from __future__ import annotations

import json

import pytest
import torch
from model_helpers import folder_bytes, load_state, read_json, write_model

from slerp_plugin.engine import buffers, compute_threads, execute, finalize, merge_shards, plan_merge
from slerp_plugin.errors import (
    CheckpointError,
    KeyMismatchError,
    OutputExistsError,
    OutputWriteError,
)
from slerp_plugin.formats.manifest import MANIFEST_NAME, Manifest
from slerp_plugin.formats.modelcard import parse_front_matter
from slerp_plugin.io.hashing import sha256_file
from slerp_plugin.io.safetensors import OutputTensor
from slerp_plugin.io.writer import ShardWriter
from slerp_plugin.merge import run_merge
from slerp_plugin.slerp import DEFAULT_CHUNK_ELEMENTS, slerp, slerp_reference
from slerp_plugin.spec import MergeSpec


def spec_for(pair, out, **kw) -> MergeSpec:
    a, b = pair
    return MergeSpec.build(model_1=str(a), model_2=str(b), output=str(out), **{"t": 0.3, **kw})


def assert_matches_kernel(pair, out, t, chunk, out_dtype=None):
    a, b, m = load_state(pair[0]), load_state(pair[1]), load_state(out)
    assert set(m) == set(b) == set(a)
    for k in b:
        # clone(): the engine reads into fresh (aligned) buffers, and BLAS dot rounding depends
        # on alignment (the loaded tensors are mapped at arbitrary offsets) and on the thread count
        with compute_threads(torch.device("cpu"), None):
            want = slerp(t, a[k].clone(), b[k].clone(), chunk_elements=chunk).to(out_dtype or a[k].dtype)
        assert m[k].dtype == want.dtype and m[k].shape == a[k].shape
        assert torch.equal(m[k], want), k
        ref = slerp_reference(t, a[k], b[k]).to(want.dtype)
        if want.dtype == torch.bfloat16:
            from slerp_plugin.validate import ulp_distance

            assert int(ulp_distance(m[k], ref).max()) <= 1, k


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


def test_dtype_override_and_config(demo_bf16, tmp_path):
    out = tmp_path / "m"
    run_merge(spec_for(demo_bf16, out, dtype="float32"))
    state = load_state(out)
    assert {t.dtype for t in state.values()} == {torch.float32}
    assert read_json(out / "config.json")["dtype"] == "float32"
    assert_matches_kernel(demo_bf16, out, 0.3, DEFAULT_CHUNK_ELEMENTS, out_dtype=torch.float32)


def test_manifest_and_model_card(demo_bf16, tmp_path):
    out = tmp_path / "m"
    run_merge(spec_for(demo_bf16, out))
    man = Manifest.read(out)
    assert man.spec["t"] == 0.3 and man.spec["DOT_THRESHOLD"] == 0.9995
    for role in ("model_1", "model_2"):
        files = {f.name: f for f in man.inputs[role].files}
        assert "config.json" in files and "model.safetensors.index.json" in files
        for name, f in files.items():
            assert f.sha256 == sha256_file(demo_bf16[0 if role == "model_1" else 1] / name)
    assert {f.name for f in man.inputs["tokenizer"].files} >= {"tokenizer.json"}
    for shard in man.output.shards:
        assert sha256_file(out / shard.file) == shard.sha256
    assert sum(man.branch_counts.values()) == len(man.tensors) == len(load_state(out))
    assert man.branch_counts["lerp"] >= 1  # identical norm weights
    assert man.branch_counts["slerp"] >= 1
    norm = next(t for t in man.tensors if t.name.endswith("input_layernorm.weight"))
    assert norm.branch == "lerp" and norm.d == pytest.approx(1.0)
    assert {"torch", "safetensors", "slerp_plugin", "python"} <= set(man.versions)
    assert man.timings["merge_s"] >= 0 and man.timings["bytes_written"] > 0
    card = (out / "README.md").read_text()
    front = parse_front_matter(card)
    assert front["base_model"] == [str(demo_bf16[0]), str(demo_bf16[1])]
    assert {"merge", "slerp"} <= set(front["tags"]) and front["library_name"] == "transformers"
    assert "| t | 0.3 |" in card and "DOT_THRESHOLD" in card
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file()
    assert not (out / ".slerp_state").exists()


def test_shape_mismatch_keeps_model_1_tensor(demo_bf16, tmp_path):
    a_state, b_state = load_state(demo_bf16[0]), load_state(demo_bf16[1])
    key = "model.layers.0.mlp.up_proj.weight"
    b_state[key] = b_state[key][:-1].clone()
    b_dir = write_model(tmp_path / "b", b_state, demo_bf16[1])
    out = tmp_path / "m"
    run_merge(spec_for((demo_bf16[0], b_dir), out))
    m = load_state(out)
    assert torch.equal(m[key], a_state[key])
    man = Manifest.read(out)
    rec = next(t for t in man.tensors if t.name == key)
    assert rec.branch == "shape-kept" and man.branch_counts["shape-kept"] == 1
    assert any(key in w for w in man.warnings)


def test_key_mismatch_names_the_keys(demo_bf16, tmp_path):
    b_state = load_state(demo_bf16[1])
    b_state.pop("model.norm.weight")
    b_state["extra.weight"] = torch.zeros(2)
    b_dir = write_model(tmp_path / "b", b_state, demo_bf16[1])
    out = tmp_path / "m"
    with pytest.raises(KeyMismatchError) as e:
        run_merge(spec_for((demo_bf16[0], b_dir), out))
    msg = str(e.value)
    assert "extra.weight" in msg and "model.norm.weight" in msg and "\n" not in msg
    assert not out.exists() and not (tmp_path / "m.partial").exists()


def test_existing_output_is_kept_unless_overwrite(demo_bf16, tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "precious.txt").write_text("user data")
    with pytest.raises(OutputExistsError, match="already exists"):
        run_merge(spec_for(demo_bf16, out))
    assert (out / "precious.txt").read_text() == "user data"
    run_merge(spec_for(demo_bf16, out, overwrite=True))
    assert not (out / "precious.txt").exists() and (out / MANIFEST_NAME).is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_output_inside_an_input_is_refused(demo_bf16):
    with pytest.raises(OutputExistsError, match="overlaps"):
        plan_merge(spec_for(demo_bf16, demo_bf16[0] / "merged"))


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


def test_workers_merge_disjoint_shards_then_finalize(demo_bf16, tmp_path):
    out = tmp_path / "m"
    spec = spec_for(demo_bf16, out, max_shard_size="100KB")
    plan = plan_merge(spec)
    n = len(plan.shards)
    assert n >= 3
    merge_shards(plan, list(range(0, n, 2)))
    with pytest.raises(OutputWriteError, match="not merged yet"):
        finalize(plan)
    assert not out.exists()
    merge_shards(plan_merge(spec), list(range(1, n, 2)))  # a second "worker" with its own plan
    finalize(plan)
    ref = tmp_path / "ref"
    run_merge(spec_for(demo_bf16, ref, max_shard_size="100KB"))
    got, want = folder_bytes(out), folder_bytes(ref)
    assert {k: v for k, v in got.items() if k != MANIFEST_NAME} == {
        k: v for k, v in want.items() if k != MANIFEST_NAME
    }


def test_index_lists_every_tensor_once(demo_bf16, tmp_path):
    out = tmp_path / "m"
    run_merge(spec_for(demo_bf16, out, max_shard_size="100KB"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    state = load_state(out)
    assert set(index["weight_map"]) == set(state)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())


def test_a_shard_takes_its_input_files_side_by_side(demo_bf16, tmp_path):
    plan = plan_merge(spec_for(demo_bf16, tmp_path / "m", max_shard_size="10GB"))
    (shard,) = plan.shards
    files = [j.a.file for j in shard.jobs]
    assert len(set(files)) > 2
    for f in set(files):  # every input file front to back, so its SHA-256 streams
        offsets = [j.a.offset for j in shard.jobs if j.a.file == f]
        assert offsets == sorted(offsets)
    # all files side by side, not one after the other: every file has begun before any is done
    done = min(max(i for i, g in enumerate(files) if g == f) for f in set(files))
    assert set(files[:done]) == set(files)
    # a big tensor at the front of a file (the embeddings, which the start-up read-ahead caches)
    # is not taken first: the disk reads the other files' tensors that end before it meanwhile
    names = [j.name for j in shard.jobs]
    embed = names.index("model.embed_tokens.weight")
    assert embed > 0 and set(files[:embed]) == set(files) - {shard.jobs[embed].a.file}
    # each output shard of a split merge keeps to the tensors the plain order gives it
    split = plan_merge(spec_for(demo_bf16, tmp_path / "n", max_shard_size="100KB")).shards
    order = list(plan.checkpoints["model_1"].tensors)
    names = [[j.name for j in s.jobs] for s in split]
    assert sorted(n for s in names for n in s) == sorted(order)
    assert [sorted(s, key=order.index) for s in names] == [
        order[sum(map(len, names[:i])) : sum(map(len, names[: i + 1]))] for i in range(len(names))
    ]


def test_model_2_sharded_otherwise_keeps_its_files_front_to_back(demo_bf16, tmp_path):
    a_order = list(plan_merge(spec_for(demo_bf16, tmp_path / "x")).checkpoints["model_1"].tensors)
    b_state = load_state(demo_bf16[1])
    b_dir = write_model(tmp_path / "b", {}, demo_bf16[1])
    (b_dir / "model.safetensors").unlink()
    # one file whose data lies in model_1's order (the writer keeps the order it is given)
    outputs = [OutputTensor(n, "BF16", tuple(b_state[n].shape)) for n in a_order]
    with ShardWriter(b_dir / "model.safetensors", outputs) as w:
        for n in a_order:
            w.write(b_state[n].contiguous().view(torch.uint8).numpy())
    spec = spec_for((demo_bf16[0], b_dir), tmp_path / "m", max_shard_size="10GB")
    (shard,) = plan_merge(spec).shards
    for side in ("a", "b"):
        offsets = {}
        for j in shard.jobs:
            info = getattr(j, side)
            offsets.setdefault(info.file, []).append(info.offset)
        assert all(o == sorted(o) for o in offsets.values()), side
    # model_2 is hashed from the bytes the merge reads, with the right result
    result = run_merge(spec)
    man = Manifest.model_validate_json((result.output / MANIFEST_NAME).read_text())
    files = {f.name: f.sha256 for f in man.inputs["model_2"].files}
    assert files["model.safetensors"] == sha256_file(b_dir / "model.safetensors")
    assert_matches_kernel((demo_bf16[0], b_dir), result.output, 0.3, DEFAULT_CHUNK_ELEMENTS)
