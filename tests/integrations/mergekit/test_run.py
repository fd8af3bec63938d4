"""mergekit runs of our method get our manifest and model card; the method can be registered from Python."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from mergekit_helpers import mergekit_yaml, ours, write_cfg
from model_helpers import load_state

from slerp_plugin.formats.manifest import Manifest
from slerp_plugin.validate import ulp_distance

pytest.importorskip("mergekit")


def test_mergekit_yaml_finds_method_and_matches_our_engine(demo_bf16, tmp_path):
    a, b = demo_bf16
    cfg = write_cfg(tmp_path / "cfg.yml", a, b)
    r = mergekit_yaml(cfg, tmp_path / "mk", fresh=True)  # found through the hook at start-up
    assert r.returncode == 0, r.stderr[-2000:]
    r = ours(cfg, tmp_path / "ours")
    assert r.returncode == 0, r.stderr[-2000:]
    mk, us = load_state(tmp_path / "mk"), load_state(tmp_path / "ours")
    assert set(mk) == set(us)
    for k in mk:
        assert mk[k].dtype == us[k].dtype == torch.bfloat16
        # same kernel and op order; only the BLAS dot behind d may round differently on
        # differently aligned buffers, which can move an element by one bf16 ulp
        assert int(ulp_distance(mk[k], us[k]).max()) <= 1, k
    m_mk, m_us = Manifest.read(tmp_path / "mk"), Manifest.read(tmp_path / "ours")
    assert {t.name: t.t for t in m_mk.tensors} == {t.name: t.t for t in m_us.tensors}
    assert {t.name: t.branch for t in m_mk.tensors} == {t.name: t.branch for t in m_us.tensors}
    assert m_mk.tool["engine"] == "mergekit" and m_mk.spec["t"] == m_us.spec["t"]
    assert m_mk.inputs["model_1"].files and all(f.sha256 for f in m_mk.inputs["model_1"].files)
    card = (tmp_path / "mk/README.md").read_text()
    assert "slerp_for_causal_lm" in card and "base_model:" in card and "huggingface.co" not in card
    from slerp_plugin.formats.modelcard import parse_front_matter

    assert parse_front_matter(card)["base_model"] == [str(a), str(b)]


def test_run_merge_from_python_with_explicit_import(demo_bf16, tmp_path):
    cfg = write_cfg(tmp_path / "c.yml", *demo_bf16)
    code = f"""
import yaml
from slerp_plugin.integrations.mergekit import register
register()
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
cfg = MergeConfiguration.model_validate(yaml.safe_load(open({str(cfg)!r})))
run_merge(cfg, {str(tmp_path / "out")!r}, options=MergeOptions(lazy_unpickle=True))
"""
    env = {**__import__("os").environ, "SLERP_PLUGIN_MERGEKIT_HOOK": "0"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert Manifest.read(tmp_path / "out").tool["engine"] == "mergekit"
