"""Model folders: the files a merge reads and copies; references that are not local folders."""

from __future__ import annotations

import pytest

from slerp_plugin.errors import ModelNotFoundError
from slerp_plugin.io.model_files import local_model, model_files, tokenizer_files
from slerp_plugin.spec import ModelRef


def test_files_of_a_sharded_demo_model(demo_bf16):
    a = demo_bf16[0]
    names = [p.name for p in model_files(a)]
    assert names[:3] == ["config.json", "generation_config.json", "model.safetensors.index.json"]
    assert all(n.endswith(".safetensors") for n in names[3:]) and len(names) > 4
    assert {p.name for p in tokenizer_files(a)} >= {"tokenizer.json", "tokenizer_config.json"}


def test_local_model_resolves_folders_and_refuses_the_rest(demo_bf16, tmp_path):
    assert local_model(ModelRef.parse(str(demo_bf16[0])), "model_1").path == demo_bf16[0].resolve()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelNotFoundError, match="model_1: .* is a file, expected a model folder"):
        local_model(ModelRef(ref=str(tmp_path / "file")), "model_1")
    with pytest.raises(ModelNotFoundError, match="model_2: model folder not found: org/name@v1") as e:
        local_model(ModelRef(ref="org/name", revision="v1"), "model_2")
    assert e.value.exit_code == 2
