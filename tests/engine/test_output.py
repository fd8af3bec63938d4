"""Where a merge writes: nothing it did not make is ever replaced or deleted; overwrite replaces only
an earlier merge of the same output; two merges never write one output at once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from model_helpers import ROOT, folder_bytes, run_cli, seed_args, spec_for

from slerp_plugin.engine.output import carries_marker, lock_path
from slerp_plugin.errors import OutputExistsError, OutputLockedError
from slerp_plugin.formats.manifest import MANIFEST_NAME
from slerp_plugin.io.model_files import OUTPUT_MARKER
from slerp_plugin.merge import plan_merge, run_merge


def test_an_existing_folder_is_kept_with_or_without_overwrite(demo_bf16, tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "precious.txt").write_text("user data")
    with pytest.raises(OutputExistsError, match="already exists"):
        run_merge(spec_for(demo_bf16, out))
    with pytest.raises(OutputExistsError, match="not a merge slerp-merge made for this path"):
        run_merge(spec_for(demo_bf16, out, overwrite=True))
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_overwrite_replaces_an_earlier_merge_of_this_output_only(demo_bf16, tmp_path):
    out = tmp_path / "m"
    run_merge(spec_for(demo_bf16, out, t=0.2))
    assert carries_marker(out, out.resolve(), "complete")
    run_merge(spec_for(demo_bf16, out, t=0.7, overwrite=True))
    assert json.loads((out / MANIFEST_NAME).read_text())["spec"]["t"] == 0.7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # the earlier merge moved aside and deleted
    moved = tmp_path / "moved"
    shutil.move(out, moved)  # a merge made for another path is not ours to replace here
    (tmp_path / "m").mkdir()
    shutil.copytree(moved, tmp_path / "m" / "copy")
    with pytest.raises(OutputExistsError, match="never replaced"):
        run_merge(spec_for(demo_bf16, tmp_path / "m" / "copy", t=0.4, overwrite=True))
    assert json.loads((tmp_path / "m" / "copy" / MANIFEST_NAME).read_text())["spec"]["t"] == 0.7


def test_the_same_merge_again_finds_it_finished_and_another_is_refused(demo_bf16, tmp_path):
    """A re-run of a merge that finished (e.g. after a crash just past the final rename, or an
    Airflow retry) succeeds without merging again; a different merge into it is still refused."""
    out = tmp_path / "m"
    first = run_merge(spec_for(demo_bf16, out, t=0.2))
    before = folder_bytes(out)
    plan = plan_merge(spec_for(demo_bf16, out, t=0.2))
    assert plan.finished_earlier
    again = run_merge(spec_for(demo_bf16, out, t=0.2))
    assert again.manifest == first.manifest and folder_bytes(out) == before
    with pytest.raises(OutputExistsError, match="already exists"):
        run_merge(spec_for(demo_bf16, out, t=0.3))
    (out / "extra.txt").write_text("the user's")  # still ours and still this merge: kept as it is
    assert run_merge(spec_for(demo_bf16, out, t=0.2)).output == out.resolve()
    assert (out / "extra.txt").read_text() == "the user's"


def test_a_partial_left_unmarked_by_an_earlier_version_is_adopted(demo_bf16, tmp_path):
    """Earlier versions made ``.partial/.slerp_state/shards`` before the marker; a crash between
    left exactly that (and perhaps the marker's temporary file), which is ours to take over."""
    out = tmp_path / "m"
    partial = tmp_path / "m.partial"
    (partial / ".slerp_state" / "shards").mkdir(parents=True)
    (partial / f"{OUTPUT_MARKER}.4242.tmp").write_text('{"tool": "slerp_plugin"')
    run_merge(spec_for(demo_bf16, out))
    assert (out / MANIFEST_NAME).is_file() and not partial.exists()
    partial.mkdir()
    (partial / ".slerp_state").mkdir()
    (partial / ".slerp_state" / "notes.txt").write_text("not ours")  # anything more is not adopted
    with pytest.raises(OutputExistsError, match="not an unfinished merge"):
        run_merge(spec_for(demo_bf16, tmp_path / "m"))
    assert (partial / ".slerp_state" / "notes.txt").read_text() == "not ours"


def test_working_folders_a_crash_left_under_their_staging_name_are_removed_if_ours(demo_bf16, tmp_path):
    from slerp_plugin.engine.output import write_marker

    out = tmp_path / "m"
    ours = tmp_path / ".m.partial.new-4242"  # marked: a crash just before the rename into place
    ours.mkdir()
    write_marker(ours, out.resolve(), "partial")
    begun = tmp_path / ".m.partial.new-4343"  # a crash before the marker was renamed in
    begun.mkdir()
    (begun / f"{OUTPUT_MARKER}.4343.tmp").write_text("{")
    foreign = tmp_path / ".m.partial.new-4444"  # the same name pattern, but not ours
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    run_merge(spec_for(demo_bf16, out))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m.partial.new-4444", "m"]
    assert (foreign / "notes.txt").read_text() == "mine"


def test_an_empty_folder_is_taken_over(demo_bf16, tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    run_merge(spec_for(demo_bf16, out))
    assert (out / MANIFEST_NAME).is_file() and (out / OUTPUT_MARKER).is_file()


def test_output_inside_an_input_is_refused(demo_bf16):
    with pytest.raises(OutputExistsError, match="overlaps"):
        plan_merge(spec_for(demo_bf16, demo_bf16[0] / "merged"))


def test_an_input_in_the_outputs_partial_folder_is_never_touched(demo_bf16, tmp_path):
    """model_1 is a finished merge that sits in ``X.partial``; the output is ``X``."""
    first = tmp_path / "X.partial"
    run_merge(spec_for(demo_bf16, first))
    before = folder_bytes(first)
    with pytest.raises(OutputExistsError, match="overlaps the model_1 folder"):
        run_merge(spec_for((first, demo_bf16[1]), tmp_path / "X"))
    assert folder_bytes(first) == before and not (tmp_path / "X").exists()


def test_the_working_directory_is_never_the_output(demo_bf16, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    r = run_cli(seed_args(demo_bf16, "+method.model_save_path=.", "method.overwrite=true"), cwd=tmp_path)
    assert r.returncode == 4 and "is the current directory" in r.stderr, r.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "outputs"]  # Hydra's run log only
    r = run_cli(seed_args(demo_bf16, f"+method.model_save_path={tmp_path.parent}", "method.overwrite=true"),
                cwd=tmp_path)
    assert r.returncode == 4 and "current directory or holds it" in r.stderr, r.stderr


HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from slerp_plugin.engine.output import output_lock
    lock = output_lock(Path(sys.argv[1]), exclusive=True, wait=False, what="slerp-merge")
    print("held", flush=True)
    time.sleep(60)
""")


def test_a_second_merge_into_a_locked_output_fails_at_once_naming_the_holder(demo_bf16, tmp_path):
    out = (tmp_path / "m").resolve()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        holder_text = f"locked by process {holder.pid} on host .* \\(slerp-merge\\)"
        with pytest.raises(OutputLockedError, match=holder_text):
            run_merge(spec_for(demo_bf16, out))
        r = run_cli(seed_args(demo_bf16, f"+method.model_save_path={out}"), cwd=tmp_path)
        errors = [x for x in r.stderr.splitlines() if x.startswith("slerp-merge: error:")]
        assert r.returncode == 4 and len(errors) == 1 and f"process {holder.pid}" in errors[0]
        assert not out.exists() and not (tmp_path / "m.partial").exists()
    finally:
        holder.kill()
        holder.wait()
    run_merge(spec_for(demo_bf16, out))  # the kernel released the dead holder's lock
    assert not lock_path(out).exists()


def test_shard_temporary_files_are_named_per_process(tmp_path):
    from slerp_plugin.io.safetensors import OutputTensor
    from slerp_plugin.io.writer import ShardWriter

    writer = ShardWriter(tmp_path / "s.safetensors", [OutputTensor("x", "U8", (1,))])
    assert writer.tmp.name.startswith(f"s.safetensors.{os.getpid()}-") and writer.tmp.suffix == ".tmp"
    assert ShardWriter(tmp_path / "s.safetensors", []).tmp != writer.tmp


def test_the_documentation_states_the_rules():
    guide = (ROOT / "docs" / "outputs.md").read_text()
    for rule in ("carries this tool's marker", "never an input", "never the working directory",
                 "replaces only an earlier merge", "locked"):
        assert rule in guide, rule
    assert "carries this tool's marker" in (ROOT / "README.md").read_text()
