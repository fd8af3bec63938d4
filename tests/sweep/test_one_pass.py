"""One pass over the parents evaluates the merge at every t exactly as the merge made at that t, and
leaves nothing of the merges on disk."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch
from model_helpers import spec_for

from slerp_plugin.engine import plan_resolved
from slerp_plugin.engine.resume import WorkingFolder
from slerp_plugin.io.reader import TensorReader
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


@pytest.mark.parametrize(("fixture", "at_once"), [("demo_bf16", 3), ("demo_fp32_tied", 3), ("demo_bf16", 2)])
def test_every_t_equals_the_merge_made_at_it(fixture, at_once, request, tmp_path, monkeypatch):
    """Every t merged in one read of each shard's inputs, or (``method.disk_budget`` for two work
    shards) two t per read."""
    pair = request.getfixturevalue(fixture)
    opened = []  # how each work shard's file was opened: new at first, then over the pages of one evaluated
    reuse = ShardWriter._reuse_scratch
    monkeypatch.setattr(ShardWriter, "_reuse_scratch", lambda self: opened.append(reuse(self)) or opened[-1])
    read = []  # the merge's reads of the parents: each byte once for the t merged at once
    read_aligned = TensorReader.read_aligned
    monkeypatch.setattr(TensorReader, "read_aligned",
                        lambda self, info, start, nbytes, *a: read.append(nbytes) or read_aligned(
                            self, info, start, nbytes, *a))
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
    if at_once < len(ts):
        budget = at_once * max(s.nbytes for s in base.shards) + 1
        base = replace(base, spec=base.spec.model_copy(update={"disk_budget": budget}))
    found = OnePass(base, ts, tmp_path / "work", SETTINGS, ids, ("model_1", "model_2")).run()
    read_in_pass = sum(read)
    assert journalled == []
    for m in found.merges:
        merged = run_merge(spec_for(pair, tmp_path / f"merged-{m.t}", t=m.t, device="cpu")).output
        assert m.problem is None
        assert m.evaluation.perplexity == pytest.approx(perplexity(merged, ids), rel=1e-5)
        assert sum(m.branch_counts.values()) == sum(len(s.jobs) for s in base.shards)
    for role, folder in zip(("model_1", "model_2"), pair, strict=True):
        assert found.parents[role].perplexity == pytest.approx(perplexity(folder, ids), rel=1e-5)
    once = sum(j.a.nbytes + j.b.nbytes for s in base.shards for j in s.jobs)
    assert found.bytes_read == once and read_in_pass == once * -(-len(ts) // at_once)
    left = [p for p in (tmp_path / "work").rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin")]
    assert not left  # every work shard deleted once evaluated, every copy kept aside too
    # the first work shards merged at once are new files; each later one is written over one evaluated
    assert opened == [os.O_TRUNC] * at_once + [0] * (len(ts) * len(base.shards) - at_once)


def test_a_disk_budget_below_one_work_shard_is_refused(demo_bf16, tmp_path):
    from slerp_plugin.errors import ConfigError
    from slerp_plugin.sweep.one_pass import SWEEP_T_AT_ONCE, t_at_once

    spec = spec_for(demo_bf16, tmp_path / "work" / "t-0.5", t=0.5, max_shard_size="40KB", device="cpu")
    base = plan_resolved(spec, execution=True)
    largest = max(s.nbytes for s in base.shards)
    assert t_at_once(base, 20, hub=False) == SWEEP_T_AT_ONCE
    assert t_at_once(base, 3, hub=False) == 3
    with_budget = replace(base, spec=base.spec.model_copy(update={"disk_budget": 5 * largest}))
    assert t_at_once(with_budget, 20, hub=False) == 5
    assert t_at_once(with_budget, 20, hub=True) < 5  # the inputs of two shards are spooled beside
    too_small = replace(base, spec=base.spec.model_copy(update={"disk_budget": largest - 1}))
    with pytest.raises(ConfigError, match="method.disk_budget: .* less than a sweep needs for one t"):
        t_at_once(too_small, 3, hub=False)
