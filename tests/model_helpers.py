"""Helpers shared by the tests: read and write small model folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HUB_TOKEN = "hf_test_token_write"
ROOT = Path(__file__).resolve().parents[1]  #: the repository

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
    files = sorted(Path(folder).rglob("*"))
    return {str(p.relative_to(folder)): p.read_bytes() for p in files if p.is_file()}

def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
