"""The import hook: plain mergekit-yaml knows the method once the package is installed, lazily."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest
from mergekit_helpers import mergekit_yaml, write_cfg
from model_helpers import ROOT

pytest.importorskip("mergekit")


def test_hook_can_be_turned_off(demo_bf16, tmp_path):
    cfg = write_cfg(tmp_path / "c.yml", *demo_bf16)
    env = {**__import__("os").environ, "SLERP_PLUGIN_MERGEKIT_HOOK": "0"}
    r = mergekit_yaml(cfg, tmp_path / "o", env=env, fresh=True)
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
