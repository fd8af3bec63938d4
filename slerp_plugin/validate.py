"""Validation of a merged model: structure, spot re-computation, perplexity against the parents.

:func:`validate_merge` returns a :class:`ValidationReport` (``validation.json``, schema version 1)
and :func:`write_report` also writes ``validation.txt``, a short human summary. The gate passes
only if every enabled check passes:

- **structural** — every shard in the index exists and parses; key set, shapes and dtypes match
  the plan (the manifest's tensors, else model_1's); no NaN/Inf anywhere (streamed in chunks);
  ``config.json`` and the tokenizer load;
- **spot** — a sample of tensors (always the largest and the embeddings/lm_head; all of them for
  small models) is recomputed from the parents through an independent reader (``safetensors``)
  with FusionBench's op order, and must agree: bf16/fp16 within one ulp, float32 within a relative
  ``1e-4`` (the documented rounding is ≤ 1e-6 away from the conditioning of θ₀), float64 ``1e-10``,
  relative to the terms ``|s0·A| + |s1·B|`` (which also bounds 16-bit elements where they cancel);
- **functional** — merged model and both parents loaded with transformers (``cuda`` when present,
  else CPU) compute perplexity on an evaluation text (bundled public-domain default or a file) and
  greedily complete a few prompts; the merged perplexity must not exceed the worse parent's by more
  than ``margin`` (default 10 %). It can be skipped explicitly (the report says so and why); it is
  never skipped silently — a model too large for this machine is an error that says to skip it.

Report fields: ``schema_version``, ``model``, ``parents``, ``created_at``, ``passed``,
``summary``, ``structural`` (``passed``, ``problems``, ``tensors``, ``bytes_scanned``),
``spot`` (``passed``, ``problems``, ``tensors``: name, method, numel, checked elements, max ulp or
relative error, mismatches), ``functional`` (``status`` passed|failed|skipped, ``skip_reason``,
``perplexity`` {merged, model_1, model_2}, ``threshold``, ``margin``, ``tokens``, ``device``,
``generations`` [{prompt, merged, model_1, model_2}]), ``timings`` (seconds per check).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field

from .checkpoint import DTYPES, Checkpoint, TensorReader
from .errors import CheckpointError, SlerpPluginError
from .manifest import MANIFEST_NAME, Manifest, write_json_atomic
from .engine import VOCAB_TENSOR_NAMES
from .slerp import compute_dtype, slerp_reference
from .spec import MergeSpec

log = logging.getLogger(__name__)

REPORT_NAME = "validation.json"
SUMMARY_NAME = "validation.txt"
DEFAULT_PROMPTS = ("The meaning of life is", "Once upon a time,", "The capital of France is")


class ValidationError(SlerpPluginError):
    """Validation could not run as asked (e.g. model too large for the functional check)."""

    exit_code = 2


class StructuralResult(BaseModel):
    passed: bool
    problems: list[str] = Field(default_factory=list)
    tensors: int = 0
    bytes_scanned: int = 0


class SpotTensor(BaseModel):
    name: str
    method: Literal["reference", "streamed", "kept"]
    numel: int
    checked: int
    max_ulp: int | None = None
    max_rel_err: float | None = None
    mismatches: int = 0
    passed: bool


class SpotResult(BaseModel):
    passed: bool
    problems: list[str] = Field(default_factory=list)
    tensors: list[SpotTensor] = Field(default_factory=list)


class Generation(BaseModel):
    prompt: str
    merged: str
    model_1: str | None = None
    model_2: str | None = None


class FunctionalResult(BaseModel):
    status: Literal["passed", "failed", "skipped"]
    skip_reason: str | None = None
    perplexity: dict[str, float] = Field(default_factory=dict)
    threshold: float | None = None
    margin: float | None = None
    tokens: int = 0
    device: str | None = None
    generations: list[Generation] = Field(default_factory=list)
    problems: list[str] = Field(default_factory=list)


class ValidationReport(BaseModel):
    """``validation.json``; see the module docstring for the fields."""

    schema_version: Literal[1] = 1
    model: str
    parents: list[str]
    created_at: str
    passed: bool
    summary: str
    structural: StructuralResult
    spot: SpotResult | None = None
    functional: FunctionalResult
    timings: dict[str, float] = Field(default_factory=dict)

    @classmethod
    def read(cls, folder: Path | str) -> ValidationReport:
        return cls.model_validate_json((Path(folder) / REPORT_NAME).read_text())


def default_eval_text() -> str:
    """The bundled evaluation text (public-domain English: Shakespeare's sonnets and more)."""
    return resources.files("slerp_plugin").joinpath("data/eval_text.txt").read_text()


# --------------------------------------------------------------------------- structural


def _expected_tensors(folder: Path, manifest: Manifest | None, model_1: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    if manifest is not None:
        return {t.name: (tuple(t.shape), t.dtype) for t in manifest.tensors}
    ck = Checkpoint.open(model_1)
    return {n: (i.shape, i.dtype) for n, i in ck.tensors.items()}


def check_structure(folder: Path, expected: dict[str, tuple[tuple[int, ...], str]],
                    chunk_elements: int = 1 << 22) -> tuple[StructuralResult, Checkpoint | None]:
    """Shards, key set, shapes, dtypes, finiteness (streamed), config and tokenizer loading."""
    problems: list[str] = []
    try:
        ckpt = Checkpoint.open(folder)
    except CheckpointError as e:
        return StructuralResult(passed=False, problems=[str(e)]), None
    missing = sorted(set(expected) - set(ckpt.tensors))
    extra = sorted(set(ckpt.tensors) - set(expected))
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing: {', '.join(missing[:5])}")
    if extra:
        problems.append(f"{len(extra)} unexpected tensor(s): {', '.join(extra[:5])}")
    scanned = 0
    nonfinite = []
    with TensorReader() as reader:
        for name, info in ckpt.tensors.items():
            if name in expected:
                shape, dtype = expected[name]
                if info.shape != tuple(shape):
                    problems.append(f"{name}: shape {list(info.shape)}, expected {list(shape)}")
                if info.dtype != dtype:
                    problems.append(f"{name}: dtype {info.dtype}, expected {dtype}")
            if not info.torch_dtype.is_floating_point:
                continue
            bad = 0
            for start in range(0, info.numel, chunk_elements):
                count = min(chunk_elements, info.numel - start)
                try:
                    chunk = reader.read_tensor(info, start, count)
                except CheckpointError as e:
                    problems.append(str(e))
                    break
                bad += int((~torch.isfinite(chunk)).sum())
                scanned += chunk.nbytes
            if bad:
                nonfinite.append(f"{name} ({bad} NaN/Inf)")
    if nonfinite:
        problems.append(f"non-finite values in {len(nonfinite)} tensor(s): {', '.join(nonfinite[:5])}")
    try:
        from transformers import AutoConfig, AutoTokenizer

        AutoConfig.from_pretrained(folder)
        AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # transformers raises many types; the message is what matters
        problems.append(f"config/tokenizer do not load: {str(e).splitlines()[0]}")
    return (
        StructuralResult(passed=not problems, problems=problems, tensors=len(ckpt.tensors), bytes_scanned=scanned),
        ckpt,
    )


# --------------------------------------------------------------------------- spot


def ulp_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Elementwise distance in units in the last place for 16-bit floats (bf16/fp16)."""
    def ordered(v: torch.Tensor) -> torch.Tensor:
        i = v.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(i < 0, -(i & 0x7FFF), i)
    return (ordered(x) - ordered(y)).abs()


def _compare(name: str, method: str, got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor,
             numel: int) -> SpotTensor:
    got, want = got.reshape(-1), want.reshape(-1)
    rtol = 1e-10 if got.dtype == torch.float64 else 1e-4
    err = (got.double() - want.double()).abs()
    bound = rtol * scale.reshape(-1).double() + 1e-30
    if got.dtype in (torch.bfloat16, torch.float16):
        d = ulp_distance(got, want)
        worst = int(d.max()) if d.numel() else 0
        # where s0·A and s1·B nearly cancel, two float32 evaluations differ by the rounding of the
        # terms, which can be several ulps of the small result
        bad = int(((d > 1) & (err > bound)).sum())
        return SpotTensor(name=name, method=method, numel=numel, checked=got.numel(), max_ulp=worst,
                          mismatches=bad, passed=bad == 0)
    rel = float((err / bound).max()) * rtol if err.numel() else 0.0
    bad = int((err > bound).sum())
    return SpotTensor(name=name, method=method, numel=numel, checked=got.numel(), max_rel_err=rel,
                      mismatches=bad, passed=bad == 0)


def _load_dtype(spec: dict[str, Any]) -> torch.dtype | None:
    return getattr(torch, spec["dtype"]) if spec.get("dtype") else None


def spot_check(
    folder: Path,
    parents: tuple[Path, Path],
    manifest: Manifest,
    *,
    sample: int = 16,
    check_all_below_bytes: int = 1 << 30,
    reference_max_elements: int = 1 << 25,
    seed: int = 0,
) -> SpotResult:
    """Recompute a sample of tensors from the parents (see the module docstring)."""
    from safetensors import safe_open

    spec = manifest.spec
    load = _load_dtype(spec)
    records = {t.name: t for t in manifest.tensors}
    total = sum(math.prod(t.shape) for t in manifest.tensors)
    names = list(records)
    if manifest.output.total_size <= check_all_below_bytes:
        chosen = names
    else:
        largest = max(names, key=lambda n: math.prod(records[n].shape))
        vocab = [n for n in names if any(v in n for v in VOCAB_TENSOR_NAMES)]
        rest = [n for n in names if n != largest and n not in vocab]
        chosen = list(dict.fromkeys([largest, *vocab, *random.Random(seed).sample(rest, min(sample, len(rest)))]))
    log.info("spot re-computation of %d of %d tensors (%d elements in all)", len(chosen), len(names), total)
    index = {"a": Checkpoint.open(parents[0]), "b": Checkpoint.open(parents[1]), "m": Checkpoint.open(folder)}
    results, problems = [], []
    handles: dict[Path, Any] = {}

    def tensor(role: str, name: str):
        info = index[role].tensors[name]
        if info.file not in handles:
            handles[info.file] = safe_open(str(info.file), framework="pt")
        return handles[info.file]

    for name in chosen:
        rec = records[name]
        try:
            a_h, b_h, m_h = tensor("a", name), tensor("b", name), tensor("m", name)
        except KeyError:
            problems.append(f"{name}: missing in a parent or the merge")
            continue
        numel = math.prod(rec.shape)
        if rec.branch == "shape-kept":
            got, a = m_h.get_tensor(name), a_h.get_tensor(name)
            res = _compare(name, "kept", got, a.to(got.dtype), a.abs().to(torch.float64), numel)
        elif numel <= reference_max_elements:
            res = _spot_reference(name, a_h, b_h, m_h, rec, spec, load, numel)
        else:
            res = _spot_streamed(name, a_h, b_h, m_h, rec, spec, load, numel, seed)
        results.append(res)
        if not res.passed:
            worst = f"max {res.max_ulp} ulp" if res.max_ulp is not None else f"rel err {res.max_rel_err:.3g}"
            problems.append(
                f"{name}: differs from the recomputed SLERP ({res.mismatches} of {res.checked} elements, {worst})"
            )
    return SpotResult(passed=not problems, problems=problems, tensors=results)


def _spot_reference(name, a_h, b_h, m_h, rec, spec, load, numel) -> SpotTensor:
    a, b, got = a_h.get_tensor(name), b_h.get_tensor(name), m_h.get_tensor(name)
    if load is not None:
        a, b = a.to(load), b.to(load)
    want = slerp_reference(rec.t if rec.t is not None else spec["t"], a, b,
                           spec.get("DOT_THRESHOLD", 0.9995), spec.get("epsilon", 1e-8))
    cd = want.dtype
    scale = _scale(rec, a.to(cd), b.to(cd))
    return _compare(name, "reference", got, want.to(got.dtype), scale, numel)


def _scale(rec, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    s0 = abs(float(rec.s0)) if isinstance(rec.s0, (int, float)) else 1.0
    s1 = abs(float(rec.s1)) if isinstance(rec.s1, (int, float)) else 1.0
    return (s0 + 1e-3) * a.abs().double() + (s1 + 1e-3) * b.abs().double()


def _spot_streamed(name, a_h, b_h, m_h, rec, spec, load, numel, seed) -> SpotTensor:
    """Huge tensors: norms and dot in float64 over row blocks, then sampled rows compared."""
    import numpy as np

    sa, sb, sm = a_h.get_slice(name), b_h.get_slice(name), m_h.get_slice(name)
    rows = sa.get_shape()[0]
    per_row = max(1, numel // max(rows, 1))
    block = max(1, (1 << 22) // per_row)
    cd = compute_dtype(load or DTYPES[sa.get_dtype()][0])
    ssa = ssb = dot = 0.0
    for r in range(0, rows, block):
        x = sa[r:r + block].to(load or torch.float32).double()
        y = sb[r:r + block].to(load or torch.float32).double()
        ssa += float((x * x).sum())
        ssb += float((y * y).sum())
        dot += float((x * y).sum())
    eps, tau = spec.get("epsilon", 1e-8), spec.get("DOT_THRESHOLD", 0.9995)
    t = rec.t if rec.t is not None else spec["t"]
    na, nb = math.sqrt(ssa), math.sqrt(ssb)
    d = torch.tensor(dot / ((na if na > eps else 1.0) * (nb if nb > eps else 1.0)), dtype=cd)
    if bool(torch.abs(d) > tau):
        s0, s1 = torch.tensor(1 - t, dtype=cd), torch.tensor(t, dtype=cd)
    else:
        th = torch.arccos(d)
        sin0 = np.sin(th.numpy())
        s0, s1 = torch.sin(th - th * t) / sin0, torch.sin(th * t) / sin0
    picks = sorted({0, rows - 1, *random.Random(seed).sample(range(rows), min(4, rows))})
    checked = []
    for r in picks:
        a = sa[r:r + 1].to(load or sa[r:r + 1].dtype).to(cd)
        b = sb[r:r + 1].to(load or sb[r:r + 1].dtype).to(cd)
        got = sm[r:r + 1]
        want = (s0 * a + s1 * b).to(got.dtype)
        checked.append(_compare(name, "streamed", got, want, _scale(rec, a, b), numel))
    worst = max(checked, key=lambda c: (c.mismatches, c.max_ulp or 0, c.max_rel_err or 0))
    return SpotTensor(name=name, method="streamed", numel=numel, checked=sum(c.checked for c in checked),
                      max_ulp=worst.max_ulp, max_rel_err=worst.max_rel_err,
                      mismatches=sum(c.mismatches for c in checked), passed=all(c.passed for c in checked))


# --------------------------------------------------------------------------- functional


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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
        raise ValidationError(
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

    dev = _device(device)
    _check_fits(folder, dev)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(eval_text, return_tensors="pt").input_ids[0][:max_tokens]
    ppl, gens = {}, {}
    for role, path in (("merged", folder), ("model_1", parents[0]), ("model_2", parents[1])):
        ppl[role], gens[role] = perplexity_and_generations(path, ids, prompts, tokenizer, dev, max_length)
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


# --------------------------------------------------------------------------- entry points


def validate_merge(
    folder: Path | str,
    parents: tuple[Path | str, Path | str],
    *,
    skip_functional: str | None = None,
    eval_text: str | None = None,
    prompts: list[str] | None = None,
    margin: float = 0.10,
    max_tokens: int = 1024,
    max_length: int = 512,
    spot_sample: int = 16,
    device: str = "auto",
    t: float | None = None,
) -> ValidationReport:
    """Run the checks on ``folder`` (a merged model) against ``parents`` (model_1, model_2).

    ``skip_functional`` (a reason) skips the perplexity gate. Without a manifest in ``folder``,
    ``t`` must be given (scalar; DOT_THRESHOLD and epsilon take their defaults).

    Raises:
        ValidationError: the checks cannot run as asked (no manifest and no t, model too large
            for the functional check).
    """
    folder = Path(folder)
    p1, p2 = Path(parents[0]), Path(parents[1])
    timings: dict[str, float] = {}
    manifest = _manifest_or_spec(folder, (p1, p2), t)

    t0 = time.perf_counter()
    expected = _expected_tensors(folder, manifest, p1)
    structural, _ = check_structure(folder, expected)
    timings["structural_s"] = round(time.perf_counter() - t0, 3)

    spot = None
    if structural.passed or not any("missing" in p or "corrupt" in p for p in structural.problems):
        t0 = time.perf_counter()
        try:
            spot = spot_check(folder, (p1, p2), manifest, sample=spot_sample)
        except CheckpointError as e:
            spot = SpotResult(passed=False, problems=[str(e)])
        timings["spot_s"] = round(time.perf_counter() - t0, 3)

    if skip_functional:
        functional = FunctionalResult(status="skipped", skip_reason=skip_functional)
    elif not structural.passed:
        functional = FunctionalResult(status="skipped", skip_reason="structural checks failed")
    else:
        t0 = time.perf_counter()
        functional = functional_check(
            folder, (p1, p2), eval_text=eval_text or default_eval_text(),
            prompts=list(prompts or DEFAULT_PROMPTS), margin=margin, max_tokens=max_tokens,
            max_length=max_length, device=device,
        )
        timings["functional_s"] = round(time.perf_counter() - t0, 3)

    passed = structural.passed and (spot is None or spot.passed) and functional.status != "failed"
    if spot is None:
        passed = False
    report = ValidationReport(
        model=str(folder), parents=[str(p1), str(p2)],
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        passed=passed, summary="", structural=structural, spot=spot, functional=functional, timings=timings,
    )
    report.summary = summarise(report)
    return report


def _manifest_or_spec(folder: Path, parents: tuple[Path, Path], t: float | None) -> Manifest:
    try:
        return Manifest.read(folder)
    except FileNotFoundError:
        pass
    except ValueError as e:
        raise ValidationError(f"{folder / MANIFEST_NAME}: unreadable ({str(e).splitlines()[0]})") from None
    if t is None:
        raise ValidationError(f"{folder} has no {MANIFEST_NAME}; pass --t (the t it was merged with)")
    # Without a manifest: the plan is model_1's tensors, merged with this t.
    from .engine import plan_merge

    spec = MergeSpec.build(model_1=str(parents[0]), model_2=str(parents[1]), t=t,
                           output=str(folder.with_name(folder.name + ".validate-plan")))
    plan = plan_merge(spec)
    from .manifest import OutputRecord, TensorRecord

    tensors = [TensorRecord(name=j.name, shape=list(j.a.shape), dtype=j.out_dtype, shard="",
                            branch="shape-kept" if j.action == "keep" else "slerp", t=j.t)
               for s in plan.shards for j in s.jobs]
    return Manifest(tool={}, created_at="", spec=spec.model_dump(mode="json"), inputs={},
                    output=OutputRecord(shards=[], total_size=plan.total_bytes, dtypes={}),
                    tensors=tensors, branch_counts={})


def summarise(report: ValidationReport) -> str:
    """A few lines a person reads first."""
    lines = [f"{'PASSED' if report.passed else 'FAILED'}: {report.model}"]
    s = report.structural
    lines.append(f"structural: {'ok' if s.passed else 'FAILED'} ({s.tensors} tensors, "
                 f"{s.bytes_scanned / 1e6:.1f} MB scanned for NaN/Inf)")
    lines += [f"  - {p}" for p in s.problems]
    if report.spot is not None:
        sp = report.spot
        lines.append(f"spot re-computation: {'ok' if sp.passed else 'FAILED'} ({len(sp.tensors)} tensors)")
        lines += [f"  - {p}" for p in sp.problems]
    f = report.functional
    if f.status == "skipped":
        lines.append(f"functional: SKIPPED ({f.skip_reason})")
    else:
        ppl = f.perplexity
        lines.append(
            f"functional: {'ok' if f.status == 'passed' else 'FAILED'}: perplexity merged {ppl['merged']:.3f}, "
            f"model_1 {ppl['model_1']:.3f}, model_2 {ppl['model_2']:.3f} on {f.tokens} tokens "
            f"(gate ≤ {f.threshold:.3f})"
        )
        lines += [f"  - {p}" for p in f.problems]
    return "\n".join(lines)


def write_report(report: ValidationReport, folder: Path | str | None = None) -> Path:
    """Write ``validation.json`` and ``validation.txt`` into ``folder`` (default: the model)."""
    folder = Path(folder or report.model)
    path = write_json_atomic(folder / REPORT_NAME, json.loads(report.model_dump_json()))
    (folder / SUMMARY_NAME).write_text(report.summary + "\n")
    return path
