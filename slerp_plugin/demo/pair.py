"""Demo models: a pair of small random Llama models with a tokenizer, built offline in seconds.

model_b is model_a with its matrices perturbed (like two fine-tunes of one base), so SLERP takes
its spherical branch on matrices and the LERP branch on the identical norm weights. The tokenizer
is a byte-level BPE trained on the standard library's ``pydoc_data.topics`` prose.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>"]


def corpus_text(max_chars: int | None = None) -> str:
    """English prose from ``pydoc_data.topics`` (about 465k characters, public domain docs)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return text[:max_chars] if max_chars else text


def build_tokenizer(vocab_size: int = 512):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained offline on :func:`corpus_text`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_text(200_000).split("\n\n"), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        pad_token="<|pad|>", unk_token=None,
    )


def build_demo_pair(
    out_dir: Path | str,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = 512,
    dtype: str = "bfloat16",
    tie_word_embeddings: bool = False,
    max_shard_size: str | int | None = None,
    perturbation: float = 0.3,
    seed: int = 0,
) -> tuple[Path, Path]:
    """Write ``out_dir/model_a`` and ``out_dir/model_b`` (config, safetensors, tokenizer).

    ``perturbation`` is model_b's added noise relative to each matrix's standard deviation;
    norm weights (1-D) stay identical. ``max_shard_size`` makes sharded checkpoints.
    Returns the two folders.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    paths = []
    for name in ("model_a", "model_b"):
        if name == "model_b":
            gen = torch.Generator().manual_seed(seed + 1)
            with torch.no_grad():
                for p in model.parameters():
                    if p.ndim >= 2:
                        noise = torch.randn(p.shape, generator=gen).to(p.dtype)
                        p.add_(noise * (perturbation * p.float().std()).to(p.dtype))
        path = out_dir / name
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(path, **kwargs)
        tokenizer.save_pretrained(path)
        paths.append(path)
    log.info("demo models written to %s and %s", *paths)
    return paths[0], paths[1]


def main(argv: list[str] | None = None) -> int:
    """``slerp-merge demo-models DIR``: build the demo pair."""
    parser = argparse.ArgumentParser(prog="slerp-merge demo-models", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--max-shard-size", default=None)
    parser.add_argument("--tie-word-embeddings", action="store_true")
    args = parser.parse_args(argv)
    a, b = build_demo_pair(
        args.out_dir, hidden_size=args.hidden_size, num_layers=args.layers,
        intermediate_size=args.hidden_size * 2, dtype=args.dtype,
        max_shard_size=args.max_shard_size, tie_word_embeddings=args.tie_word_embeddings,
    )
    print(f"model_1: {a}\nmodel_2: {b}")
    return 0
