"""Every crash point of a local sharded merge: stop the command at each step of the output protocol,
by an exception and by SIGKILL, run it again, and get the uninterrupted run's result without any
manual step and without losing anything the user had."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from crash_harness import Harness, crash_points, expected_stop
from model_helpers import folder_bytes, seed_args

from slerp_plugin.formats.manifest import MANIFEST_NAME

# the steps every kind of step of the protocol must show up as (the harness must reach them all)
PROTOCOL = ["create .merged.partial.new-", "rename .slerp_merge.json", "plan.json", "config.json",
            "create model-00001-of-", "fsync model-00001-of-", "rename model-00001-of-",
            "model-00001-of-00003.safetensors.json", "model.safetensors.index.json", "copy tokenizer.json",
            "merge_manifest.json", "write README.md", "remove merged.partial/.slerp_state",
            "fsync folder merged.partial", "rename merged.partial to merged"]


def merge_args(pair, out: Path, *extra: str) -> list[str]:
    return seed_args(pair, "method.t=0.4", f"+method.model_save_path={out}", "+method.max_shard_size=100KB",
                     "+method.chunk_elements=4096", *extra)


def result_of(out: Path) -> dict[str, bytes]:
    """The merge's files; in the manifest, the output's own path made relative and what differs
    between runs (times, reuse counts, the plan's fingerprint, which covers the path) left out."""
    files = folder_bytes(out)
    manifest = json.loads(files.pop(MANIFEST_NAME).decode().replace(str(out.parent), "<root>"))
    for run_specific in ("created_at", "timings", "resume", "plan_fingerprint"):
        manifest.pop(run_specific)
    manifest["spec"].pop("overwrite")
    files[MANIFEST_NAME] = json.dumps(manifest, sort_keys=True).encode()
    files.pop("README.md")  # the model card shows the timings
    return files


def leftovers(parent: Path) -> list[str]:
    """What is beside the output, but for Hydra's run logs (``outputs/``) and the harness's."""
    return sorted(p.name for p in parent.iterdir()
                  if p.name not in ("merged", "outputs") and not p.name.startswith(".harness"))


def user_files(parent: Path) -> dict[str, bytes]:
    keep = parent / "notes"
    keep.mkdir()
    (keep / "mine.txt").write_text("the user's own file")
    (parent / "mine.txt").write_text("another")
    return {**{f"notes/{k}": v for k, v in folder_bytes(keep).items()}, "mine.txt": b"another"}


@pytest.fixture(scope="module")
def clean_run(demo_bf16, tmp_path_factory):
    """The uninterrupted run: its result and the steps it passed."""
    root = tmp_path_factory.mktemp("clean")
    harness = Harness(merge_args(demo_bf16, root / "merged"), root)
    outcome, steps = harness.steps()
    assert outcome.code == 0, outcome.output
    return result_of(root / "merged"), steps


def test_the_harness_reaches_every_kind_of_step(clean_run):
    _, steps = clean_run
    for kind in PROTOCOL:
        assert any(kind in s for s in steps), (kind, steps)
    assert len(steps) >= 40


@pytest.mark.parametrize("mode", ["raise", "kill"])
def test_stopped_at_any_step_the_same_command_finishes_bit_identical(demo_bf16, clean_run, tmp_path, mode):
    reference, steps = clean_run
    failures = []
    for n in crash_points(steps):
        root = tmp_path / f"step-{n}"
        root.mkdir()
        mine = user_files(root)
        out = root / "merged"
        harness = Harness(merge_args(demo_bf16, out), root)
        stopped = harness.run(at=n, mode=mode)
        want = expected_stop(mode)
        assert (stopped.code == want) if want else stopped.code != 0, (n, steps[n - 1], stopped.output)
        again = harness.run()
        if again.code != 0:
            last = again.output.strip().splitlines()[-1]
            failures.append(f"step {n} ({steps[n - 1]}): rerun failed: {last}")
            continue
        if result_of(out) != reference:
            failures.append(f"step {n} ({steps[n - 1]}): result differs")
        if leftovers(root) != ["mine.txt", "notes"]:
            failures.append(f"step {n} ({steps[n - 1]}): left {leftovers(root)}")
        got = {**{f"notes/{k}": v for k, v in folder_bytes(root / 'notes').items()},
               "mine.txt": (root / "mine.txt").read_bytes()}
        assert got == mine, n
    assert not failures, "\n".join(failures)


def test_stopped_while_replacing_an_earlier_merge(demo_bf16, clean_run, tmp_path):
    """overwrite=true: a crash while the earlier merge is moved aside, the new one renamed in and
    the earlier one removed; the rerun finishes with the new merge and leaves no stray copies."""
    reference, _ = clean_run

    def with_earlier_merge(root: Path) -> Harness:
        root.mkdir()
        out = root / "merged"
        assert Harness(merge_args(demo_bf16, out, "method.t=0.7"), root).run().code == 0
        return Harness(merge_args(demo_bf16, out, "+method.overwrite=true"), root)

    _, steps = with_earlier_merge(tmp_path / "steps").steps()
    kinds = ("move the earlier", "rename merged.partial to", "remove merged.replaced")
    last = [i + 1 for i, s in enumerate(steps) if s.startswith(kinds)]
    assert len(last) >= 4, steps  # moved aside, renamed in, the earlier one removed, its marker last
    for n in range(min(last) - 1, len(steps) + 1):
        root = tmp_path / f"step-{n}"
        harness = with_earlier_merge(root)
        stopped = harness.run(at=n, mode="kill")
        assert stopped.code == -9, (n, stopped.output)
        assert harness.run().code == 0
        assert result_of(root / "merged") == reference, n
        assert leftovers(root) == [], (n, leftovers(root))
