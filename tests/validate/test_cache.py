"""The evaluation cache: parents evaluated once, keyed by what decides the result."""

from __future__ import annotations

import shutil

import torch
from model_helpers import rewrite

from slerp_plugin.validate import EvalSettings, EvaluationCache, evaluate_parents, validate_merge
from slerp_plugin.validate.cache import evaluation_key, model_content_id
from slerp_plugin.validate.report import ModelEvaluation

IDS = torch.arange(100)


def key(folder, ids=IDS, **kw):
    args = {"max_length": 64, "prompts": ("Once",), "max_new_tokens": 4, "device_type": "cpu",
            "dtype": "auto", "generation_memory": 1 << 30, **kw}
    return evaluation_key(folder, ids, **args)


def test_the_key_follows_the_content_and_every_setting(demo_bf16, tmp_path):
    a = demo_bf16[0]
    same_content = shutil.copytree(a, tmp_path / "copy")
    assert model_content_id(same_content) == model_content_id(a)  # content, not the path
    assert key(same_content) == key(a)
    others = [key(demo_bf16[1]), key(a, ids=IDS[:99]), key(a, max_length=32), key(a, prompts=("Twice",)),
              key(a, max_new_tokens=5), key(a, device_type="cuda"), key(a, dtype="bfloat16"),
              key(a, generation_memory=0)]
    assert len({key(a), *others}) == 1 + len(others)
    rewrite(same_content, lambda s: s.update({k: v + 1 for k, v in s.items() if k.endswith("norm.weight")}))
    assert key(same_content) != key(a)


def test_entries_round_trip_and_bad_entries_are_ignored(tmp_path, caplog):
    cache = EvaluationCache(tmp_path / "c")
    ev = ModelEvaluation(perplexity=12.5, tokens=100, device="cpu", dtype="float32", mode="resident",
                         seconds=1.0, generations=["x"], cached=True)
    assert cache.get("k") is None
    cache.put("k", ev)
    assert cache.get("k") == ev.model_copy(update={"cached": False})  # the flag is the reader's to set
    (tmp_path / "c" / "bad.json").write_text('{"perplexity": "high"}')
    assert cache.get("bad") is None and "ignoring the unreadable cached evaluation" in caplog.text
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    EvaluationCache(blocked).put("k", ev)  # an unwritable cache costs time, not the validation
    assert "cannot store the evaluation" in caplog.text


def test_parents_are_evaluated_once_across_merges(merged, demo_bf16, tmp_path):
    cache = EvaluationCache(tmp_path / "cache")
    settings = EvalSettings(max_tokens=64)
    ahead = evaluate_parents(demo_bf16, demo_bf16[0], settings, cache)
    assert not ahead["model_1"].cached and len(list((tmp_path / "cache").glob("*.json"))) == 2
    report = validate_merge(merged, demo_bf16, settings=settings, cache=cache)
    evals = report.functional.evaluations
    assert report.passed and evals["model_1"].cached and evals["model_2"].cached
    assert not evals["merged"].cached
    assert report.functional.perplexity["model_1"] == ahead["model_1"].perplexity
    assert "model_1: cpu, float32, resident, from the cache" in report.summary
    fresh = validate_merge(merged, demo_bf16, settings=settings)
    assert fresh.functional.perplexity == report.functional.perplexity
    assert not fresh.functional.evaluations["model_1"].cached
