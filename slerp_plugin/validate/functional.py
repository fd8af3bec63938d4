"""The functional gate: perplexity of the merged model and both parents on an evaluation text, and
greedy completions of a few prompts. The merged perplexity must not exceed the worse parent's by
more than ``margin``.

Every model is evaluated layer by layer (:mod:`.streaming`), so memory does not grow with the
model; a model whose weights fit ``generation_memory`` is read once and kept, and only such a model
also gets greedy completions (they run the model once per new token). Parents' results come from
the :class:`~.cache.EvaluationCache` when it has them.
"""

from __future__ import annotations

import logging
import math
import time
from importlib import resources
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..engine import resolve_device
from ..engine.plan import format_bytes
from ..errors import ValidationInputError, first_line
from .cache import EvaluationCache, evaluation_key
from .report import FunctionalResult, Generation, ModelEvaluation
from .streaming import StreamedCausalLM

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = ("The meaning of life is", "Once upon a time,", "The capital of France is")
DEFAULT_EVAL_TEXT_NAME = "the bundled text"  #: how reports name the default evaluation text
ROLES = ("model_1", "model_2")


def default_eval_text() -> str:
    """The bundled evaluation text (public-domain English: Shakespeare's sonnets and more)."""
    return resources.files("slerp_plugin").joinpath("data/eval_text.txt").read_text()


