"""The preflight: parents' sizes, disk, memory and time before anything is downloaded; a local merge
that cannot fit on disk refused up front; ``slerp-merge plan``."""

from __future__ import annotations

import functools
import json
import re
from collections import namedtuple
from pathlib import Path

import pytest
from model_helpers import spec_for

from slerp_plugin import preflight
from slerp_plugin.cli.main import main
from slerp_plugin.errors import OutputWriteError
from slerp_plugin.hub.client import upload_folder
from slerp_plugin.spec import MergeSpec

ROOT = Path(__file__).resolve().parents[1]
Usage = namedtuple("Usage", "total used free")


def _weights(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def test_local_parents_need_only_the_output(demo_bf16, tmp_path):
    spec = MergeSpec.build(model_1=str(demo_bf16[0]), model_2=str(demo_bf16[1]), t=0.3,
                           output=str(tmp_path / "o"), push_to_hub="org/out")
    est = preflight.estimate(spec, download_bps=1e6, upload_bps=2e6, merge_bps=4e6)
    sizes = [_weights(d) for d in demo_bf16]
    assert [p.size for p in est.parents] == sizes and all(p.to_download == 0 for p in est.parents)
    assert [p.files for p in est.parents] == [len(list(d.glob("*.safetensors"))) for d in demo_bf16]
    assert est.output_bytes == sizes[0]  # stored in model_1's dtype
    assert est.memory_bytes == preflight.BASE_MEMORY + spec.buffer_memory
    assert est.download_s == 0 and est.merge_s == pytest.approx(sizes[0] / 4e6)
    assert est.upload_s == pytest.approx(sizes[0] / 2e6)
    assert est.sequential_s == pytest.approx(est.merge_s + est.upload_s)
    (disk,) = est.disk.values()
    assert disk["needed"] == sizes[0] + preflight.DISK_MARGIN and not est.problems
    assert any(line.startswith("time: ") for line in est.lines())


def test_a_stored_dtype_changes_the_output_size(demo_bf16, tmp_path):
    spec = MergeSpec.build(model_1=str(demo_bf16[0]), model_2=str(demo_bf16[1]), t=0.3,
                           output=str(tmp_path / "o"), dtype="float32")
    assert preflight.estimate(spec).output_bytes == 2 * _weights(demo_bf16[0])


def test_a_merge_that_does_not_fit_is_refused_before_anything_is_written(demo_bf16, tmp_path, monkeypatch):
    from slerp_plugin import run_merge

    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 1000, 1000))
    out = tmp_path / "o"
    spec = MergeSpec.build(model_1=str(demo_bf16[0]), model_2=str(demo_bf16[1]), t=0.3, output=str(out))
    with pytest.raises(OutputWriteError, match=r"^not enough disk space: .* needs .* GB for a local merge, "
                                               r"0.00 GB free \(nothing was downloaded or written"):
        run_merge(spec)
    assert not out.exists() and not out.with_name("o.partial").exists()


def test_finished_shards_of_an_interrupted_run_count_as_written(demo_bf16, tmp_path):
    out = tmp_path / "o"
    partial = out.with_name("o.partial")
    partial.mkdir()
    (partial / "model-00001-of-00002.safetensors").write_bytes(b"x" * 1000)
    spec = MergeSpec.build(model_1=str(demo_bf16[0]), model_2=str(demo_bf16[1]), t=0.3, output=str(out))
    (disk,) = preflight.estimate(spec).disk.values()
    assert disk["needed"] == _weights(demo_bf16[0]) - 1000 + preflight.DISK_MARGIN


def test_hub_parents_count_what_is_not_in_the_cache_yet(hub, demo_bf16, tmp_path):
    from slerp_plugin.hub.client import download_model

    commit = upload_folder(demo_bf16[0], "org/a").commit
    upload_folder(demo_bf16[1], "org/b")
    spec = MergeSpec.build(model_1="org/a", model_2="org/b", t=0.3, output=str(tmp_path / "o"))
    est = preflight.estimate(spec, download_bps=1e6)
    first = est.parents[0]
    assert first.revision == commit[:12] and first.size == _weights(demo_bf16[0])
    assert first.to_download > first.size  # weights, index and configs
    assert est.download_s == pytest.approx(sum(p.to_download for p in est.parents) / 1e6)
    download_model("org/a")
    again = preflight.estimate(spec)
    assert again.parents[0].to_download == 0 and again.parents[1].to_download == est.parents[1].to_download
    assert again.parents[0].dtype == "bfloat16"


