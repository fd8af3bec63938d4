"""``slerp-merge sweep``: the table, the report, exit 6 when no t passes, the winner merged with
``--merge``, and bad t lists refused in one line."""

from __future__ import annotations

import json
import os
import re

import pytest
from model_helpers import permuted_twin, run_cli, seed_args

from slerp_plugin.formats.manifest import Manifest
from slerp_plugin.merge import run_merge
from slerp_plugin.spec import MergeSpec
from slerp_plugin.validate import EvalSettings, EvaluationCache
from slerp_plugin.validate.functional import functional_check


def test_the_best_t_merged_with_merge(demo_bf16, tmp_path):
    out = tmp_path / "merged"
    r = run_cli(["sweep", "--t", "0.2:0.8:0.3", "--merge", "--max-tokens", "256",
                 *seed_args(demo_bf16, f"method.model_save_path={out}")], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    table = r.stdout.splitlines()
    assert table[0].split()[:2] == ["t", "perplexity"] and [row.split()[0] for row in table[1:4]] == [
        "0.2", "0.5", "0.8"]
    best = json.loads((tmp_path / "merged-sweep" / "sweep.json").read_text())["best_t"]
    assert f"best t: {best:g}" in r.stdout and f"merged at t = {best:g}: {out}" in r.stdout
    assert Manifest.read(out).spec["t"] == best  # only the chosen merge is written
    written = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert written == ["merged", "merged-sweep"]


@pytest.mark.parametrize("values, message", [("0.3,0.3", "0.3 is given twice"),
                                             ("0.5,1.2", "1.2 is outside [0, 1]")])
def test_bad_t_lists_are_refused_in_one_line(values, message, demo_bf16, tmp_path):
    r = run_cli(["sweep", "--t", values, *seed_args(demo_bf16)], cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == f"slerp-merge: error: --t: {message}"
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_no_t_passes_exits_6_and_merges_nothing(tmp_path):
    from slerp_plugin.demo.smollm2 import smollm2_folder

    real = smollm2_folder()
    pair = (real, permuted_twin(real, tmp_path / "twin"))
    out = tmp_path / "merged"
    r = run_cli(["sweep", "--t", "0.3,0.5", "--merge", "--max-tokens", "128", "--report", str(tmp_path / "r"),
                 *seed_args(pair, f"method.model_save_path={out}")], cwd=tmp_path)
    assert r.returncode == 6, r.stderr[-3000:]
    assert "no t passes the gate" in r.stdout and not out.exists()
    sweep = json.loads((tmp_path / "r" / "sweep.json").read_text())
    assert sweep["best_t"] is None and all(p["status"] == "failed" for p in sweep["points"])
    parents = [sweep["parents"][role]["perplexity"] for role in ("model_1", "model_2")]
    assert max(parents) < 100 and min(p["perplexity"] for p in sweep["points"]) > 100 * max(parents)
    assert any(p["branch_counts"].get("slerp") for p in sweep["points"])  # neurons out of line: SLERP
    local = run_merge(MergeSpec(model_1=pair[0], model_2=pair[1], t=0.5, output=tmp_path / "at-0.5"))
    settings = EvalSettings(max_tokens=128, device="cpu")
    # validate's perplexity gate, with the parents from the cache the sweep filled
    functional = functional_check(local.output, pair, settings=settings, margin=0.1, cache=EvaluationCache())
    assert functional.evaluations["model_1"].cached and functional.evaluations["model_2"].cached
    assert sweep["points"][1]["perplexity"] == pytest.approx(functional.perplexity["merged"], rel=1e-4)


def test_the_best_t_streamed_to_the_hub_with_merge(hub, demo_bf16, tmp_path):
    from slerp_plugin.hub import client as H

    H.upload_folder(demo_bf16[0], "org/sw-a")
    H.upload_folder(demo_bf16[1], "org/sw-b")
    r = run_cli(["sweep", "--t", "0.3,0.6", "--merge", "--max-tokens", "128", "--generation-memory", "0",
                 *seed_args(("org/sw-a", "org/sw-b"), f"method.model_save_path={tmp_path / 'merged'}",
                            "method.stream=true", "method.max_shard_size=100KB",
                            "+push_to_hub=org/sw-merged")],
                cwd=tmp_path, env={**os.environ, "SLERP_PLUGIN_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr[-3000:]
    best = json.loads((tmp_path / "merged-sweep" / "sweep.json").read_text())["best_t"]
    assert f"merged at t = {best:g}: org/sw-merged" in r.stdout
    repo = hub.state.repos["org/sw-merged"]
    head = repo.commits[repo.branches["main"]]
    assert f"t={best:g}" in head.title and "validation.json" in head.files  # published with the gate's report
    sweep = json.loads((tmp_path / "merged-sweep" / "sweep.json").read_text())
    chosen = next(p["perplexity"] for p in sweep["points"] if p["t"] == best)
    gate = re.search(r"gate passed: perplexity merged ([\d.]+)", r.stderr)
    assert gate and float(gate.group(1)) == pytest.approx(chosen, abs=1e-3)  # the same figure, the same text
    assert "model_1 from the cache" in r.stderr and "model_2 from the cache" in r.stderr  # the sweep's
    assert not (tmp_path / "merged").exists()  # nothing written locally
