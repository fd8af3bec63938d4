"""The model card: YAML front matter that parses, parents, parameters, no network."""

from __future__ import annotations

import pytest

from slerp_plugin.formats.manifest import InputRecord, Manifest, ShardRecord, TensorRecord
from slerp_plugin.formats.modelcard import parse_front_matter, render_model_card


def manifest(t, engine="slerp_plugin") -> Manifest:
    inputs = {"model_1": InputRecord(ref="org/a", revision="v1", path="/a"),
              "model_2": InputRecord(ref="org/b: with colon", path="/b"),
              "tokenizer": InputRecord(ref="org/a", path="/a")}
    m = Manifest.create(spec={"t": t, "DOT_THRESHOLD": 0.9995, "epsilon": 1e-8}, inputs=inputs,
                        shards=[ShardRecord(file="m.safetensors", size=1, sha256="0" * 64, tensors=1)],
                        total_size=1, engine=engine,
                        tensors=[TensorRecord(name="x", shape=[1], dtype="BF16", shard="m", branch="lerp")],
                        warnings=["x: shapes differ"])
    return m


def test_front_matter_parses_and_names_both_parents():
    card = render_model_card(manifest(0.3))
    front = parse_front_matter(card)
    assert front["base_model"] == ["org/a", "org/b: with colon"]
    assert front["library_name"] == "transformers"
    assert "slerp" in front["tags"] and "mergekit" not in front["tags"]
    assert "| t | 0.3 |" in card and "| model_1 (t = 0) | org/a | v1 |" in card and "x: shapes differ" in card


def test_schedules_and_the_mergekit_engine_are_described():
    schedule = [{"filter": "mlp", "value": [0, 1]}, {"value": 0.5}]
    card = render_model_card(manifest(schedule, engine="mergekit"),
                             config_yaml="merge_method: slerp_for_causal_lm\n")
    assert "mlp: [0, 1]; other: 0.5" in card and "```yaml\nmerge_method: slerp_for_causal_lm" in card
    assert "mergekit" in parse_front_matter(card)["tags"]
    assert "gradient [0.1, 0.9]" in render_model_card(manifest([0.1, 0.9]))


def test_a_card_without_front_matter_is_refused():
    with pytest.raises(ValueError, match="no front matter"):
        parse_front_matter("# just a title\n")