def test_streaming_needs_its_budget_and_takes_the_slowest_stage(hub, demo_bf16, tmp_path, monkeypatch):
    upload_folder(demo_bf16[0], "org/a")
    upload_folder(demo_bf16[1], "org/b")
    spec = MergeSpec.build(model_1="org/a", model_2="org/b", t=0.3, output=str(tmp_path / "o"),
                           max_shard_size="100KB", push_to_hub="org/m")
    est = preflight.estimate(spec, download_bps=1e6, upload_bps=1e5)
    weights = sum(p.size for p in est.parents)
    # three 100 kB shards in flight, each with the parents' bytes it is made of
    assert est.stream_disk_bytes == int(3 * 100_000 * (1 + weights / est.output_bytes))
    assert est.stream_s == pytest.approx(max(weights / 1e6, est.merge_s, est.output_bytes / 1e5))
    line = "streaming Hub to Hub (method.stream=true): disk 0.00 GB"
    assert any(x.startswith(line) for x in est.lines())
    budgeted = MergeSpec.build(**{**spec.model_dump(), "disk_budget": "5MB"})
    assert preflight.estimate(budgeted).stream_disk_bytes == 5_000_000
    # each connection limited: the stream reads each parent over method.connections of them (auto:
    # as many as still gain, up to 32)
    per = preflight.estimate(spec, download_bps=1e9, upload_bps=1e9, connection_bps=1e4)
    assert per.stream_s == pytest.approx(weights / (2 * 32 * 1e4))
    assert "as many connections as still gain, up to 32 (auto)" in "\n".join(per.lines())
    assert "the stream's up to 64 ranged GETs" in "\n".join(per.lines())
    two = MergeSpec.build(**{**spec.model_dump(), "connections": 2})
    fixed = preflight.estimate(two, download_bps=1e9, upload_bps=1e9, connection_bps=1e4)
    assert fixed.stream_s == pytest.approx(weights / (2 * 2 * 1e4))
    assert "each parent read over 2 connection(s), method.connections" in "\n".join(fixed.lines())
    assert "each connection at most 0.01 MB/s" in "\n".join(per.lines())
    # a local merge of Hub parents that does not fit suggests streaming
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(OutputWriteError, match=r"or stream Hub to Hub with method.stream=true "
                                               r"\+push_to_hub=org/name \(about 0.00 GB of disk\)\)$"):
        preflight.require_disk(spec)


