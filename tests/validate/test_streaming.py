"""Layer-streamed evaluation: the same perplexities as the model in memory, one module's weights
at a time, tied embeddings, clear errors for layouts it cannot stream."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from model_helpers import load_state, write_model

from slerp_plugin.errors import ValidationInputError
from slerp_plugin.validate.streaming import StreamedCausalLM

CPU = torch.device("cpu")


def in_memory_perplexity(folder, ids: torch.Tensor, max_length: int) -> float:
    """The plain transformers evaluation: the whole model loaded, window by window."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    nll, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, ids.numel(), max_length):
            w = ids[start:start + max_length].unsqueeze(0)
            if w.numel() >= 2:
                nll += model(w, labels=w).loss.item() * (w.numel() - 1)
                count += w.numel() - 1
    return math.exp(nll / count)


def tokens(folder, n: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    from slerp_plugin.validate import default_eval_text

    return AutoTokenizer.from_pretrained(folder)(default_eval_text(), return_tensors="pt").input_ids[0][:n]


@pytest.mark.parametrize("fixture", ["demo_bf16", "demo_fp32_tied"])
def test_streamed_perplexity_equals_the_model_in_memory(fixture, request):
    folder = request.getfixturevalue(fixture)[0]
    ids = tokens(folder, 300)  # two windows of 128 and one of 44
    with StreamedCausalLM(folder, CPU) as model:
        streamed = model.perplexity(ids, 128)
        with model.resident():
            resident = model.perplexity(ids, 128)
    want = in_memory_perplexity(folder, ids, 128)
    assert streamed == pytest.approx(want, rel=1e-5) and resident == pytest.approx(want, rel=1e-5)


def tiny_model(folder, model_type: str, **extra):
    """A random model of ``model_type`` (2 layers, hidden 64), saved with the demo tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from slerp_plugin.demo.pair import build_demo_pair

    tokenizer = build_demo_pair(folder / "pair")[0]
    config = AutoConfig.for_model(model_type, vocab_size=512, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  head_dim=16, max_position_embeddings=512, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    out = folder / model_type
    model.save_pretrained(out)
    for f in tokenizer.iterdir():
        if "token" in f.name:
            shutil.copy(f, out / f.name)
    return out


@pytest.mark.parametrize("model_type,extra", [
    ("qwen2", {}),  # biases on q, k, v
    ("gemma2", {"final_logit_softcapping": 5.0, "attn_logit_softcapping": 20.0}),  # scaled embedding
    ("cohere", {"logit_scale": 0.5}),  # scaled logits, tied head
])
def test_blocks_give_the_model_s_own_perplexity_per_architecture(model_type, extra, tmp_path, monkeypatch):
    from slerp_plugin.validate import streaming

    folder = tiny_model(tmp_path, model_type, **extra)
    ids = tokens(folder, 300) % 512
    want = in_memory_perplexity(folder, ids, 128)
    # blocks far smaller than any matrix: every linear layer and the head run in many blocks
    monkeypatch.setattr(streaming, "READ_BLOCK_ELEMENTS", 64 * 7)
    monkeypatch.setattr(streaming, "LOGITS_BUDGET_BYTES", 4 * 300 * 13)
    with StreamedCausalLM(folder, CPU) as model:
        got = model.perplexity(ids, 128)
    assert got == pytest.approx(want, rel=1e-5)


def test_no_matrix_is_ever_whole_in_memory(demo_bf16, monkeypatch):
    """Linear layers and the head are read in row blocks; the embedding only in its looked-up rows."""
    from slerp_plugin.validate import streaming

    folder = demo_bf16[0]
    largest = []
    read = streaming.TensorReader.read

    def spy(self, info, start, out):
        read(self, info, start, out)
        if len(info.shape) == 2:
            largest.append((info.name, len(out) // info.torch_dtype.itemsize, info.numel))
    monkeypatch.setattr(streaming.TensorReader, "read", spy)
    monkeypatch.setattr(streaming, "READ_BLOCK_ELEMENTS", 4096)
    with StreamedCausalLM(folder, CPU) as model:
        model.perplexity(tokens(folder, 200), 100)
    assert largest and all(n <= 4096 for _, n, _ in largest), max(largest, key=lambda x: x[1])
    names = {name for name, _, _ in largest}
    assert "lm_head.weight" in names and "model.embed_tokens.weight" in names


def test_block_products_in_the_reused_buffer_are_the_new_tensor_s_bits(demo_bf16):
    """A linear layer's and the head's blocks are multiplied into one buffer per model: the same
    bits as a product in a new tensor, whatever shapes came before."""
    gen = torch.Generator().manual_seed(0)
    with StreamedCausalLM(demo_bf16[0], CPU) as model:
        for x_shape, rows in (((2, 37, 64), 48), ((71, 64), 96), ((1, 5, 64), 3)):
            x = torch.randn(x_shape, generator=gen)
            w = torch.randn((rows, 64), generator=gen)
            got = model._product(x, w)
            assert got.shape == (*x_shape[:-1], rows) and torch.equal(got, torch.matmul(x, w.t()))


def test_a_token_outside_the_embedding_is_a_clear_error(demo_bf16):
    folder = demo_bf16[0]
    with StreamedCausalLM(folder, CPU) as model:
        vocab = model.config.vocab_size
        with pytest.raises(ValidationInputError, match=f"token id {vocab} is outside the embedding"):
            model.perplexity(torch.tensor([1, 2, vocab]), 8)


def test_only_one_module_s_weights_are_in_memory_at_a_time(demo_bf16):
    folder = demo_bf16[0]
    seen = []
    with StreamedCausalLM(folder, CPU) as model:
        def count(*_args):
            seen.append(sum(p.numel() for p in model.model.parameters() if p.device.type != "meta"))
        for module in model.model.modules():
            module.register_forward_hook(count)
        model.perplexity(tokens(folder, 200), 100)
        head = model.model.get_output_embeddings().weight.numel()
        largest = max(sum(s.info.numel for s in srcs) for srcs in model._sources.values())
        assert model.weight_bytes == sum(s.info.numel * 4 for srcs in model._sources.values() for s in srcs)
    total = sum(t.numel() for t in load_state(folder).values())
    assert seen and max(seen) <= head + largest < total / 2
    assert sum(p.device.type != "meta" for p in model.model.parameters()) == 0  # all dropped again


def test_completions_equal_transformers_generate(demo_fp32_tied):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = demo_fp32_tied[0]
    tok = AutoTokenizer.from_pretrained(folder)
    prompts = ["The meaning of life is", "Once"]
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    want = []
    for p in prompts:
        enc = tok(p, return_tensors="pt")
        out = reference.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
        want.append(out[0, enc.input_ids.shape[1]:].tolist())
    with StreamedCausalLM(folder, CPU) as model:
        with pytest.raises(RuntimeError, match="resident"):
            model.greedy([tok(p, return_tensors="pt").input_ids[0] for p in prompts], 8, None, 0)
        with model.resident():
            got = model.greedy([tok(p, return_tensors="pt").input_ids[0] for p in prompts], 8,
                               tok.eos_token_id, tok.eos_token_id)
    assert got == [w[:len(g)] for w, g in zip(want, got, strict=True)] and all(got)


def test_a_missing_or_misshapen_tensor_is_a_clear_error(demo_bf16, tmp_path):
    state = load_state(demo_bf16[0])
    name = "model.layers.0.mlp.up_proj.weight"
    missing = write_model(tmp_path / "missing", {k: v for k, v in state.items() if k != name}, demo_bf16[0])
    with pytest.raises(ValidationInputError, match=f"{name} is not in the checkpoint"):
        StreamedCausalLM(missing, CPU)
    misshapen = write_model(tmp_path / "misshapen", {**state, name: state[name][:-1].clone()}, demo_bf16[0])
    with pytest.raises(ValidationInputError, match=f"{name} has shape"):
        StreamedCausalLM(misshapen, CPU)
    no_config = tmp_path / "no_config"
    shutil.copytree(demo_bf16[0], no_config)
    (no_config / "config.json").write_text("{not json")
    with pytest.raises(ValidationInputError, match="the model cannot be built"):
        StreamedCausalLM(no_config, CPU)


def test_a_padding_token_beyond_the_rows_looked_up_changes_nothing(demo_bf16, tmp_path):
    """Models whose config names a padding token (an id far beyond the few rows the evaluation
    looks up) give the perplexity of transformers' own model."""
    import json

    folder = tmp_path / "padded"
    shutil.copytree(demo_bf16[0], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "pad_token_id": config["vocab_size"] - 1}))
    ids = tokens(folder, 40)
    with StreamedCausalLM(folder, CPU) as model:
        assert model.perplexity(ids, 128) == pytest.approx(in_memory_perplexity(folder, ids, 128), rel=1e-5)


