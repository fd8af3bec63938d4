"""Shared fixtures: tiny local model pairs built offline, and helpers to read them back."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

# Nothing in the tests may reach a real Hub: the default endpoint is a closed local port; the
# `hub` fixture points it at the test server. Xet is off (the test server speaks LFS).
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.pop("HF_TOKEN", None)

HUB_TOKEN = "hf_test_token_write"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SLERP_PLUGIN_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def load_state(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a model folder (every *.safetensors file)."""
    state: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        state.update(load_file(f))
    return state


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def write_model(folder: Path, state: dict[str, torch.Tensor], like: Path) -> Path:
    """A model folder holding ``state`` (single file) with config and tokenizer copied from ``like``."""
    folder.mkdir(parents=True)
    for f in like.iterdir():
        if not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy(f, folder / f.name)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file of a folder (recursively) → bytes, for bit-identity checks."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def demo_bf16(tmp_path_factory) -> tuple[Path, Path]:
    """bf16 Llama pair, sharded (several input shards), untied embeddings."""
    from slerp_plugin.demo import build_demo_pair

    return build_demo_pair(tmp_path_factory.mktemp("bf16"), max_shard_size="100KB")


@pytest.fixture(scope="session")
def demo_fp32_tied(tmp_path_factory) -> tuple[Path, Path]:
    """float32 Llama pair, single-file checkpoints, tied embeddings."""
    from slerp_plugin.demo import build_demo_pair

    return build_demo_pair(tmp_path_factory.mktemp("fp32"), dtype="float32", tie_word_embeddings=True)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The Hub-compatible test server on 127.0.0.1, with HF_ENDPOINT/HF_TOKEN/HF_HUB_CACHE set."""
    from hub_server import HubServer

    monkeypatch.setenv("SLERP_PLUGIN_HUB_BACKOFF", "0.01")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    with HubServer(tmp_path / "hub-blobs") as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
