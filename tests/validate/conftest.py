"""A validated merge of the demo pair, and helpers to break copies of it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from slerp_plugin.merge import run_merge
from slerp_plugin.spec import MergeSpec


@pytest.fixture(scope="module")
def merged(demo_bf16, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("val") / "merged"
    run_merge(MergeSpec(model_1=str(demo_bf16[0]), model_2=str(demo_bf16[1]), t=0.4, output=str(out),
                        max_shard_size="120KB"))
    return out


@pytest.fixture
def copy(merged, tmp_path) -> Path:
    return Path(shutil.copytree(merged, tmp_path / "m"))
