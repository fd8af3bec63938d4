"""Every crash point of a streaming merge against the test Hub (spool, merge, upload, upload
record, delete, publish files, commit, clean-up): stopped there by an exception and by SIGKILL,
the same command again publishes the uninterrupted run's weights and leaves nothing behind."""

from __future__ import annotations

from pathlib import Path

import pytest
from crash_harness import Harness, crash_points, expected_stop
from model_helpers import seed_args
from test_pipeline import assert_same_weights, local_result, published

from slerp_plugin.hub import client as H

SHARD = "200KB"
PROTOCOL = ["create .streamed.partial.new-", "clear streamed.partial/spool", "spool ",
            "rename model-00001-of-", "upload model-00001-of-", "model-00001-of-00002.safetensors.hub.json",
            "delete the uploaded", "create streamed.partial/publish", "merge_manifest.json", "commit to org/",
            "remove streamed.partial"]
PUBLISHED = ("config.json", "model.safetensors.index.json", "tokenizer.json")


@pytest.fixture
def parents(hub, demo_bf16):
    return (H.upload_folder(demo_bf16[0], "org/parent-a").commit,
            H.upload_folder(demo_bf16[1], "org/parent-b").commit)


def stream_args(root: Path, repo: str) -> list[str]:
    # the gate evaluates on 64 tokens: what a crash may break is the same for any number
    return seed_args(("org/parent-a", "org/parent-b"), "method.t=0.3", "method.stream=true",
                     f"method.max_shard_size={SHARD}", f"method.model_save_path={root / 'streamed'}",
                     "method.gate_max_tokens=64", f"+push_to_hub={repo}")


# one class per way of stopping and storage of the Hub: parallel workers take a class each
class TestRaisedLfs:
    @pytest.mark.parametrize("hub_storage", ["lfs"])
    def test_stopped_at_any_step_the_same_command_publishes_the_same_model(self, hub, parents, demo_bf16,
                                                                           tmp_path):
        stopped_at_every_step(hub, demo_bf16, tmp_path, "raise")


class TestRaisedXet:
    @pytest.mark.parametrize("hub_storage", ["xet"])
    def test_stopped_at_any_step_the_same_command_publishes_the_same_model(self, hub, parents, demo_bf16,
                                                                           tmp_path):
        stopped_at_every_step(hub, demo_bf16, tmp_path, "raise")


class TestKilledLfs:
    @pytest.mark.parametrize("hub_storage", ["lfs"])
    def test_stopped_at_any_step_the_same_command_publishes_the_same_model(self, hub, parents, demo_bf16,
                                                                           tmp_path):
        stopped_at_every_step(hub, demo_bf16, tmp_path, "kill")


class TestKilledXet:
    @pytest.mark.parametrize("hub_storage", ["xet"])
    def test_stopped_at_any_step_the_same_command_publishes_the_same_model(self, hub, parents, demo_bf16,
                                                                           tmp_path):
        stopped_at_every_step(hub, demo_bf16, tmp_path, "kill")


def stopped_at_every_step(hub, demo_bf16, tmp_path: Path, mode: str) -> None:
    """The command stopped the ``mode`` way at each step in turn, then run again, publishes what the
    uninterrupted run published and leaves nothing behind."""
    expected = local_result(demo_bf16, tmp_path, max_shard_size=SHARD)
    clean = tmp_path / "clean"
    clean.mkdir()
    outcome, steps = Harness(stream_args(clean, "org/clean"), clean).steps()
    assert outcome.code == 0, outcome.output
    for kind in PROTOCOL:
        assert any(kind in s for s in steps), (kind, steps)
    assert_same_weights(expected, published("org/clean", tmp_path))
    assert any(name.endswith(".safetensors") for name in head_files(hub, "org/clean"))

    failures = []
    for n in crash_points(steps):
        root = tmp_path / f"step-{n}"
        root.mkdir()
        repo = f"org/merged-{n}"
        harness = Harness(stream_args(root, repo), root)
        stopped = harness.run(at=n, mode=mode)
        want = expected_stop(mode)
        if not (stopped.code == want if want else stopped.code != 0):
            # the steps of the three stages interleave differently from run to run: a run may
            # reach fewer steps than the first one did, and then it finishes
            assert stopped.code == 0 and n > len(steps) - 6, (n, stopped.output)
        again = harness.run()
        if again.code != 0:
            last = again.output.strip().splitlines()[-1]
            failures.append(f"step {n} ({steps[n - 1]}): rerun failed: {last}")
            continue
        if head_files(hub, repo) != head_files(hub, "org/clean"):
            failures.append(f"step {n} ({steps[n - 1]}): published files differ")
        left = sorted(p.name for p in root.iterdir() if p.name not in ("outputs", "check-cache")
                      and not p.name.startswith(".harness"))
        if left:
            failures.append(f"step {n} ({steps[n - 1]}): left {left}")
    assert not failures, "\n".join(failures)


def head_files(hub, repo: str) -> dict[str, str]:
    """The SHA-256 of the weights and of the files that describe them, at the head of ``repo``."""
    files = hub.state.repos[repo].resolve("main").files
    return {name: e.sha256 for name, e in files.items() if name.endswith(".safetensors") or name in PUBLISHED}
