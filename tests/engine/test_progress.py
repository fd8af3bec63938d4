"""The progress bar of a merge: shown when asked or on a terminal, counting output bytes."""

from __future__ import annotations

import io

from model_helpers import spec_for

from slerp_plugin.engine.progress import progress_bar
from slerp_plugin.merge import plan_merge


def test_no_bar_unless_asked_or_on_a_terminal(demo_bf16, tmp_path, monkeypatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())  # not a terminal
    assert progress_bar(plan_merge(spec_for(demo_bf16, tmp_path / "m")), "merging") is None


def test_the_bar_counts_the_plan_s_output_bytes_under_its_label(demo_bf16, tmp_path, monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    plan = plan_merge(spec_for(demo_bf16, tmp_path / "m", show_pbar=True))
    bar = progress_bar(plan, "streaming")
    assert bar is not None and bar.total == plan.total_bytes > 0
    bar.update(plan.total_bytes)
    bar.close()
    assert "streaming" in err.getvalue() and "100%" in err.getvalue()