def test_plan_command_prints_the_estimate(demo_bf16, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["plan", f"modelpool.models.model_1={demo_bf16[0]}", f"modelpool.models.model_2={demo_bf16[1]}",
            "method.t=0.3", f"method.model_save_path={tmp_path / 'o'}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"model_1: {demo_bf16[0]}: " in out and "disk at " in out and "time: download 0.0 s" in out
    assert main([*args, "--json", "--download-bandwidth", "10MB"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["parents"][1]["size"] == _weights(demo_bf16[1]) and record["problems"] == []
    assert not any(tmp_path.iterdir())  # nothing written, not even Hydra's run folder


def test_plan_takes_the_config_flags(demo_bf16, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["plan", "--config-path", str(ROOT / "config" / "demo"), "--config-name", "demo_slerp",
            f"modelpool.models.model_1={demo_bf16[0]}", f"modelpool.models.model_2={demo_bf16[1]}"]
    assert main(args) == 0
    assert f"model_2: {demo_bf16[1]}: " in capsys.readouterr().out
    assert main(["plan", "--config-name=demo_slerp", f"--config-path={ROOT / 'config' / 'demo'}",
                 *args[5:]]) == 0
    assert main([*args, "--cfg", "job"]) == 2
    assert "plan: unsupported option --cfg" in capsys.readouterr().err


def test_plan_errors_are_one_line(demo_bf16, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = [f"modelpool.models.model_1={demo_bf16[0]}", f"modelpool.models.model_2={demo_bf16[1]}"]
    assert main(["plan", *base, "method.t=0.3,0.5"]) == 2
    assert "plan takes one merge" in capsys.readouterr().err
    assert main(["plan", *base, "method.t=0.3", "--download-bandwidth", "fast"]) == 2
    assert capsys.readouterr().err.startswith("slerp-merge: error: bandwidth:")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: Usage(10**9, 10**9, 0))
    assert main(["plan", *base, "method.t=0.3"]) == 5
    assert "does not fit: " in capsys.readouterr().out


def test_a_read_only_or_unwritable_output_says_so_not_no_space(demo_bf16, tmp_path, monkeypatch):
    """A read-only filesystem reports 0 bytes free; the refusal names the real cause, and the plan
    command lists it (exit 5) before anything is written."""
    import os

    spec = spec_for(demo_bf16, tmp_path / "out")
    real_statvfs = os.statvfs

    class ReadOnly:
        def __init__(self, st):
            self.st = st

        def __getattr__(self, name):
            return os.ST_RDONLY | self.st.f_flag if name == "f_flag" else getattr(self.st, name)

    monkeypatch.setattr(preflight.os, "statvfs", lambda p: ReadOnly(real_statvfs(p)))
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: Usage(10**9, 10**9, 0))
    with pytest.raises(OutputWriteError, match=rf"^cannot write the merge: {tmp_path} is on a read-only "
                                               "filesystem .*on a writable disk\\)$"):
        preflight.require_disk(spec)
    assert "cannot write: " in "\n".join(preflight.estimate(spec).lines())
    monkeypatch.setattr(preflight.os, "statvfs", real_statvfs)
    monkeypatch.setattr(preflight.os, "access", lambda p, mode: False)
    with pytest.raises(OutputWriteError, match="is not writable by this user \\(permission denied\\)"):
        preflight.require_disk(spec)
    assert list(tmp_path.iterdir()) == []


def test_a_gated_stream_counts_what_the_gate_keeps_aside(demo_fp32_tied, hub, tmp_path):
    """The tied head's table, once per evaluator, and the saved points; told from model_1's config.json,
    which a Hub parent not downloaded yet does not have here."""
    from slerp_plugin.stream.evaluation import aside_estimate

    spec = spec_for(demo_fp32_tied, tmp_path / "o", t=0.3, max_shard_size="100KB")
    table = 4 * 512 * 64  # the demo pair's vocabulary × hidden size, float32
    aside = aside_estimate(spec, demo_fp32_tied[0] / "config.json")
    assert aside > 3 * table
    plain = preflight.estimate(spec)
    est = preflight.estimate(spec, aside=functools.partial(aside_estimate, spec))
    assert est.stream_aside_bytes == aside and est.stream_disk_bytes == plain.stream_disk_bytes + aside
    assert f", {aside / 1e9:.2f} GB of it kept aside by the gate" in "\n".join(est.lines())
    ungated = MergeSpec.build(**{**spec.model_dump(), "gate": False})
    off = preflight.estimate(ungated, aside=functools.partial(aside_estimate, ungated))
    assert off.stream_aside_bytes == 0 and off.stream_disk_bytes == plain.stream_disk_bytes
    untied = json.loads((demo_fp32_tied[0] / "config.json").read_text()) | {"tie_word_embeddings": False}
    (tmp_path / "untied").mkdir()
    (tmp_path / "untied" / "config.json").write_text(json.dumps(untied))
    assert aside_estimate(spec, tmp_path / "untied" / "config.json") == aside - 3 * table
    upload_folder(demo_fp32_tied[0], "org/ta")
    upload_folder(demo_fp32_tied[1], "org/tb")
    remote = MergeSpec.build(model_1="org/ta", model_2="org/tb", t=0.3, output=str(tmp_path / "r"),
                             push_to_hub="org/m")
    est = preflight.estimate(remote, aside=functools.partial(aside_estimate, remote))
    assert est.stream_aside_bytes is None
    assert "the gate's copies kept aside not counted: model_1's config.json is not on this machine" in (
        "\n".join(est.lines()))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    bad = tmp_path / "bad" / "config.json"
    est = preflight.estimate(spec, aside=lambda config: aside_estimate(spec, bad))
    assert est.stream_aside_bytes is None and est.stream_disk_bytes == plain.stream_disk_bytes
    assert re.search(r"not counted: .*bad/config.json: cannot be read", "\n".join(est.lines()))


def test_the_refusal_suggests_a_stream_with_what_its_gate_keeps_aside(demo_fp32_tied, hub, tmp_path,
                                                                       monkeypatch):
    """Hub parents that do not fit: the stream suggested counts the gate's copies where model_1's
    config.json is on this machine, and says they are not counted where it is not."""
    from slerp_plugin.hub.client import download_model
    from slerp_plugin.stream.evaluation import aside_estimate

    upload_folder(demo_fp32_tied[0], "org/sa")
    upload_folder(demo_fp32_tied[1], "org/sb")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 1000, 1000))
    asked = []

    def aside(spec):
        return lambda config: asked.append(config) or aside_estimate(spec, config)

    spec = MergeSpec.build(model_1="org/sa", model_2="org/sb", t=0.3, output=str(tmp_path / "o"))
    suggestion = r"or stream Hub to Hub with method.stream=true \+push_to_hub=org/name \(about [0-9.]+ GB " \
                 r"of disk"
    with pytest.raises(OutputWriteError, match=suggestion + r", more for the gate's copies kept aside\)\)$"):
        preflight.require_disk(spec, aside=aside(spec))
    assert asked == []  # nothing of model_1 is on this machine yet
    download_model("org/sa")
    with pytest.raises(OutputWriteError, match=suggestion + r"\)\)$"):
        preflight.require_disk(spec, aside=aside(spec))
    assert [Path(c).name for c in asked] == ["config.json"]
    ungated = MergeSpec.build(**{**spec.model_dump(), "gate": False})
    budgeted = MergeSpec.build(**{**spec.model_dump(), "disk_budget": "5GB"})  # the copies within it
    for other, disk in ((ungated, r"[0-9.]+"), (budgeted, r"5\.00")):
        with pytest.raises(OutputWriteError, match=suggestion.replace("[0-9.]+", disk) + r"\)\)$"):
            preflight.require_disk(other, aside=aside(other))
    assert len(asked) == 1
