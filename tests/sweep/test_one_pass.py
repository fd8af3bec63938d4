"""One pass over the parents evaluates the merge at every t exactly as the merge made at that t, and
leaves nothing of the merges on disk."""

from __future__ import annotations

import os

import pytest
import torch
from model_helpers import spec_for

from slerp_plugin.engine import plan_resolved
from slerp_plugin.engine.resume import WorkingFolder
from slerp_plugin.io.writer import ShardWriter
from slerp_plugin.merge import run_merge
from slerp_plugin.sweep.one_pass import OnePass
from slerp_plugin.validate import EvalSettings
from slerp_plugin.validate.functional import eval_tokens
from slerp_plugin.validate.streaming import StreamedCausalLM

CPU = torch.device("cpu")
SETTINGS = EvalSettings(max_tokens=200, max_length=128)


def perplexity(folder, ids):
    with StreamedCausalLM(folder, CPU) as model:
        return model.perplexity(ids, SETTINGS.max_length)


@pytest.mark.parametrize("fixture", ["demo_bf16", "demo_fp32_tied"])
def test_every_t_equals_the_merge_made_at_it(fixture, request, tmp_path, monkeypatch):
    pair = request.getfixturevalue(fixture)
    opened = []  # how each work shard's file was opened: written over the last one's pages after the first
    reuse = ShardWriter._reuse_scratch
    monkeypatch.setattr(ShardWriter, "_reuse_scratch", lambda self: opened.append(reuse(self)) or opened[-1])
    journalled = []  # nothing resumes from a work shard
    journal = WorkingFolder.journal
    monkeypatch.setattr(WorkingFolder, "journal",
                        lambda self, shard, done: journalled.append(shard) or journal(self, shard, done))
    spec = spec_for(pair, tmp_path / "work" / "t-0.2", t=0.2, max_shard_size="40KB", direct_io=False,
                    device="cpu")
    base = plan_resolved(spec, execution=True)
    assert len(base.shards) > 3  # the embedding, the layers and the head in shards of their own
    _, ids = eval_tokens(pair[0], SETTINGS)
    ts = (0.2, 0.5, 0.9)
    found = OnePass(base, ts, tmp_path / "work", SETTINGS, ids, ("model_1", "model_2")).run()
    assert journalled == []
    for m in found.merges:
        merged = run_merge(spec_for(pair, tmp_path / f"merged-{m.t}", t=m.t, device="cpu")).output
        assert m.problem is None
        assert m.evaluation.perplexity == pytest.approx(perplexity(merged, ids), rel=1e-5)
        assert sum(m.branch_counts.values()) == sum(len(s.jobs) for s in base.shards)
    for role, folder in zip(("model_1", "model_2"), pair, strict=True):
        assert found.parents[role].perplexity == pytest.approx(perplexity(folder, ids), rel=1e-5)
    assert found.bytes_read == sum(j.a.nbytes + j.b.nbytes for s in base.shards for j in s.jobs)
    left = [p for p in (tmp_path / "work").rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin")]
    assert not left  # every work shard deleted once evaluated, every copy kept aside too
    assert opened == [os.O_TRUNC] + [0] * (len(ts) * len(base.shards) - 1)
