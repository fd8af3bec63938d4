"""The subcommands: mergekit options, validate exit codes, demo-models."""

from __future__ import annotations

import pytest
from mergekit_helpers import ours, write_cfg
from model_helpers import run_cli

from slerp_plugin.formats.manifest import Manifest

pytest.importorskip("mergekit")


def test_engine_options_from_the_command_line(demo_bf16, tmp_path):
    cfg = write_cfg(tmp_path / "cfg.yml", *demo_bf16)
    r = ours(cfg, tmp_path / "a", "--threads", "1", "--buffered-io", "--buffer-memory", "1MB")
    assert r.returncode == 0, r.stderr[-2000:]
    spec = Manifest.read(tmp_path / "a").spec
    assert (spec["threads"], spec["direct_io"], spec["buffer_memory"]) == (1, False, 1_000_000)
    assert "1 compute thread(s), buffered I/O" in r.stderr
    assert "read ahead while starting" in r.stderr
    r = ours(cfg, tmp_path / "b", "--buffer-memory", "lots")
    assert r.returncode != 0 and "buffer_memory" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "b").exists()


def test_demo_models_subcommand(tmp_path):
    r = run_cli(["demo-models", str(tmp_path / "d"), "--dtype", "float32"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for m in ("model_a", "model_b"):
        assert (tmp_path / "d" / m / "config.json").is_file()
        assert (tmp_path / "d" / m / "tokenizer.json").is_file()


