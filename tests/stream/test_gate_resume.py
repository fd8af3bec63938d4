"""A gated streaming merge stopped part way goes on where its evaluation was: the shards before the
gate's saved point are neither fetched nor merged again, and the report is the uninterrupted run's;
a saved point that does not hold up costs only work."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import pytest
from test_pipeline import assert_same_weights, local_result, published, stream_spec

from slerp_plugin.errors import HubUnavailableError
from slerp_plugin.hub import client as H
from slerp_plugin.merge import run_merge
from slerp_plugin.stream import spool as spool_mod
from slerp_plugin.stream.gate_resume import POINT_RECORD


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """No parent evaluation from a cache: every evaluator has a point to go on from."""
    monkeypatch.setenv("SLERP_PLUGIN_CACHE", str(tmp_path / "cache"))


def stopped_near_the_end(monkeypatch, tmp_path: Path, spec, last: int) -> dict:
    """Run ``spec`` until the fetch of shard ``last``, which fails once the gate has saved a point
    (the network goes); returns that point's record."""
    real = spool_mod.fetch_spool
    record = tmp_path / "streamed.partial" / ".slerp_state" / POINT_RECORD

    def network_gone_at_the_last(spool, role, *a, **kw):
        if spool.index >= last:
            deadline = time.monotonic() + 30
            while not record.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            raise HubUnavailableError("network gone")
        return real(spool, role, *a, **kw)

    monkeypatch.setattr("slerp_plugin.stream.spool.fetch_spool", network_gone_at_the_last)
    with pytest.raises(HubUnavailableError, match="network gone"):
        run_merge(spec)
    monkeypatch.setattr("slerp_plugin.stream.spool.fetch_spool", real)
    return json.loads(record.read_text())


def perplexities(repo: str, tmp_path: Path) -> dict[str, float]:
    return json.loads((published(repo, tmp_path) / "validation.json").read_text())["functional"]["perplexity"]


@pytest.mark.parametrize("tied", [False, True])
def test_a_resumed_gated_stream_goes_on_from_the_gate_s_point(hub, demo_bf16, demo_fp32_tied, tmp_path,
                                                              caplog, monkeypatch, tied):
    """Untied and tied (whose head reads the embedding table kept aside by the stopped run)."""
    pair, size = (demo_fp32_tied, "100KB") if tied else (demo_bf16, "60KB")
    for folder, repo in zip(pair, ("org/parent-a", "org/parent-b"), strict=True):
        H.upload_folder(folder, repo)
    run_merge(stream_spec(tmp_path / "clean", max_shard_size=size, push_to_hub="org/clean"))
    want = perplexities("org/clean", tmp_path)
    spec = stream_spec(tmp_path, max_shard_size=size)
    total = len(list(published("org/clean", tmp_path).glob("*.safetensors")))
    sent_before = sum(hub.state.sent_by_path.values())

    point = stopped_near_the_end(monkeypatch, tmp_path, spec, total - 1)
    shard = point["shard"]
    assert 1 <= shard < total and set(point["evaluators"]) == {"merged", "model_1", "model_2"}
    if tied:
        assert all("model.embed_tokens.weight" in e["kept"] for e in point["evaluators"].values())
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="slerp_plugin"):
        run_merge(spec)
    assert f"shards 1-{shard} are not fetched or merged again" in caplog.text
    assert caplog.text.count(" written in ") == total - shard
    assert perplexities("org/merged", tmp_path) == want  # bit for bit
    assert_same_weights(local_result(pair, tmp_path, max_shard_size=size),
                        published("org/merged", tmp_path))
    report = json.loads((published("org/merged", tmp_path) / "validation.json").read_text())
    clean = json.loads((published("org/clean", tmp_path) / "validation.json").read_text())
    assert report["spot"]["tensors"] == clean["spot"]["tensors"]  # those of the shards not merged again
    weights = sum(f.stat().st_size for d in pair for f in Path(d).glob("*.safetensors"))
    fetched = sum(hub.state.sent_by_path.values()) - sent_before
    assert fetched <= 2 * 1.05 * weights + 2e5  # the clean run's and both of these, about once each
    assert not (tmp_path / "streamed.partial").exists()


