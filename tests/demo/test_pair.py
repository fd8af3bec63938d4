"""The demo pair: two small Llama models that load, share a tokenizer and differ in their matrices."""

from __future__ import annotations

import torch
from model_helpers import load_state

from slerp_plugin.demo.pair import build_tokenizer, corpus_text, main


def test_demo_pair_is_two_related_models(demo_bf16):
    a, b = load_state(demo_bf16[0]), load_state(demo_bf16[1])
    assert a.keys() == b.keys()
    for name in a:
        same = torch.equal(a[name], b[name])
        assert same == (a[name].ndim < 2), name  # norms identical, matrices perturbed
        assert a[name].dtype == torch.bfloat16
    assert (demo_bf16[0] / "model.safetensors.index.json").is_file()  # sharded, as asked
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(demo_bf16[1])
    tokenizer = AutoTokenizer.from_pretrained(demo_bf16[0])
    ids = tokenizer("a tokenizer trained offline", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits.float()).all()


def test_tokenizer_and_corpus_are_offline():
    assert len(corpus_text(1000)) == 1000
    tok = build_tokenizer(300)
    assert len(tok) <= 300 and tok.decode(tok("The sonnet").input_ids) == "The sonnet"


def test_command_builds_a_float32_single_file_pair(tmp_path, capsys):
    assert main([str(tmp_path / "d"), "--dtype", "float32", "--layers", "1", "--hidden-size", "32"]) == 0
    state = load_state(tmp_path / "d" / "model_a")
    assert {t.dtype for t in state.values()} == {torch.float32}
    assert "model_2: " in capsys.readouterr().out
