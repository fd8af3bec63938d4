"""The mergekit method: found by plain mergekit-yaml, same output as our engine, t resolved as mergekit."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from model_helpers import ROOT, load_state, write_model

from slerp_plugin.errors import ConfigError, ShapeMismatchError
from slerp_plugin.formats.manifest import Manifest
from slerp_plugin.formats.mergekit_yaml import spec_from_mergekit
from slerp_plugin.validate import ulp_distance

pytest.importorskip("mergekit")

BIN = Path(sys.executable).parent

FILTERED_T = [
    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
    {"value": 0.5},
]


def write_cfg(path: Path, a: Path, b: Path, method="slerp_for_causal_lm", **params) -> Path:
    cfg = {
        "merge_method": method,
        "base_model": str(a),
        "models": [{"model": str(a)}, {"model": str(b)}],
        "parameters": {"t": FILTERED_T, **params},
        "dtype": "bfloat16",
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def mergekit_yaml(cfg: Path, out: Path, *extra: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "mergekit-yaml"), str(cfg), str(out), "--lazy-unpickle", *extra],
                          capture_output=True, text=True, timeout=300, env=env)


def ours(cfg: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slerp_plugin", "mergekit", str(cfg), str(out), *extra],
                          capture_output=True, text=True, timeout=300)


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


@pytest.fixture(scope="module")
def scaled_pair(tmp_path_factory):
    """float32, 4 layers, model_b = 2·model_a: every tensor takes LERP, so r = (1+t)·a reveals t."""
    from slerp_plugin.demo.pair import build_demo_pair

    root = tmp_path_factory.mktemp("scaled")
    a, _ = build_demo_pair(root / "src", dtype="float32", num_layers=4, perturbation=0.0)
    b = write_model(root / "b", {k: 2 * v for k, v in load_state(a).items()}, a)
    return a, b


def test_mergekit_yaml_finds_method_and_matches_our_engine(demo_bf16, tmp_path):
    a, b = demo_bf16
    cfg = write_cfg(tmp_path / "cfg.yml", a, b)
    r = mergekit_yaml(cfg, tmp_path / "mk")
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


def test_vocabulary_mismatch_is_an_error_that_says_what_to_do(demo_bf16, tmp_path):
    a, b = demo_bf16
    state = load_state(b)
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        state[k] = torch.cat([state[k], state[k][:8]])
    b2 = write_model(tmp_path / "b2", state, b)
    cfg = write_cfg(tmp_path / "c.yml", a, b2)
    with pytest.raises(ShapeMismatchError, match="vocabularies differ.*tokenizer_source: base"):
        from slerp_plugin.engine import plan_merge

        plan_merge(spec_from_mergekit(yaml.safe_load(cfg.read_text()), tmp_path / "o"))
    r = ours(cfg, tmp_path / "o")
    assert r.returncode == 3 and "tokenizer_source: base" in r.stderr
    r = mergekit_yaml(cfg, tmp_path / "o2")
    assert r.returncode != 0 and "Tensor size mismatch" in r.stderr + r.stdout


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


def test_hook_can_be_turned_off(demo_bf16, tmp_path):
    cfg = write_cfg(tmp_path / "c.yml", *demo_bf16)
    env = {**__import__("os").environ, "SLERP_PLUGIN_MERGEKIT_HOOK": "0"}
    r = mergekit_yaml(cfg, tmp_path / "o", env=env)
    assert r.returncode != 0 and "slerp_for_causal_lm" in r.stderr + r.stdout


def test_registration_is_idempotent():
    code = """
from slerp_plugin.integrations.mergekit import register
from mergekit.merge_methods import registered_methods
register(); register()
print(sum(x.spec.name == "slerp_for_causal_lm" for x in registered_methods()))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "1", r.stderr


def test_plain_python_start_imports_neither_torch_nor_mergekit():
    code = ("import sys; print(any(type(f).__name__ == '_Finder' for f in sys.meta_path), "
            "sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'mergekit'}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "True []"  # the hook is active, and lazy


def test_wheel_ships_the_hook_pth(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    wheel = next(tmp_path.glob("slerp_plugin-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "slerp_plugin_mergekit.pth" in names
    pth = zipfile.ZipFile(wheel).read("slerp_plugin_mergekit.pth").decode()
    assert pth.startswith("import slerp_plugin.integrations.mergekit.hook")
    assert "slerp_plugin/integrations/mergekit/method.py" in names
    assert "slerp_plugin/cli/conf/llm_slerp.yaml" in names and "slerp_plugin/py.typed" in names