def test_a_saved_point_that_does_not_hold_up_only_costs_work(hub, parents_uploaded, demo_bf16, tmp_path,
                                                            caplog, monkeypatch):
    """A saved hidden state whose bytes changed is not used: every shard is evaluated again and the
    model is still published, with the gate passed."""
    spec = stream_spec(tmp_path, max_shard_size="60KB")
    point = stopped_near_the_end(monkeypatch, tmp_path, spec, 5)
    hidden = tmp_path / "streamed.partial" / "gate" / point["evaluators"]["model_1"]["file"]
    data = bytearray(hidden.read_bytes())
    data[-1] ^= 1
    hidden.write_bytes(bytes(data))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="slerp_plugin"):
        run_merge(spec)
    assert "cannot be used" in caplog.text and "does not match its SHA-256" in caplog.text
    assert "the gate evaluates every shard" in caplog.text
    assert "gate passed" in caplog.text
    expected = local_result(demo_bf16, tmp_path, max_shard_size="60KB")
    assert_same_weights(expected, published("org/merged", tmp_path))


@pytest.fixture
def parents_uploaded(hub, demo_bf16):
    return (H.upload_folder(demo_bf16[0], "org/parent-a").commit,
            H.upload_folder(demo_bf16[1], "org/parent-b").commit)


class Work:
    """The part of a working folder the saved point uses."""

    def __init__(self, root: Path) -> None:
        self.path, self.state = root, root / ".slerp_state"
        self.state.mkdir(parents=True)

    def record(self, name):
        path = self.state / name
        return json.loads(path.read_text()) if path.exists() else None

    def save_record(self, name, doc, *, crash_points=True):
        (self.state / name).write_text(json.dumps(doc))

    def folder(self, name):
        return self.path / name


def test_a_saved_point_is_read_back_only_as_it_was_saved(tmp_path, caplog):
    import torch

    from slerp_plugin.io.safetensors import TensorInfo
    from slerp_plugin.stream.evaluation import GatePoint
    from slerp_plugin.stream.gate_resume import load_point, save_point
    from slerp_plugin.validate.report import SpotTensor
    from slerp_plugin.validate.streaming import LayerOutput

    work = Work(tmp_path / "out.partial")
    aside = work.folder("eval")
    aside.mkdir()
    table = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    (aside / "merged-embed.bin").write_bytes(table.numpy().tobytes())
    kept = {"embed": (TensorInfo("embed", "F32", (3, 4), aside / "merged-embed.bin", 0, 48),
                      hashlib.sha256(table.numpy().tobytes()).hexdigest())}
    hidden = torch.randn(2, 5, 4)
    spot = {0: [SpotTensor(name="embed", method="reference", numel=12, checked=12, passed=True)]}
    identity = {"model_1": "a" * 40, "model_2": "b" * 40, "tokens": "c/1024"}
    save_point(work, GatePoint(3, {"merged": LayerOutput(1, hidden)}, {"merged": kept}), hashes={"x": {}},
               spot=spot, identity=identity)

    saved = load_point(work, ["merged"], identity)
    assert saved.point.shard == 3 and saved.point.reached["merged"].layer == 1
    assert torch.equal(saved.point.reached["merged"].hidden, hidden)
    assert saved.point.kept["merged"] == kept and saved.spot == spot and saved.hashes == {"x": {}}
    assert load_point(work, ["merged"], {**identity, "tokens": "d/1024"}) is None  # other tokens
    assert load_point(work, ["merged", "model_1"], identity) is None  # model_1 was not evaluated then

    doc = work.record("gate-point.json")
    doc["evaluators"]["merged"]["kept"]["embed"]["file"] = "../../outside.bin"
    work.save_record("gate-point.json", doc)
    assert load_point(work, ["merged"], identity) is None
    assert "outside the working folder" in caplog.text
    doc["evaluators"]["merged"]["kept"]["embed"]["file"] = "merged-embed.bin"
    work.save_record("gate-point.json", doc)
    (aside / "merged-embed.bin").write_bytes(b"\0" * 48)
    assert load_point(work, ["merged"], identity) is None  # a copy that changed
