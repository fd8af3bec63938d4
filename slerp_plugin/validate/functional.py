"""The functional gate: perplexity of the merged model and both parents on an evaluation text,
and greedy completions of a few prompts. The merged perplexity must not exceed the worse parent's
by more than ``margin``."""

from __future__ import annotations

import logging
import math
from importlib import resources
from pathlib import Path

import torch

from ..engine import resolve_device
from ..errors import ValidationInputError
from ..io.safetensors import Checkpoint
from .report import FunctionalResult, Generation

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = ("The meaning of life is", "Once upon a time,", "The capital of France is")
DEFAULT_EVAL_TEXT_NAME = "the bundled text"  #: how reports name the default evaluation text


def default_eval_text() -> str:
    """The bundled evaluation text (public-domain English: Shakespeare's sonnets and more)."""
    return resources.files("slerp_plugin").joinpath("data/eval_text.txt").read_text()


def _check_fits(folder: Path, device: torch.device) -> None:
    ck = Checkpoint.open(folder)
    params = sum(i.numel for i in ck.tensors.values())
    need = params * (4 if device.type == "cpu" else 2) * 1.3
    if device.type == "cpu":
        import psutil

        have = psutil.virtual_memory().available
    else:
        have = torch.cuda.mem_get_info(device)[0]
    if need > have:
        raise ValidationInputError(
            f"the functional check needs about {need / 1e9:.1f} GB on {device} but {have / 1e9:.1f} GB is "
            "free; pass --skip-functional REASON to validate structure and spot checks only"
        )


def perplexity_and_generations(
    folder: Path, input_ids: torch.Tensor, prompts: list[str], tokenizer, device: torch.device,
    max_length: int, max_new_tokens: int = 24,
) -> tuple[float, list[str]]:
    """Perplexity of one model on ``input_ids`` (windows of ``max_length``) and greedy completions."""
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if device.type == "cpu" else None
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or "auto").to(device).eval()
    nll, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, input_ids.numel(), max_length):
            window = input_ids[start:start + max_length].unsqueeze(0).to(device)
            if window.numel() < 2:
                break
            loss = model(window, labels=window).loss.float().item()
            nll += loss * (window.numel() - 1)
            count += window.numel() - 1
        outs = []
        for prompt in prompts:
            enc = tokenizer(prompt, return_tensors="pt").to(device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
            outs.append(tokenizer.decode(gen[0, enc.input_ids.shape[1]:], skip_special_tokens=True))
    del model
    return math.exp(nll / max(count, 1)), outs


def functional_check(
    folder: Path, parents: tuple[Path, Path], *, eval_text: str, prompts: list[str], margin: float,
    max_tokens: int, max_length: int, device: str,
) -> FunctionalResult:
    """Perplexity gate against the parents, plus greedy generations (see module docstring)."""
    from transformers import AutoTokenizer

    dev = resolve_device(device)
    _check_fits(folder, dev)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(eval_text, return_tensors="pt").input_ids[0][:max_tokens]
    ppl, gens = {}, {}
    for role, path in (("model_1", parents[0]), ("model_2", parents[1]), ("merged", folder)):
        try:
            ppl[role], gens[role] = perplexity_and_generations(path, ids, prompts, tokenizer, dev, max_length)
        except Exception as e:  # transformers raises many types; the first line says what went wrong
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            if role != "merged":
                raise ValidationInputError(f"{role} {path}: cannot be evaluated: {reason}", path=path) from e
            return FunctionalResult(status="failed", tokens=int(ids.numel()), device=str(dev), margin=margin,
                                    problems=[f"the merged model cannot be evaluated: {reason}"])
        log.info("perplexity of %s: %.3f on %d tokens", role, ppl[role], ids.numel())
    threshold = max(ppl["model_1"], ppl["model_2"]) * (1 + margin)
    problems = []
    if not math.isfinite(ppl["merged"]) or ppl["merged"] > threshold:
        problems.append(
            f"merged perplexity {ppl['merged']:.3f} exceeds the gate {threshold:.3f} "
            f"(worse parent {max(ppl['model_1'], ppl['model_2']):.3f} + {margin:.0%})"
        )
    return FunctionalResult(
        status="failed" if problems else "passed", perplexity=ppl, threshold=threshold, margin=margin,
        tokens=int(ids.numel()), device=str(dev), problems=problems,
        generations=[Generation(prompt=p, merged=gens["merged"][i], model_1=gens["model_1"][i],
                                model_2=gens["model_2"][i]) for i, p in enumerate(prompts)],
    )
