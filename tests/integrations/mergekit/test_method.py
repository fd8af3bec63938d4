"""The mergekit method: found by plain mergekit-yaml, same output as our engine, t resolved as mergekit."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml
from mergekit_helpers import mergekit_yaml, write_cfg
from model_helpers import load_state

from slerp_plugin.formats.manifest import Manifest

pytest.importorskip("mergekit")



@pytest.mark.parametrize("params,branch",
                         [({"DOT_THRESHOLD": 1e-9}, "lerp"), ({"epsilon": 1e6}, "unnormalised")])
def test_dot_threshold_and_epsilon_from_yaml_change_the_result(demo_bf16, tmp_path, params, branch):
    a, b = demo_bf16
    base = write_cfg(tmp_path / "base.yml", a, b)
    changed = write_cfg(tmp_path / "changed.yml", a, b, **params)
    assert mergekit_yaml(base, tmp_path / "base").returncode == 0
    r = mergekit_yaml(changed, tmp_path / "changed")
    assert r.returncode == 0, r.stderr[-2000:]
    x, y = load_state(tmp_path / "base"), load_state(tmp_path / "changed")
    assert any(not torch.equal(x[k], y[k]) for k in x)
    counts = Manifest.read(tmp_path / "changed").branch_counts
    assert counts.get(branch, 0) > 0 and (branch != "lerp" or set(counts) == {"lerp"})


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda d: d["parameters"].pop("t"), "Missing required parameter t"),
        (lambda d: d["parameters"].update(t=1.5), "less than or equal to 1"),
        (lambda d: d["models"].append({"model": d["models"][1]["model"] + "_copy"}),
         "requires exactly 2 inputs"),
    ],
)
def test_bad_configs_in_mergekit_yaml(demo_bf16, tmp_path, mutate, match):
    a, b = demo_bf16
    shutil.copytree(b, tmp_path / "model_b_copy")
    cfg = write_cfg(tmp_path / "c.yml", a, tmp_path / "model_b")
    shutil.copytree(b, tmp_path / "model_b")
    doc = yaml.safe_load(cfg.read_text())
    mutate(doc)
    cfg.write_text(yaml.safe_dump(doc))
    r = mergekit_yaml(cfg, tmp_path / "o")
    assert r.returncode != 0
    assert match in r.stderr + r.stdout


