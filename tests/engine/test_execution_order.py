"""Output shards in the order the model runs (for a streaming merge's gate): embeddings, decoder
layers by index, final norm, head; a layer is kept in one shard."""

from __future__ import annotations

from pathlib import Path

from slerp_plugin.engine.plan import TensorJob, _split_shards, execution_order
from slerp_plugin.io.safetensors import TensorInfo


def job(name: str, nbytes: int = 100, offset: int = 0) -> TensorJob:
    info = TensorInfo(name, "BF16", (nbytes // 2,), Path("m.safetensors"), offset, nbytes)
    return TensorJob(name, "merge", info, info, "BF16", 0.5)


def layer(i: int) -> list[str]:
    p = f"model.layers.{i}."
    return [p + n for n in ("mlp.down_proj.weight", "input_layernorm.weight", "self_attn.q_proj.weight")]


def names(units) -> list[str]:
    return [j.name for unit in units for j in unit]


def test_a_llama_checkpoint_runs_embeddings_layers_norm_head():
    stored = ["lm_head.weight", "model.embed_tokens.weight", *layer(0), *layer(1), "model.norm.weight"]
    units = execution_order([job(n) for n in stored])
    assert names(units) == ["model.embed_tokens.weight", *layer(0), *layer(1), "model.norm.weight",
                            "lm_head.weight"]
    assert [len(u) for u in units] == [1, 3, 3, 1, 1]  # a layer is one unit, in model_1's order


def test_a_tied_model_has_no_head_tensor_and_its_embedding_comes_first():
    stored = [*layer(0), "model.norm.weight", "model.embed_tokens.weight"]
    assert names(execution_order([job(n) for n in stored])) == [
        "model.embed_tokens.weight", *layer(0), "model.norm.weight"]


def test_layers_listed_out_of_order_are_taken_by_index():
    # safetensors sorts names: layers.10 and layers.11 come before layers.2 in the file
    stored = ["model.embed_tokens.weight", *layer(10), *layer(11), *layer(2), "model.norm.weight"]
    got = names(execution_order([job(n, offset=i * 100) for i, n in enumerate(stored)]))
    assert got == ["model.embed_tokens.weight", *layer(2), *layer(10), *layer(11), "model.norm.weight"]


def test_other_architectures_name_their_parts_differently():
    stored = ["transformer.ln_f.weight", "transformer.h.1.attn.c_attn.weight", "transformer.wte.weight",
              "transformer.h.0.attn.c_attn.weight", "embed_out.weight"]
    assert names(execution_order([job(n) for n in stored])) == [
        "transformer.wte.weight", "transformer.h.0.attn.c_attn.weight", "transformer.h.1.attn.c_attn.weight",
        "transformer.ln_f.weight", "embed_out.weight"]


def test_shards_cut_between_layers_not_inside_one():
    stored = ["model.embed_tokens.weight", *layer(0), *layer(1), *layer(2), "model.norm.weight",
              "lm_head.weight"]
    shards = _split_shards([job(n) for n in stored], 450, execution=True)
    assert all(sum(j.output.nbytes for j in shard.jobs) <= 450 for shard in shards)
    layer_shard = {}
    for shard in shards:
        for j in shard.jobs:
            if ".layers." in j.name:
                layer_shard.setdefault(j.name.split(".")[2], set()).add(shard.index)
    assert all(len(s) == 1 for s in layer_shard.values()), layer_shard
    order = [n for s in shards for n in sorted((j.name for j in s.jobs), key=stored.index)]
    assert order == stored


def test_a_layer_bigger_than_a_shard_is_split_by_tensor():
    shards = _split_shards([job(n, 300) for n in layer(0)], 500, execution=True)
    assert [len(s.jobs) for s in shards] == [1, 1, 1]


def test_local_merges_keep_model_1_s_order():
    stored = ["lm_head.weight", "model.embed_tokens.weight", *layer(0)]
    shards = _split_shards([job(n) for n in stored], 250)
    assert [j.name for s in shards for j in s.jobs][:2] == ["lm_head.weight", "model.embed_tokens.weight"]
