"""The gate inside the stream: a streamed merge is evaluated as it is merged, published with its
report only if it passes, and a failed gate publishes nothing."""

from __future__ import annotations

import json
import logging
import re

import pytest
from model_helpers import permuted_twin, run_cli, seed_args, spec_for
from test_pipeline import SHARD, local_result, parents, published, stream_spec  # noqa: F401

from slerp_plugin.hub import client as H
from slerp_plugin.merge import run_merge
from slerp_plugin.stream.evaluation import aside_estimate
from slerp_plugin.validate import EvalSettings, EvaluationCache, validate_merge


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """An evaluation cache of the test's own (other tests evaluate the same parents)."""
    monkeypatch.setenv("SLERP_PLUGIN_CACHE", str(tmp_path / "cache"))


def test_a_passing_stream_publishes_validate_s_figures_and_its_report(hub, parents, demo_bf16,  # noqa: F811
                                                                      tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="slerp_plugin"):
        run_merge(stream_spec(tmp_path, gate_max_tokens=256))
    got = published("org/merged", tmp_path)
    report = json.loads((got / "validation.json").read_text())
    assert report["passed"] and report["functional"]["status"] == "passed"
    assert report["functional"]["tokens"] == 256
    assert report["model"] == "hf://org/merged" and report["spot"]["tensors"]
    assert (got / "validation.txt").read_text().startswith("PASSED")
    card = (got / "README.md").read_text()
    merged = report["functional"]["perplexity"]["merged"]
    assert "## Evaluation" in card and f"| merged | {merged:.4f} |" in card
    assert "gate passed: perplexity merged" in caplog.text

    local = local_result(demo_bf16, tmp_path)  # the same merge, made locally and validated
    want = validate_merge(local, demo_bf16, settings=EvalSettings(max_tokens=256)).functional.perplexity
    for role, ppl in report["functional"]["perplexity"].items():
        assert ppl == pytest.approx(want[role], rel=1e-4), role
    assert {e["mode"] for e in report["functional"]["evaluations"].values()} == {"layer-streamed"}


def test_parents_validate_evaluated_come_from_the_cache(hub, parents, demo_bf16, tmp_path, caplog):  # noqa: F811
    local = local_result(demo_bf16, tmp_path)
    validate_merge(local, demo_bf16, settings=EvalSettings(), cache=EvaluationCache())  # fills the cache
    with caplog.at_level(logging.INFO, logger="slerp_plugin"):
        run_merge(stream_spec(tmp_path))
    assert "gate: evaluating merged on" in caplog.text
    assert "model_1 from the cache" in caplog.text and "model_2 from the cache" in caplog.text
    report = json.loads((published("org/merged", tmp_path) / "validation.json").read_text())
    assert report["functional"]["evaluations"]["model_1"]["cached"]


def test_without_the_gate_shards_keep_model_1_s_order_and_no_report(hub, parents, demo_bf16, tmp_path):  # noqa: F811
    run_merge(stream_spec(tmp_path, gate=False))
    got = published("org/merged", tmp_path)
    local = local_result(demo_bf16, tmp_path)
    assert not (got / "validation.json").exists()
    for f in local.glob("*.safetensors"):
        assert (got / f.name).read_bytes() == f.read_bytes()


@pytest.mark.slow
def test_two_fine_parents_whose_merge_is_not_publish_nothing_and_exit_6(hub, tmp_path):
    from slerp_plugin.demo.smollm2 import smollm2_folder

    real = smollm2_folder()
    H.upload_folder(real, "org/smol")
    H.upload_folder(permuted_twin(real, tmp_path / "twin"), "org/smol-twin")
    # 256 evaluation tokens, not 1024: the merge's perplexity is orders of magnitude off on any number
    args = seed_args(("org/smol", "org/smol-twin"), "method.t=0.5", "method.stream=true",
                     "method.gate_max_tokens=256", f"method.model_save_path={tmp_path / 'out'}",
                     "+push_to_hub=org/smol-merged")
    r = run_cli(args, cwd=tmp_path)
    assert r.returncode == 6, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    figures = dict(re.findall(r"(merged|model_1|model_2) ([\d.]+)", last))
    assert "the gate failed: perplexity" in last and "nothing was published" in last, last
    assert float(figures["model_1"]) < 100 and float(figures["model_2"]) < 100  # each parent is fine
    assert float(figures["model_1"]) == pytest.approx(float(figures["model_2"]), rel=1e-3)
    assert float(figures["merged"]) > 100 * float(figures["model_1"])  # their merge is not
    assert hub.state.commit_count("org/smol-merged") == 1  # created, then never committed to
    report = json.loads((tmp_path / "out.partial" / "publish" / "validation.json").read_text())
    assert (tmp_path / "out.partial" / "publish" / "merge_manifest.json").is_file()  # for the dashboard
    assert not report["passed"] and report["functional"]["status"] == "failed"

    again = run_cli(args, cwd=tmp_path)  # a retry reports the verdict without merging again
    assert again.returncode == 6 and again.stderr.strip().splitlines()[-1] == last
    log = again.stdout + again.stderr
    assert "failed its gate in an earlier run" in log and " written in " not in log
    assert hub.state.commit_count("org/smol-merged") == 1


def test_a_tied_model_keeps_its_embedding_table_aside_for_the_head(hub, demo_fp32_tied, tmp_path, caplog,
                                                                    monkeypatch):
    """... counted once in the default disk budget, beside three shards in flight with their inputs."""
    from slerp_plugin.io.safetensors import read_header
    from slerp_plugin.stream.pipeline import StreamingMerge

    merges = []
    real_init = StreamingMerge.__init__

    def kept(self, *a, **kw):
        real_init(self, *a, **kw)
        merges.append(self)

    monkeypatch.setattr(StreamingMerge, "__init__", kept)
    H.upload_folder(demo_fp32_tied[0], "org/tied-a")
    H.upload_folder(demo_fp32_tied[1], "org/tied-b")
    with caplog.at_level(logging.INFO, logger="slerp_plugin"):
        run_merge(stream_spec(tmp_path, model_1="org/tied-a", model_2="org/tied-b", max_shard_size="100KB"))
    assert "merged keeps model.embed_tokens.weight" in caplog.text  # read again by the tied head
    (merge,) = merges
    shard = max(spool.disk_bytes for _, spool in merge.spools)
    table = next(i.nbytes for f in demo_fp32_tied[0].glob("*.safetensors") for i in read_header(f)[0]
                 if i.name == "model.embed_tokens.weight")
    assert merge.gate.tied_bytes == 3 * table and merge.gate.point_bytes > 0  # merged and both parents
    assert merge.budget.limit == 3 * shard + merge.gate.tied_bytes + merge.gate.point_bytes
    # what slerp-merge plan tells from the config alone
    assert aside_estimate(merge.plan.spec, demo_fp32_tied[0] / "config.json") == (
        merge.gate.tied_bytes + merge.gate.point_bytes)
    assert 0 < merge.budget.peak <= merge.budget.limit
    report = json.loads((published("org/merged", tmp_path) / "validation.json").read_text())
    local = run_merge(spec_for(demo_fp32_tied, tmp_path / "local", t=0.3)).output
    want = validate_merge(local, demo_fp32_tied, settings=EvalSettings()).functional.perplexity
    for role, ppl in report["functional"]["perplexity"].items():
        assert ppl == pytest.approx(want[role], rel=1e-4), role
    assert not (tmp_path / "streamed.partial").exists()
