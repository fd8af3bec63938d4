"""``run_sweep``: a real pair swept equals ``validate`` of the merges made at each t; an interrupted
sweep reports nothing and starts over; a report folder that is not the sweep's is never touched."""

from __future__ import annotations

import pytest
from model_helpers import fine_tuned, spec_for

from slerp_plugin.errors import OutputExistsError
from slerp_plugin.formats.manifest import Manifest
from slerp_plugin.merge import run_merge
from slerp_plugin.sweep import SweepResult, run_sweep
from slerp_plugin.sweep.runner import default_report
from slerp_plugin.validate import EvalSettings, EvaluationCache
from slerp_plugin.validate.fed import FedEvaluator
from slerp_plugin.validate.functional import functional_check

SETTINGS = EvalSettings(max_tokens=200, max_length=128, device="cpu")


@pytest.fixture(scope="module")
def smol_pair(tmp_path_factory):
    """SmolLM2-135M and a fine-tune of it of three steps."""
    from slerp_plugin.demo.smollm2 import smollm2_folder

    real = smollm2_folder()
    return real, fine_tuned(real, tmp_path_factory.mktemp("smol-ft") / "model")


@pytest.mark.slow
def test_a_real_pair_swept_equals_validate_of_the_merge_made_at_each_t(smol_pair, tmp_path):
    settings = EvalSettings(max_tokens=128, device="cpu")
    spec = spec_for(smol_pair, tmp_path / "merged", t=0.5, max_shard_size="60MB", device="cpu")
    cache = EvaluationCache(tmp_path / "cache")
    result = run_sweep(spec, [0.7, 0.3, 0.5], settings=settings, cache=cache)
    assert [p.t for p in result.points] == [0.3, 0.5, 0.7] and result.report == str(default_report(spec))
    assert result.passed and result.best_t in (0.3, 0.5, 0.7)
    for p in result.points:
        merged = run_merge(spec_for(smol_pair, tmp_path / f"m-{p.t}", t=p.t, device="cpu")).output
        # the perplexity gate of `slerp-merge validate` (its structural and spot checks aside)
        functional = functional_check(merged, smol_pair, settings=settings, margin=0.10, cache=cache)
        want = functional.perplexity
        assert p.perplexity == pytest.approx(want["merged"], rel=1e-4), p.t
        assert p.status == functional.status
        assert p.branch_counts == Manifest.read(merged).branch_counts
    for role in ("model_1", "model_2"):
        assert result.parents[role].perplexity == pytest.approx(want[role], rel=1e-4)
    assert SweepResult.read(default_report(spec)) == result


def test_an_interrupted_sweep_reports_nothing_and_a_rerun_starts_over(demo_bf16, tmp_path, monkeypatch):
    spec = spec_for(demo_bf16, tmp_path / "merged", t=0.5, max_shard_size="40KB", device="cpu")
    report = tmp_path / "report"
    calls = {"n": 0}
    take = FedEvaluator.take

    def failing_take(self, tensors):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return take(self, tensors)

    monkeypatch.setattr(FedEvaluator, "take", failing_take)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec, [0.25, 0.75], report=report, settings=SETTINGS, cache=None)
    assert not report.exists()  # no table that looks finished
    assert (tmp_path / "report.partial" / "work").is_dir()
    monkeypatch.setattr(FedEvaluator, "take", take)
    again = run_sweep(spec, [0.25, 0.75], report=report, settings=SETTINGS, cache=None)
    assert not (tmp_path / "report.partial").exists()
    assert sorted(p.name for p in report.iterdir()) == [".slerp_merge.json", "sweep.csv", "sweep.json",
                                                         "sweep.png", "sweep.svg", "sweep.txt"]
    fresh = run_sweep(spec, [0.25, 0.75], report=tmp_path / "fresh", settings=SETTINGS, cache=None)
    assert [p.perplexity for p in again.points] == [p.perplexity for p in fresh.points]


def test_a_report_folder_the_sweep_did_not_write_is_refused_and_left_alone(demo_bf16, tmp_path):
    spec = spec_for(demo_bf16, tmp_path / "merged", t=0.5, device="cpu")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="is not a sweep slerp-merge wrote there"):
        run_sweep(spec, [0.5], report=mine, settings=SETTINGS, cache=None)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and not (tmp_path / "mine.partial").exists()
    first = run_sweep(spec, [0.5], report=tmp_path / "r", settings=SETTINGS, cache=None)
    second = run_sweep(spec, [0.2, 0.5], report=tmp_path / "r", settings=SETTINGS, cache=None)  # replaced
    assert len(first.points) == 1 and SweepResult.read(tmp_path / "r") == second
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["mine", "r"]


