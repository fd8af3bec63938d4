"""Crash and resume: kill -9 at any point, re-run, get a bit-identical result."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from model_helpers import folder_bytes

from slerp_plugin.formats.manifest import MANIFEST_NAME, Manifest
from slerp_plugin.merge import run_merge
from slerp_plugin.spec import MergeSpec

CRASHER = textwrap.dedent(
    """
    import os, signal, sys
    from slerp_plugin import merge
    from slerp_plugin.engine import finish
    from slerp_plugin.io import writer as checkpoint
    from slerp_plugin.spec import MergeSpec

    spec = MergeSpec.model_validate_json(sys.argv[1])
    where, limit = sys.argv[2], int(sys.argv[3])
    if where == "bytes":
        original = checkpoint.ShardWriter.write
        seen = [0]
        def write(self, data):
            original(self, data)
            seen[0] += memoryview(data).nbytes
            if seen[0] >= limit:
                os.kill(os.getpid(), signal.SIGKILL)
        checkpoint.ShardWriter.write = write
    elif where == "publish":
        finish.move_into_place = lambda plan: os.kill(os.getpid(), signal.SIGKILL)
    merge.run_merge(spec)
    """
)


def spec_for(pair, out, **kw):
    return MergeSpec.build(model_1=str(pair[0]), model_2=str(pair[1]), t=0.4, output=str(out),
                           max_shard_size="100KB", chunk_elements=4096, **kw)


def without_manifest(files):
    return {k: v for k, v in files.items() if k != MANIFEST_NAME}


@pytest.fixture(scope="module")
def reference(demo_bf16, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "merged"
    run_merge(spec_for(demo_bf16, out))
    return out


@pytest.mark.parametrize(
    "where,limit",
    [("bytes", 1), ("bytes", 60_000), ("bytes", 150_000), ("bytes", 250_000), ("publish", 0)],
)
def test_kill_9_then_resume_is_bit_identical(demo_bf16, reference, tmp_path, where, limit):
    out = tmp_path / "merged"
    spec = spec_for(demo_bf16, out)
    r = subprocess.run([sys.executable, "-c", CRASHER, spec.model_dump_json(), where, str(limit)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == -9, r.stderr
    assert not out.exists(), "a complete-looking output exists after the crash"
    assert (tmp_path / "merged.partial").is_dir()
    finished_before = (
        Manifest.read(tmp_path / "merged.partial").created_at if where == "publish" else None
    )

    result = run_merge(spec)
    assert without_manifest(folder_bytes(out)) == without_manifest(folder_bytes(reference))
    got, want = Manifest.read(out), Manifest.read(reference)
    assert got.output == want.output and got.tensors == want.tensors
    reused = got.resume["reused_shards"]
    if where == "publish":  # finalize had finished: the re-run only renames, manifest as written
        assert reused == 0 and got.created_at == finished_before
    elif limit == 1:
        assert reused == 0
    elif limit >= 150_000:
        assert 1 <= reused < len(got.output.shards)
    assert not (tmp_path / "merged.partial").exists()
    assert result.output == out.resolve()


def test_corrupted_journalled_shard_is_merged_again(demo_bf16, reference, tmp_path):
    from slerp_plugin.engine import merge_shards
    from slerp_plugin.merge import plan_merge

    out = tmp_path / "merged"
    spec = spec_for(demo_bf16, out)
    plan = plan_merge(spec)
    merge_shards(plan, [0, 1])
    shard = tmp_path / "merged.partial" / plan.shards[1].file
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    run_merge(spec)
    assert Manifest.read(out).resume["reused_shards"] == 1
    assert without_manifest(folder_bytes(out)) == without_manifest(folder_bytes(reference))


def test_partial_of_a_different_merge_is_discarded(demo_bf16, reference, tmp_path):
    from slerp_plugin.engine import merge_shards
    from slerp_plugin.merge import plan_merge

    out = tmp_path / "merged"
    merge_shards(plan_merge(spec_for(demo_bf16, out, DOT_THRESHOLD=0.5)), [0, 1])
    run_merge(spec_for(demo_bf16, out))
    assert Manifest.read(out).resume["reused_shards"] == 0
    assert without_manifest(folder_bytes(out)) == without_manifest(folder_bytes(reference))


def test_foreign_partial_folder_is_not_deleted(demo_bf16, tmp_path):
    from slerp_plugin.errors import OutputExistsError

    partial = tmp_path / "merged.partial"
    partial.mkdir()
    (partial / "notes.txt").write_text("not ours")
    with pytest.raises(OutputExistsError, match="is not an unfinished merge of"):
        run_merge(spec_for(demo_bf16, tmp_path / "merged"))
    assert (partial / "notes.txt").read_text() == "not ours"


ORPHAN = textwrap.dedent("""
    import sys, time
    from slerp_plugin.merge import plan_merge
    from slerp_plugin.engine.resume import WorkingFolder
    from slerp_plugin.spec import MergeSpec
    plan = plan_merge(MergeSpec.model_validate_json(sys.argv[1]))
    with WorkingFolder(plan).lock(plan.shards[0]):
        print("writing", flush=True)
        time.sleep(float(sys.argv[2]))
""")


def test_a_retry_waits_for_an_orphaned_attempt_instead_of_racing_it(demo_bf16, reference, tmp_path):
    """An Airflow retry (a worker lost, its task process still running) shares the output with the
    orphan; each shard is written under its own lock, so the retry waits for the orphan's shard."""
    import time

    from slerp_plugin.engine import finalize, merge_shards, prepare
    from slerp_plugin.merge import plan_merge

    out = tmp_path / "merged"
    spec = spec_for(demo_bf16, out)
    plan = plan_merge(spec)
    prepare(plan)
    orphan = subprocess.Popen([sys.executable, "-c", ORPHAN, spec.model_dump_json(), "2"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert orphan.stdout.readline().strip() == "writing"
        started = time.monotonic()
        merge_shards(plan_merge(spec), [0, 1], wait=True)
        assert time.monotonic() - started >= 1.5  # waited for the orphan's lock on shard 0
    finally:
        orphan.wait(timeout=60)
    merge_shards(plan, wait=True)
    finalize(plan, wait=True)
    assert without_manifest(folder_bytes(out)) == without_manifest(folder_bytes(reference))
