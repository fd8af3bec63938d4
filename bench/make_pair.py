"""Build a bf16 Llama-shaped model pair for benchmarks, streamed (little memory, no model class).

model_b = model_a + noise on matrices (norm weights identical), written as input shards of at
most --shard-mb MB with an index, config.json and a small tokenizer, like a real checkpoint.
Matrices are generated in row blocks, so even the 2.5 GB single-tensor pair (:func:`build_big`)
needs little memory.
"""

from __future__ import annotations

import argparse
import json
import shutil
import zlib
from pathlib import Path

import torch

from slerp_plugin.io.safetensors import OutputTensor
from slerp_plugin.io.writer import ShardWriter

BASE = {"hidden": 2048, "layers": 16, "intermediate": 5632, "vocab": 32000}  # 953M parameters


def tensors(hidden: int, layers: int, intermediate: int, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    out = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,))]
        out += [(p + f"self_attn.{n}_proj.weight", (hidden, hidden)) for n in "qkvo"]
        out += [(p + "mlp.gate_proj.weight", (intermediate, hidden)),
                (p + "mlp.up_proj.weight", (intermediate, hidden)),
                (p + "mlp.down_proj.weight", (hidden, intermediate))]
    return out + [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def write_model(
    folder: Path, spec: list, seed: int, noise_of: int | None, shard_bytes: int, cfg: dict
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    shards, cur, size = [], [], 0
    for name, shape in spec:
        n = 2
        for s in shape:
            n *= s
        if cur and size + n > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += n
    shards.append(cur)
    weight_map = {}
    for i, group in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        with ShardWriter(folder / fname, [OutputTensor(n, "BF16", s) for n, s in group]) as w:
            for name, shape in group:
                for block in _blocks(name, shape, seed, noise_of):
                    w.write(memoryview(block.to(torch.bfloat16).reshape(-1).view(torch.uint8).numpy()))
                weight_map[name] = fname
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))


def _blocks(name: str, shape: tuple[int, ...], seed: int, noise_of: int | None, rows: int = 2048):
    """The tensor's values in row blocks: norms are ones, biases zeros; matrices N(0, 0.02²) (+ noise
    for model_b)."""
    if len(shape) == 1:
        yield torch.zeros(shape) if name.endswith(".bias") else torch.ones(shape)
        return
    for r in range(0, shape[0], rows):
        n = min(rows, shape[0] - r)
        g = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}:{r}".encode()))
        t = torch.randn((n, *shape[1:]), generator=g) * 0.02
        if noise_of is not None:
            g2 = torch.Generator().manual_seed(zlib.crc32(f"{noise_of}:{name}:{r}".encode()) + 1)
            t += torch.randn((n, *shape[1:]), generator=g2) * 0.006
        yield t


def build_big(out: Path, rows: int = 152064, cols: int = 8192) -> tuple[Path, Path]:
    """A pair whose one big tensor is ``rows×cols`` bf16 (default Qwen-72B's embedding, 2.5 GB),
    plus the final norm, as a zero-layer tied Llama that mergekit accepts."""
    a, b = out / "model_a", out / "model_b"
    if (b / "config.json").is_file():
        return a, b
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cols,
           "intermediate_size": 4 * cols, "num_hidden_layers": 0, "num_attention_heads": 64,
           "vocab_size": rows, "tie_word_embeddings": True, "dtype": "bfloat16", "torch_dtype": "bfloat16"}
    spec = [("model.embed_tokens.weight", (rows, cols)), ("model.norm.weight", (cols,))]
    _write_pair(a, b, spec, cfg, 500)
    return a, b


#: Qwen2-72B's shapes (hidden 8192, 64 heads, 8 KV heads, MLP 29568, vocabulary 152064)
SEED = {"hidden": 8192, "kv": 1024, "intermediate": 29568, "vocab": 152064}


def seed_tensors(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """A Qwen2-72B checkpoint's tensors with ``layers`` decoder layers (biases on q, k, v)."""
    h, kv, mlp, vocab = SEED["hidden"], SEED["kv"], SEED["intermediate"], SEED["vocab"]
    out = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
        for n, rows in (("q", h), ("k", kv), ("v", kv)):
            out += [(p + f"self_attn.{n}_proj.weight", (rows, h)), (p + f"self_attn.{n}_proj.bias", (rows,))]
        out += [(p + "self_attn.o_proj.weight", (h, h)), (p + "mlp.gate_proj.weight", (mlp, h)),
                (p + "mlp.up_proj.weight", (mlp, h)), (p + "mlp.down_proj.weight", (h, mlp))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]


def build_seed_shapes(out: Path, layers: int = 2) -> tuple[Path, Path]:
    """A pair with Qwen2-72B's tensor shapes and ``layers`` decoder layers (2: ~8.5 GB each)."""
    a, b = out / "model_a", out / "model_b"
    if (b / "config.json").is_file():
        return a, b
    cfg = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": SEED["hidden"],
           "intermediate_size": SEED["intermediate"], "num_hidden_layers": layers,
           "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": SEED["vocab"],
           "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
           "tie_word_embeddings": False, "dtype": "bfloat16", "torch_dtype": "bfloat16"}
    _write_pair(a, b, seed_tensors(layers), cfg, 4000)
    return a, b


def _write_pair(a: Path, b: Path, spec: list, cfg: dict, shard_mb: int) -> None:
    write_model(a, spec, 0, None, shard_mb * 10**6, cfg)
    write_model(b, spec, 0, 1, shard_mb * 10**6, cfg)
    from slerp_plugin.demo.pair import build_tokenizer

    tok = build_tokenizer(512)
    for m in (a, b):
        tok.save_pretrained(m)


def build(out: Path, scale_layers: int, shard_mb: int = 500) -> tuple[Path, Path]:
    """The pair with ``scale_layers`` layers (16 = the 953M pair) under ``out``."""
    dims = {**BASE, "layers": scale_layers}
    a, b = out / "model_a", out / "model_b"
    if (b / "config.json").is_file():
        return a, b
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": dims["hidden"],
           "intermediate_size": dims["intermediate"], "num_hidden_layers": dims["layers"],
           "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": dims["vocab"],
           "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
           "dtype": "bfloat16", "torch_dtype": "bfloat16"}
    _write_pair(a, b, tensors(**dims), cfg, shard_mb)
    return a, b


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--shard-mb", type=int, default=500)
    args = ap.parse_args()
    shutil.rmtree(args.out / "model_a.tmp", ignore_errors=True)
    print(*build(args.out, args.layers, args.shard_mb))
