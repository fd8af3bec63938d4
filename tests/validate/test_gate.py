"""Validation: a correct merge passes; broken outputs fail with a message naming the problem."""

from __future__ import annotations

import json
import subprocess

import pytest
from model_helpers import CLI, load_state, rewrite, run_cli

from slerp_plugin.errors import ConfigError
from slerp_plugin.validate import ValidationReport, validate_merge, write_report
from slerp_plugin.validate.report import REPORT_NAME, SUMMARY_NAME


def test_correct_merge_passes(merged, demo_bf16, tmp_path):
    report = validate_merge(merged, demo_bf16)
    assert report.passed, report.summary
    assert report.structural.tensors == len(load_state(merged))
    assert report.spot is not None and len(report.spot.tensors) == report.structural.tensors
    assert all(t.passed and (t.max_ulp or 0) <= 1 for t in report.spot.tensors)
    f = report.functional
    assert f.status == "passed" and set(f.perplexity) == {"merged", "model_1", "model_2"}
    assert f.tokens > 100 and len(f.generations) == 3 and f.threshold > f.perplexity["merged"]
    path = write_report(report, tmp_path)
    again = ValidationReport.model_validate_json(path.read_text())
    assert again == report and json.loads(path.read_text())["schema_version"] == 1
    assert (tmp_path / SUMMARY_NAME).read_text().startswith("PASSED")


def test_without_manifest_t_is_required(copy, demo_bf16):
    (copy / "merge_manifest.json").unlink()
    with pytest.raises(ConfigError, match="pass --t"):
        validate_merge(copy, demo_bf16)
    report = validate_merge(copy, demo_bf16, t=0.4, skip_functional="quick")
    assert report.passed, report.summary
    report = validate_merge(copy, demo_bf16, t=0.6, skip_functional="quick")
    assert not report.passed


def test_cli_exit_codes(merged, copy, demo_bf16, tmp_path):
    cli = [*CLI, "validate"]  # a new interpreter each time, as a shell starts the command
    r = subprocess.run([*cli, str(merged), "--parents", *map(str, demo_bf16), "--report", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "PASSED" in r.stdout and (tmp_path / REPORT_NAME).is_file()
    rewrite(copy, lambda s: s.update({k: v * 10 for k, v in s.items() if k.endswith("down_proj.weight")}))
    r = subprocess.run([*cli, str(copy), "--parents", *map(str, demo_bf16), "--skip-functional", "fast"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 6 and "FAILED" in r.stdout
    assert ValidationReport.read(copy).passed is False
    r = subprocess.run([*cli, str(copy), "--parents", "/no/such", str(demo_bf16[1])],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and r.stderr.count("slerp-merge: error:") == 1


def test_bad_input_is_told_from_a_failed_gate_and_overwrites_no_report(merged, copy, demo_bf16, tmp_path):
    import shutil
    from pathlib import Path

    first = run_cli(["validate", str(copy), "--parents", *map(str, demo_bf16), "--skip-functional", "fast"],
                    tmp_path)
    assert first.returncode == 0
    before = (copy / REPORT_NAME).read_text()
    r = run_cli(["validate", str(tmp_path / "nowhere"), "--parents", *map(str, demo_bf16)], tmp_path)
    assert r.returncode == 8 and "is not a folder" in r.stderr and "pass --t" not in r.stderr
    truncated = Path(shutil.copytree(demo_bf16[1], tmp_path / "b"))
    shard = sorted(truncated.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    r = run_cli(["validate", str(copy), "--parents", str(demo_bf16[0]), str(truncated)], tmp_path)
    errors = [x for x in r.stderr.splitlines() if x.startswith("slerp-merge: error:")]
    assert r.returncode == 8 and len(errors) == 1 and "model_2:" in errors[0] and "truncated" in errors[0]
    assert (copy / REPORT_NAME).read_text() == before  # the merge's earlier verdict stands
    r = run_cli(["validate", str(copy), "--parents", *map(str, demo_bf16), "--report",
                 str(tmp_path / "missing" / "dir")], tmp_path)
    assert r.returncode == 2 and "--report: no such folder" in r.stderr
    assert "spot re-computation" not in r.stderr  # refused before any work


def test_cli_evaluation_options(merged, demo_bf16, tmp_path):
    cli = ["validate", str(merged), "--parents", *map(str, demo_bf16), "--report", str(tmp_path),
           "--max-tokens", "64"]
    for bad, message in ((["--generation-memory", "lots"], "--generation-memory: not a size"),
                         (["--max-tokens", "1"], "--max-tokens: Input should be greater than or equal to 2"),
                         (["--dtype", "int8"], "invalid choice: 'int8'")):
        r = run_cli([*cli, *bad], tmp_path)
        assert r.returncode == 2 and message in r.stderr, r.stderr
    streamed = [*cli, "--generation-memory", "0", "--dtype", "bfloat16"]
    r = run_cli(streamed, tmp_path)
    assert r.returncode == 0, r.stderr
    f = ValidationReport.read(tmp_path).functional
    assert f.dtype == "bfloat16" and f.generations == [] and not f.evaluations["model_1"].cached
    streamed = [*cli, "--generation-memory", "0", "--dtype", "bfloat16"]
    r = run_cli(streamed, tmp_path)
    assert "model_1: cpu, bfloat16, layer-streamed, from the cache" in r.stdout
    r = run_cli([*cli, "--generation-memory", "0", "--dtype", "bfloat16", "--no-cache"], tmp_path)
    assert not ValidationReport.read(tmp_path).functional.evaluations["model_1"].cached
