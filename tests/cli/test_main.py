"""``slerp-merge`` as users run it: the seed's config with Hydra overrides, multirun, errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from model_helpers import ROOT, run_cli, seed_args

from slerp_plugin.formats.manifest import Manifest


def test_seed_command_with_overrides(demo_bf16, tmp_path):
    # the issue's own command line, with a relative --config-path resolved against the cwd
    (tmp_path / "config").symlink_to(ROOT / "config")
    a, b = demo_bf16
    r = run_cli(
        ["--config-path", "config/_get_started", "--config-name", "llm_slerp", "method.t=0.3",
         "+method.model_save_path=out/merged", f"modelpool.models.model_1={a}",
         f"modelpool.models.model_2={b}", f"modelpool.tokenizer={a}", "method.DOT_THRESHOLD=0.999"],
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out/merged"
    assert f"merged model: {out}" in r.stdout
    man = Manifest.read(out)
    assert man.spec["t"] == 0.3 and man.spec["DOT_THRESHOLD"] == 0.999
    assert "branches:" in r.stdout + r.stderr
    assert "read ahead while starting" in r.stdout + r.stderr  # the inputs' read-ahead ran


def test_default_output_is_under_outputs(demo_bf16, tmp_path):
    r = run_cli(seed_args(demo_bf16, "method.t=0.6"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("merged model: "))
    out = Path(line.split(": ", 1)[1])
    assert out.is_relative_to(tmp_path / "outputs") and out.name == "merged"
    assert Manifest.read(out).spec["t"] == 0.6


@pytest.mark.parametrize(
    "extra,code,match",
    [
        (["method.t=1.5"], 2, "t: must be between 0 and 1 (got 1.5)"),
        (["method.DOT_THRESHOLD=0"], 2, "DOT_THRESHOLD: Input should be greater than 0"),
        (["method.epsilon=0"], 2, "epsilon: Input should be greater than 0"),
        (["+modelpool.models.model_3=x"], 2, "exactly two models, got 3"),
        (["method._target_=os.system"], 2, "'os.system' is not allowed"),
        (["modelpool.models.model_1=/no/such/model"], 2, "model folder not found: /no/such/model"),
    ],
)
def test_bad_inputs_exit_non_zero_with_one_line(demo_bf16, tmp_path, extra, code, match):
    r = run_cli(seed_args(demo_bf16, *extra, "+method.model_save_path=out"), cwd=tmp_path)
    assert r.returncode == code, r.stderr
    errors = [x for x in r.stderr.splitlines() if x.startswith("slerp-merge: error:")]
    assert len(errors) == 1 and match in errors[0], r.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_seed_config_with_the_hub_unreachable(tmp_path):
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "SLERP_PLUGIN_HUB_BACKOFF": "0.01"}
    r = run_cli(["--config-path", str(ROOT / "config/_get_started"), "--config-name", "llm_slerp",
                 "+method.model_save_path=out"], cwd=tmp_path, env=env)
    errors = [line for line in r.stderr.splitlines() if line.startswith("slerp-merge: error:")]
    assert r.returncode == 7 and len(errors) == 1
    assert "model_1: ibivibiv/alpaca-dragon-72b-v1@main: cannot reach the Hub" in errors[0]
    assert not (tmp_path / "out").exists()


def test_existing_destination_is_not_touched(demo_bf16, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out/keep.txt").write_text("mine")
    r = run_cli(seed_args(demo_bf16, "+method.model_save_path=out"), cwd=tmp_path)
    assert r.returncode == 4 and "already exists" in r.stderr
    assert (tmp_path / "out/keep.txt").read_text() == "mine"


def test_importing_the_package_does_not_import_torch():
    r = subprocess.run([sys.executable, "-c", "import slerp_plugin, sys; print('torch' in sys.modules)"],
                       capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"
