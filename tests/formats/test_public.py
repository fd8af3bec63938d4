"""Nothing private is published: a merge made, validated and uploaded (or streamed) from folders
whose paths carry a marker string publishes no file that contains it, nor the home folder or the
host name; parents are named by Hub id and commit, or by folder name and content hash."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
from pathlib import Path

import pytest
from model_helpers import spec_for

from slerp_plugin.formats.manifest import InputFile, InputRecord, Manifest
from slerp_plugin.formats.public import OUR_FILES, content_sha256, scrub
from slerp_plugin.hub import client as H
from slerp_plugin.merge import run_merge

MARKER = "PRIVATEMARK-alice"


def published_texts(repo_id: str, into: Path) -> dict[str, str]:
    from huggingface_hub import snapshot_download

    folder = Path(snapshot_download(repo_id, cache_dir=into, endpoint=os.environ["HF_ENDPOINT"]))
    return {p.name: p.read_bytes().decode("utf-8", "replace") for p in folder.rglob("*") if p.is_file()}


def assert_nothing_private(texts: dict[str, str], home: Path) -> None:
    host = socket.gethostname()
    for name, text in texts.items():
        assert MARKER not in text, (name, text[text.index(MARKER) - 200: text.index(MARKER) + 50])
        assert str(home) not in text, name
        if len(host) >= 4 and name in OUR_FILES:  # the tokenizer's vocabulary may hold any word
            assert not re.search(rf"(?<![\w.-]){re.escape(host)}(?![\w-])", text), name


@pytest.fixture
def private_home(tmp_path, monkeypatch, demo_bf16):
    """A home folder whose path names the user, holding a copy of the demo pair."""
    home = tmp_path / f"home-{MARKER}"
    for src in demo_bf16:
        shutil.copytree(src, home / "models" / src.name)
    monkeypatch.setenv("HOME", str(home))
    return home


def test_a_local_merge_uploaded_names_parents_by_folder_and_content(hub, private_home, tmp_path):
    from slerp_plugin.validate.functional import EvalSettings
    from slerp_plugin.validate.gate import validate_merge
    from slerp_plugin.validate.report import write_report

    a, b = private_home / "models" / "model_a", private_home / "models" / "model_b"
    out = private_home / "runs" / "manual__2026-12-06" / "merged"
    run_merge(spec_for((a, b), out, max_shard_size="100KB"))
    write_report(validate_merge(out, (a, b), settings=EvalSettings(max_tokens=32)), out)
    assert MARKER in (out / "merge_manifest.json").read_text()  # the local record keeps its paths
    H.upload_folder(out, "org/public-merge")

    texts = published_texts("org/public-merge", tmp_path / "check")
    assert {"merge_manifest.json", "validation.json", "validation.txt", "README.md"} <= set(texts)
    assert_nothing_private(texts, private_home)
    manifest = json.loads(texts["merge_manifest.json"])
    local = Manifest.read(out)
    for role in ("model_1", "model_2"):
        record = manifest["inputs"][role]
        assert record["path"] == Path(local.inputs[role].path).name
        assert record["content_sha256"] == content_sha256(local.inputs[role])
    assert manifest["spec"]["output"] == "hf://org/public-merge"
    assert json.loads(texts["validation.json"])["model"] == "hf://org/public-merge"


def test_a_streamed_merge_with_a_local_tokenizer_publishes_no_path(hub, private_home, demo_bf16, tmp_path):
    from slerp_plugin.spec import MergeSpec

    H.upload_folder(demo_bf16[0], "org/parent-a")
    H.upload_folder(demo_bf16[1], "org/parent-b")
    spec = MergeSpec.build(model_1="org/parent-a", model_2="org/parent-b", t=0.3, stream=True,
                           push_to_hub="org/streamed", max_shard_size="200KB",
                           tokenizer=str(private_home / "models" / "model_a"),
                           output=private_home / "work" / "streamed")
    run_merge(spec)
    texts = published_texts("org/streamed", tmp_path / "check")
    assert_nothing_private(texts, private_home)
    inputs = json.loads(texts["merge_manifest.json"])["inputs"]
    assert inputs["model_1"]["path"].startswith("hf://org/parent-a@")
    assert inputs["tokenizer"]["path"] == "model_a" and inputs["tokenizer"]["content_sha256"]


def test_scrub_replaces_whole_paths_longest_first(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "u"))
    monkeypatch.setattr("socket.gethostname", lambda: "gpu-node-7")
    names = {"/data/x/models/a": "a", "models/a": "a"}
    text = (f"/data/x/models/a and models/a and {tmp_path / 'u'}/cache and {tmp_path / 'u'}x and "
            "/data/x/models/ab, a model made on gpu-node-7 (not gpu-node-70)")
    assert scrub(text, names) == (f"a and a and ~/cache and {tmp_path / 'u'}x and /data/x/models/ab, a model "
                                  "made on <host> (not gpu-node-70)")
    assert "gpu-node-7 " in scrub("gpu-node-7 ", names, ours=False)  # others' files keep their words


def test_content_hash_covers_names_sizes_and_checksums():
    r = InputRecord(ref="a", path="/x/a", files=[InputFile(name="w", size=1, sha256="00")])
    changed = [r.model_copy(update={"files": [InputFile(name=n, size=s, sha256=h)]})
               for n, s, h in [("v", 1, "00"), ("w", 2, "00"), ("w", 1, "01")]]
    assert len({content_sha256(x) for x in [r, *changed]}) == 4
