"""The seed config through Hydra: overrides, multirun, --cfg job, bare slerp-merge."""

from __future__ import annotations

import pytest
from model_helpers import ROOT, load_state, run_cli, seed_args

from slerp_plugin.formats.manifest import Manifest


def test_multirun_gives_one_output_per_t(demo_bf16, tmp_path):
    r = run_cli(["-m", *seed_args(demo_bf16, "method.t=0.3,0.7", "+method.model_save_path=sweep")],
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    outs = {p.name: Manifest.read(p).spec["t"] for p in (tmp_path / "sweep").iterdir()}
    assert outs == {"t=0.3": 0.3, "t=0.7": 0.7}
    s3, s7 = load_state(tmp_path / "sweep/t=0.3"), load_state(tmp_path / "sweep/t=0.7")
    assert any(not (s3[k] == s7[k]).all() for k in s3)


def test_cfg_job_prints_config_and_merges_nothing(tmp_path):
    r = run_cli(["--config-path", str(ROOT / "config/_get_started"), "--config-name", "llm_slerp",
                 "method.t=0.3", "--cfg", "job"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "t: 0.3" in r.stdout and "fusion_bench.method.SlerpForCausalLM" in r.stdout
    assert not list(tmp_path.iterdir())


def write_config(folder, extra: str) -> None:
    """The seed's config plus ``extra`` YAML, as ``folder/llm_slerp.yaml``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "llm_slerp.yaml").write_text((ROOT / "config/_get_started/llm_slerp.yaml").read_text() + extra)


@pytest.mark.parametrize("extra,reason", [
    ("hydra:\n  callbacks:\n    x:\n      _target_: builtins.open\n      file: {victim}\n      mode: w\n",
     "may not configure Hydra"),
    ("hydra:\n  callbacks:\n    x:\n      _target_: pathlib.Path.write_text\n      self: {victim}\n"
     "      data: owned\n", "may not configure Hydra"),
    ("defaults:\n  - _self_\n  - override hydra/job_logging: custom\n", "defaults may only be [_self_]"),
    ("extra: !!python/object/apply:os.system ['touch {victim}']\n", "not plain YAML data"),
])
def test_a_config_file_never_runs_code(demo_bf16, tmp_path, extra, reason):
    victim = tmp_path / "victim.txt"
    victim.write_text("untouched")
    write_config(tmp_path / "cfg", extra.format(victim=victim))
    r = run_cli(["--config-path", str(tmp_path / "cfg"), "--config-name", "llm_slerp",
                 *seed_args(demo_bf16, "+method.model_save_path=out")[4:]], cwd=tmp_path)
    errors = [x for x in r.stderr.splitlines() if x.startswith("slerp-merge: error:")]
    assert r.returncode == 2 and len(errors) == 1 and reason in errors[0], r.stderr
    assert victim.read_text() == "untouched" and not (tmp_path / "out").exists()


def test_secrets_from_the_environment_are_never_read_into_a_config(demo_bf16, tmp_path):
    import os

    env = {**os.environ, "HF_TOKEN": "hf_SecretSecretSecret123"}
    r = run_cli(seed_args(demo_bf16, "method.t=${oc.env:HF_TOKEN}", "+method.model_save_path=out"),
                cwd=tmp_path, env=env)
    assert r.returncode == 2 and "environment variables cannot be read" in r.stderr
    assert "SecretSecret" not in r.stderr + r.stdout
    write_config(tmp_path / "cfg", "\n")
    cfg = (tmp_path / "cfg" / "llm_slerp.yaml")
    cfg.write_text(cfg.read_text().replace("t: 0.5", "t: ${oc.env:HF_TOKEN}"))
    r = run_cli(["--config-path", str(tmp_path / "cfg"), "--config-name", "llm_slerp",
                 *seed_args(demo_bf16, "+method.model_save_path=out")[4:]], cwd=tmp_path, env=env)
    assert r.returncode == 2 and "method.t: environment variables" in r.stderr
    assert "SecretSecret" not in r.stderr + r.stdout


@pytest.mark.parametrize("args,reason", [
    (["--experimental-rerun", "x.pickle"], "loads a pickle"),
    (["hydra.job_logging.handlers.x.class=os.system"], "cannot be overridden here"),
    (["+hydra/callbacks=foo"], "cannot be overridden here"),
    (["--config-name", "no_such_config"], "config 'no_such_config' not found"),
])
def test_command_lines_that_would_run_code_are_refused(tmp_path, args, reason):
    r = run_cli(args, cwd=tmp_path)
    assert r.returncode == 2 and reason in r.stderr, r.stderr


def test_bare_command_and_cfg_job_work_from_any_folder(tmp_path):
    r = run_cli(["--cfg", "job"], cwd=tmp_path)
    assert r.returncode == 0 and "model_1: ibivibiv/alpaca-dragon-72b-v1" in r.stdout, r.stderr
    r = run_cli([], cwd=tmp_path, env={**__import__("os").environ, "SLERP_PLUGIN_HUB_BACKOFF": "0.01"})
    errors = [x for x in r.stderr.splitlines() if x.startswith("slerp-merge: error:")]
    assert r.returncode == 7 and len(errors) == 1 and "cannot reach the Hub" in errors[0]