def test_hub_parents_are_read_by_range_and_give_the_local_figures(hub, demo_bf16, tmp_path, monkeypatch):
    from slerp_plugin.hub import client as H
    from slerp_plugin.spec import MergeSpec

    H.upload_folder(demo_bf16[0], "org/sweep-a")
    H.upload_folder(demo_bf16[1], "org/sweep-b")
    ts = [0.25, 0.75]
    settings = SETTINGS.model_copy(update={"generation_memory": 0})  # parents cached as validate would
    local_spec = spec_for(demo_bf16, tmp_path / "merged", t=0.5, max_shard_size="40KB", device="cpu")
    local = run_sweep(local_spec, ts, report=tmp_path / "local", settings=settings, cache=None)
    sent = hub.state.bytes_sent
    spec = MergeSpec.build(model_1="org/sweep-a", model_2="org/sweep-b", t=0.5, output=tmp_path / "merged",
                           max_shard_size="40KB", device="cpu")
    cache = EvaluationCache(tmp_path / "cache")
    remote = run_sweep(spec, ts, report=tmp_path / "remote", settings=settings, cache=cache)
    assert [p.perplexity for p in remote.points] == [p.perplexity for p in local.points]
    assert [p.branch_counts for p in remote.points] == [p.branch_counts for p in local.points]
    for role in ("model_1", "model_2"):
        assert remote.parents[role].perplexity == pytest.approx(local.parents[role].perplexity, rel=1e-5)
    repos = sum(f.stat().st_size for folder in demo_bf16 for f in folder.iterdir())
    # each byte fetched about once: the SHA-256 check at the end fetches again only what was merged
    # before the bytes ahead of it in its file (here the head, stored first, is needed last)
    assert hub.state.bytes_sent - sent <= 1.25 * repos
    assert not list((tmp_path / "hf-cache").rglob("*.safetensors"))  # nothing downloaded whole
    again = run_sweep(spec, ts, report=tmp_path / "remote", settings=settings, cache=cache)
    assert all(again.parents[r].cached for r in ("model_1", "model_2"))  # by the Hub's SHA-256


def test_hub_parents_of_the_next_shard_are_fetched_while_one_is_merged(hub, demo_bf16, tmp_path, monkeypatch):
    """Both parents at once, one shard ahead: shard i + 1's fetches begin while shard i is merged, no
    spool but those of shards i and i + 1 is on disk then, and a failure stops the fetches and leaves
    no spool behind."""
    import threading

    from slerp_plugin.engine.execute import ShardMerge
    from slerp_plugin.hub import client as H
    from slerp_plugin.spec import MergeSpec
    from slerp_plugin.stream import spool as spool_mod

    H.upload_folder(demo_bf16[0], "org/ahead-a")
    H.upload_folder(demo_bf16[1], "org/ahead-b")
    spec = MergeSpec.build(model_1="org/ahead-a", model_2="org/ahead-b", t=0.5, output=tmp_path / "merged",
                           device="cpu")  # shards of the sweep's size for Hub parents, not the merge's
    monkeypatch.setattr("slerp_plugin.sweep.one_pass.SWEEP_HUB_SHARD_BYTES", 40_000)
    settings = SETTINGS.model_copy(update={"generation_memory": 0})
    fetching: dict[tuple[int, str], threading.Event] = {}
    real_fetch, real_run = spool_mod.fetch_spool, ShardMerge.run_each
    seen: dict[int, tuple[set[int], bool]] = {}  # shard → spools on disk, the next one's fetch begun
    fail_at = None

    def fetch(spool, role, *a, **kw):
        fetching.setdefault((spool.index, role), threading.Event()).set()
        return real_fetch(spool, role, *a, **kw)

    def run(self):
        i, last = self.shard.index, len(self.plan.shards) - 1
        if i not in seen:
            ahead = all(fetching.setdefault((i + 1, role), threading.Event()).wait(30)
                        for role in ("model_1", "model_2")) if i < last else False
            spools = self.plan.spec.output.parent / "spool"
            seen[i] = ({int(p.stem.split("-")[-1]) - 1 for p in spools.glob("model_*.bin")}, ahead)
        if i == fail_at:
            raise OSError("disk gone")
        return real_run(self)

    monkeypatch.setattr(spool_mod, "fetch_spool", fetch)
    monkeypatch.setattr(ShardMerge, "run_each", run)
    run_sweep(spec, [0.25, 0.75], report=tmp_path / "report", settings=settings,
              cache=EvaluationCache(tmp_path / "cache"))
    last = max(seen)
    assert last >= 3 and all(seen[i][1] for i in range(last)), seen
    assert all(i in on_disk and on_disk <= {i, i + 1} for i, (on_disk, _) in seen.items()), seen

    fail_at, seen = 2, {}
    fetching.clear()
    with pytest.raises(OSError, match="disk gone"):
        run_sweep(spec, [0.25, 0.75], report=tmp_path / "failed", settings=settings,
                  cache=EvaluationCache(tmp_path / "cache"))
    assert not list(tmp_path.rglob("model_*-0*.bin"))
