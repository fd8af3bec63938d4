"""A mergekit YAML on our engine: t resolved as mergekit does, unsupported configs refused clearly."""

from __future__ import annotations

import pytest
import torch
import yaml
from mergekit_helpers import FILTERED_T, mergekit_yaml, ours, write_cfg
from model_helpers import load_state, write_model

from slerp_plugin.errors import ConfigError, ShapeMismatchError
from slerp_plugin.formats.manifest import Manifest
from slerp_plugin.formats.mergekit_yaml import spec_from_mergekit

pytest.importorskip("mergekit")


@pytest.fixture(scope="module")
def scaled_pair(tmp_path_factory):
    """float32, 4 layers, model_b = 2·model_a: every tensor takes LERP, so r = (1+t)·a reveals t."""
    from slerp_plugin.demo.pair import build_demo_pair

    root = tmp_path_factory.mktemp("scaled")
    a, _ = build_demo_pair(root / "src", dtype="float32", num_layers=4, perturbation=0.0)
    b = write_model(root / "b", {k: 2 * v for k, v in load_state(a).items()}, a)
    return a, b


def test_gradient_and_filters_resolve_like_mergekit_builtin(scaled_pair, tmp_path):
    a, b = scaled_pair
    state_a = load_state(a)
    gradient = [0.1, 0.9, 0.3]  # no filters: embeddings, final norm and lm_head take 0.1
    for name, t_setting in (("filtered", FILTERED_T), ("gradient", gradient)):
        cfg = write_cfg(tmp_path / f"{name}.yml", a, b, method="slerp")
        doc = yaml.safe_load(cfg.read_text())
        doc["parameters"]["t"] = t_setting
        doc["dtype"] = "float32"
        cfg.write_text(yaml.safe_dump(doc))
        r = mergekit_yaml(cfg, tmp_path / f"mk_{name}")  # mergekit's own built-in slerp
        assert r.returncode == 0, r.stderr[-2000:]
        r = ours(cfg, tmp_path / f"ours_{name}")
        assert r.returncode == 0, r.stderr[-2000:]
        builtin = load_state(tmp_path / f"mk_{name}")
        ours_t = {t.name: t.t for t in Manifest.read(tmp_path / f"ours_{name}").tensors}
        assert len(ours_t) == len(builtin)
        for key, merged in builtin.items():
            mask = state_a[key].abs() > 1e-3
            t_builtin = ((merged[mask] / state_a[key][mask]) - 1).median().item()
            assert t_builtin == pytest.approx(ours_t[key], abs=1e-5), key
        if name == "gradient":
            for key in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
                assert ours_t[key] == pytest.approx(0.1)
            assert ours_t["model.layers.1.mlp.up_proj.weight"] == pytest.approx(0.1 + 0.8 * 2 / 3)
            assert ours_t["model.layers.3.mlp.up_proj.weight"] == pytest.approx(0.3)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda d: d["parameters"].pop("t"), "parameters.t: missing"),
        (lambda d: d["parameters"].update(t=1.5), "t: must be between 0 and 1"),
        (lambda d: d["parameters"].update(t=[0, 2]), "t: must be between 0 and 1"),
        (lambda d: d["models"].append({"model": "/x/third"}), "exactly two models"),
        (lambda d: d.pop("base_model"), "base_model: missing"),
        (lambda d: d.update(merge_method="ties"), "merge_method"),
        (lambda d: d["parameters"].update(gamma=1), "unknown ['gamma']"),
    ],
)
def test_bad_configs_on_our_path(demo_bf16, tmp_path, mutate, match):
    cfg = write_cfg(tmp_path / "c.yml", *demo_bf16)
    doc = yaml.safe_load(cfg.read_text())
    mutate(doc)
    with pytest.raises(ConfigError, match=match.replace("[", r"\[").replace("]", r"\]")):
        spec_from_mergekit(doc, tmp_path / "o")
    cfg.write_text(yaml.safe_dump(doc))
    r = ours(cfg, tmp_path / "o")
    assert r.returncode == 2 and r.stderr.count("slerp-merge: error:") == 1
    assert not (tmp_path / "o").exists()


def test_vocabulary_mismatch_is_an_error_that_says_what_to_do(demo_bf16, tmp_path):
    a, b = demo_bf16
    state = load_state(b)
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        state[k] = torch.cat([state[k], state[k][:8]])
    b2 = write_model(tmp_path / "b2", state, b)
    cfg = write_cfg(tmp_path / "c.yml", a, b2)
    with pytest.raises(ShapeMismatchError, match="vocabularies differ.*tokenizer_source: base"):
        from slerp_plugin.merge import plan_merge

        plan_merge(spec_from_mergekit(yaml.safe_load(cfg.read_text()), tmp_path / "o"))
    r = ours(cfg, tmp_path / "o")
    assert r.returncode == 3 and "tokenizer_source: base" in r.stderr
    r = mergekit_yaml(cfg, tmp_path / "o2")
    assert r.returncode != 0 and "Tensor size mismatch" in r.stderr + r.stdout