class EvalSettings(BaseModel):
    """How the models are evaluated. Every field has a default."""

    model_config = ConfigDict(frozen=True)

    eval_text: str | None = Field(None, description="the text (default: the bundled text)")
    eval_text_name: str | None = Field(None, description="how reports name the text")
    max_tokens: int = Field(1024, ge=2, description="evaluation tokens (the text's first ones)")
    max_length: int = Field(512, ge=2, description="tokens per window; the model sees one window at a time")
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    max_new_tokens: int = Field(24, ge=0, description="tokens generated per prompt")
    device: str = Field("auto", description="auto (cuda when present), cpu, cuda or cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="compute dtype; auto: float32 on CPU, the checkpoint's dtype on GPU")
    generation_memory: int = Field(1 << 30, ge=0, description="bytes of weights (in the compute dtype) "
                                   "a model may keep in memory; larger models get no completions")

    @property
    def text(self) -> str:
        return self.eval_text if self.eval_text is not None else default_eval_text()

    @property
    def text_name(self) -> str:
        if self.eval_text_name:
            return self.eval_text_name
        return DEFAULT_EVAL_TEXT_NAME if self.eval_text is None else "the text given"


def eval_tokens(tokenizer_source: Path, settings: EvalSettings,
                tokenizer: object | None = None) -> tuple[object, torch.Tensor]:
    """The tokenizer of ``tokenizer_source`` (or ``tokenizer``, already loaded from it) and the
    first ``max_tokens`` ids of the text.

    Raises:
        ValidationInputError: the tokenizer does not load, or the text has fewer than 2 tokens.
    """
    if tokenizer is None:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
        except Exception as e:  # transformers raises many types
            raise ValidationInputError(f"{tokenizer_source}: the tokenizer does not load: {first_line(e)}",
                                       path=tokenizer_source) from e
    ids = tokenizer(settings.text, return_tensors="pt").input_ids[0][:settings.max_tokens]
    if ids.numel() < 2:
        raise ValidationInputError("the evaluation text has fewer than 2 tokens")
    return tokenizer, ids


def evaluate(folder: Path, ids: torch.Tensor, tokenizer, settings: EvalSettings) -> ModelEvaluation:
    """Perplexity of the model at ``folder`` on ``ids``, and completions of the prompts when its
    weights fit ``settings.generation_memory``.

    Raises:
        ValidationInputError: the model cannot be built from its folder.
        Exception: what transformers raises when the model does not run.
    """
    device = resolve_device(settings.device)
    dtype = None if settings.dtype == "auto" else getattr(torch, settings.dtype)
    started = time.perf_counter()
    with StreamedCausalLM(folder, device, dtype) as model:
        size = model.weight_bytes
        if size <= settings.generation_memory:
            with model.resident():
                ppl = model.perplexity(ids, settings.max_length)
                gens = _complete(model, tokenizer, settings)
            mode, note = "resident", None
        else:
            ppl = model.perplexity(ids, settings.max_length)
            gens, mode = [], "layer-streamed"
            note = (f"no completions: the weights take {format_bytes(size)} in {_name(model.dtype)}, over "
                    f"generation_memory {format_bytes(settings.generation_memory)}")
    seconds = time.perf_counter() - started
    log.info("perplexity of %s: %.4f on %d tokens (%s, %s, %s, %.1f s)", folder, ppl, ids.numel(), device,
             _name(model.dtype), mode, seconds)
    return ModelEvaluation(perplexity=ppl, tokens=int(ids.numel()), device=str(device),
                           dtype=_name(model.dtype), mode=mode, seconds=round(seconds, 3),
                           generations=gens, generation_note=note)


def _complete(model: StreamedCausalLM, tokenizer, settings: EvalSettings) -> list[str]:
    if not settings.prompts or not settings.max_new_tokens:
        return []
    prompts = [tokenizer(p, return_tensors="pt").input_ids[0] for p in settings.prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    new = model.greedy(prompts, settings.max_new_tokens, tokenizer.eos_token_id, pad)
    return [tokenizer.decode(tokens, skip_special_tokens=True) for tokens in new]


def evaluate_cached(folder: Path, ids: torch.Tensor, tokenizer, settings: EvalSettings,
                    cache: EvaluationCache | None) -> ModelEvaluation:
    """:func:`evaluate`, answered from ``cache`` when it holds this model, text and settings."""
    if cache is None:
        return evaluate(folder, ids, tokenizer, settings)
    key = evaluation_key(folder, ids, settings.max_length, settings.prompts, settings.max_new_tokens,
                         str(resolve_device(settings.device).type), settings.dtype,
                         settings.generation_memory)
    found = cache.get(key)
    if found is not None:
        log.info("perplexity of %s: %.4f on %d tokens (from the cache)", folder, found.perplexity,
                 found.tokens)
        return found.model_copy(update={"cached": True})
    result = evaluate(folder, ids, tokenizer, settings)
    cache.put(key, result)
    return result


def evaluate_parents(parents: tuple[Path, Path], tokenizer_source: Path, settings: EvalSettings,
                     cache: EvaluationCache) -> dict[str, ModelEvaluation]:
    """Evaluate both parents into ``cache`` ahead of the merges that will need them (a sweep).

    Raises:
        ValidationInputError: a parent or the tokenizer cannot be read or run.
    """
    tokenizer, ids = eval_tokens(tokenizer_source, settings)
    return {role: _parent(role, Path(path), ids, tokenizer, settings, cache)
            for role, path in zip(ROLES, parents, strict=True)}


def _parent(role: str, path: Path, ids, tokenizer, settings: EvalSettings,
            cache: EvaluationCache | None) -> ModelEvaluation:
    try:
        return evaluate_cached(path, ids, tokenizer, settings, cache)
    except ValidationInputError as e:
        raise ValidationInputError(f"{role}: {e.message}", path=path) from e
    except Exception as e:  # transformers raises many types; the first line says what went wrong
        raise ValidationInputError(f"{role} {path}: cannot be evaluated: {first_line(e)}", path=path) from e


def functional_check(folder: Path, parents: tuple[Path, Path], *, settings: EvalSettings, margin: float,
                     cache: EvaluationCache | None = None,
                     tokenizer: object | None = None) -> FunctionalResult:
    """The perplexity gate against the parents, with completions (see the module docstring).
    ``tokenizer`` is ``folder``'s, when it is already loaded.

    Raises:
        ValidationInputError: a parent cannot be evaluated (nothing is judged then).
    """
    tokenizer, ids = eval_tokens(folder, settings, tokenizer)
    evals = {role: _parent(role, Path(p), ids, tokenizer, settings, cache)
             for role, p in zip(ROLES, parents, strict=True)}
    common = {"tokens": int(ids.numel()), "margin": margin, "eval_text": settings.text_name}
    try:
        evals["merged"] = evaluate(folder, ids, tokenizer, settings)
    except Exception as e:  # the merge is what is judged: a model that does not run fails the gate
        return FunctionalResult(status="failed", evaluations=evals, **common,
                                problems=[f"the merged model cannot be evaluated: {first_line(e)}"])
    return judge(evals, margin=margin, settings=settings, tokens=int(ids.numel()))


def judge(evals: dict[str, ModelEvaluation], *, margin: float, settings: EvalSettings,
          tokens: int) -> FunctionalResult:
    """The perplexity gate: the merge's perplexity (``evals["merged"]``) must be finite and at most
    the worse parent's × (1 + ``margin``).

    Args:
        evals: the evaluations of ``merged``, ``model_1`` and ``model_2``.
        margin: the fraction the merge may exceed the worse parent by (e.g. 0.10).
        settings: how they were evaluated (the text's name and the prompts are reported).
        tokens: how many evaluation tokens.

    Returns:
        The result, ``passed`` or ``failed`` with the reason.
    """
    ppl = {role: ev.perplexity for role, ev in evals.items()}
    worse = max(ppl["model_1"], ppl["model_2"])
    threshold = worse * (1 + margin)
    problems = []
    if not math.isfinite(ppl["merged"]) or ppl["merged"] > threshold:
        problems.append(f"merged perplexity {ppl['merged']:.3f} exceeds the gate {threshold:.3f} "
                        f"(worse parent {worse:.3f} + {margin:.0%})")
    merged = evals["merged"]
    return FunctionalResult(
        status="failed" if problems else "passed", perplexity=ppl, threshold=threshold, problems=problems,
        device=merged.device, dtype=merged.dtype, evaluations=evals,
        generations=_generations(settings, evals), tokens=tokens, margin=margin, eval_text=settings.text_name,
    )


def _generations(settings: EvalSettings, evals: dict[str, ModelEvaluation]) -> list[Generation]:
    merged = evals["merged"].generations
    if not merged:
        return []
    def of(role: str, i: int) -> str | None:
        gens = evals[role].generations
        return gens[i] if i < len(gens) else None
    return [Generation(prompt=p, merged=merged[i], model_1=of("model_1", i), model_2=of("model_2", i))
            for i, p in enumerate(settings.prompts[:len(merged)])]


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