@pytest.mark.slow
def test_real_smollm2_streamed_equals_in_memory():
    from slerp_plugin.demo.smollm2 import smollm2_folder

    folder = smollm2_folder()
    ids = tokens(folder, 1024)
    with StreamedCausalLM(folder, CPU) as model:
        streamed = model.perplexity(ids, 512)
    assert streamed == pytest.approx(in_memory_perplexity(folder, ids, 512), rel=1e-4)


class Only:
    """The folder's tensors, but only ``allowed``: any other read fails the test."""

    def __init__(self, tensors, allowed):
        self.tensors, self.allowed, self.read = tensors, allowed, set()

    def acquire(self, names):
        assert set(names) <= self.allowed, set(names) - self.allowed
        self.read.update(names)
        return [self.tensors[n] for n in names]

    def release(self, names):
        pass


@pytest.mark.parametrize("fixture", ["demo_bf16", "demo_fp32_tied"])
@pytest.mark.parametrize("layer", [0, 1])
def test_a_run_goes_on_from_a_decoder_layer_s_output_to_the_same_figure(fixture, layer, request):
    """An evaluation taken up from a decoder layer's output reads only the tensors after it (a tied
    head: the embedding table too) and gives the uninterrupted run's NLL, bit for bit."""
    from slerp_plugin.io.safetensors import Checkpoint

    folder = request.getfixturevalue(fixture)[0]
    ids = tokens(folder, 300)
    seen = []
    with StreamedCausalLM(folder, CPU) as model:
        model.model.model.layers[layer].register_forward_hook(lambda *_: seen.append(model.reached))
        want = model.negative_log_likelihood(ids, 128)
        assert model.reached is None  # not held once the run is over
    (reached,) = seen
    assert reached.layer == layer and reached.hidden.shape[0] == 3  # three windows of 128 tokens
    tensors = Checkpoint.open(folder).tensors
    with StreamedCausalLM(folder, CPU) as model:
        after = model.keys_after(layer)
    assert not any(f"layers.{i}." in k for k in after for i in range(layer + 1))
    assert ("model.embed_tokens.weight" in after) == (fixture == "demo_fp32_tied")
    source = Only(tensors, after)
    with StreamedCausalLM(folder, CPU, weights=source, layout=tensors) as model:
        model.skip_through(reached)
        assert model.negative_log_likelihood(ids, 128) == want
    assert source.read == after


def test_a_saved_output_that_does_not_fit_is_refused(demo_bf16):
    from slerp_plugin.validate.streaming import LayerOutput

    with StreamedCausalLM(demo_bf16[0], CPU) as model:
        with pytest.raises(ValueError, match="decoder layer 5"):
            model.skip_through(LayerOutput(5, torch.zeros(1, 4, 64)))
        with pytest.raises(ValueError, match="do not fit"):
            model.skip_through(LayerOutput(0, torch.zeros(1, 4, 32)))
        with pytest.raises(ValueError, match="do not fit"):
            model.skip_through(LayerOutput(0, torch.zeros(1, 4, 64, dtype=torch.bfloat16)))
