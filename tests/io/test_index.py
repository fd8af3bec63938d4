"""The index of a sharded checkpoint: read strictly, shard names that stay in the folder."""

from __future__ import annotations

import json

import pytest

from slerp_plugin.io.index import InvalidIndex, is_plain_file_name, read_weight_map, shard_names


def test_shard_names_in_order_of_first_appearance(tmp_path):
    index = tmp_path / "model.safetensors.index.json"
    weight_map = {"a": "2.safetensors", "b": "1.safetensors", "c": "2.safetensors"}
    index.write_text(json.dumps({"metadata": {"total_size": 3}, "weight_map": weight_map}))
    assert shard_names(index) == ["2.safetensors", "1.safetensors"]
    assert read_weight_map(index)["b"] == "1.safetensors"


@pytest.mark.parametrize("text,match", [
    ("not json", "unreadable index"),
    ("[1, 2]", "no weight_map"),
    ('{"weight_map": {"a": "sub/x.safetensors"}}', "outside the model folder"),
    ('{"weight_map": {"a": ".."}}', "outside the model folder"),
    ('{"weight_map": {"a": null}}', "not a file name"),
    ("[" * 50_000, "unreadable index"),
])
def test_invalid_indexes_are_refused(tmp_path, text, match):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(text)
    with pytest.raises(InvalidIndex, match=match):
        read_weight_map(index)


def test_plain_file_names():
    assert is_plain_file_name("model-00001-of-00002.safetensors")
    assert not any(is_plain_file_name(n) for n in ("", ".", "..", "a/b", "a\\b", "x\0", 3, None))
