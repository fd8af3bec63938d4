"""The seed config through Hydra: overrides, multirun, --cfg job, bare slerp-merge."""

from __future__ import annotations

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
