"""Spot re-computation: a sample of merged tensors recomputed from the parents with FusionBench's
op order (:func:`~slerp_plugin.kernel.slerp_reference`), independently of the engine's chunked kernel.

Always the largest tensor and the embeddings/lm_head, all of them for small models. They must
agree: bf16/fp16 within one ulp, float32 within a relative ``1e-4`` (the documented rounding is
≤ 1e-6 away from the conditioning of θ₀), float64 ``1e-10``, relative to the terms
``|s0·A| + |s1·B|`` (which also bounds 16-bit elements where they cancel). Tensors over
``reference_max_elements`` are checked on sampled rows, their norms and dot summed over row
blocks, so memory stays at a few blocks. Weights are read with ``pread`` (nothing is mapped).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..defaults import DEFAULT_DOT_THRESHOLD, DEFAULT_EPSILON
from ..engine import VOCAB_TENSOR_NAMES
from ..errors import CheckpointError, ValidationInputError
from ..formats.manifest import Manifest, TensorRecord
from ..io.reader import TensorReader
from ..io.safetensors import Checkpoint
from ..kernel import SlerpStats, accumulate_chunks, coefficients, compute_dtype, slerp_reference
from .report import SpotResult, SpotTensor

log = logging.getLogger(__name__)


#: ``scale(mask)``: ``|s0·A| + |s1·B|`` (float64) at the elements where ``mask`` is set
Scale = Callable[[torch.Tensor], torch.Tensor]


def ulp_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Elementwise distance in units in the last place for 16-bit floats (bf16/fp16)."""
    def ordered(v: torch.Tensor) -> torch.Tensor:
        i = v.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(i < 0, -(i & 0x7FFF), i)
    return (ordered(x) - ordered(y)).abs()


def _compare(name: str, method: str, got: torch.Tensor, want: torch.Tensor, scale: Scale,
             numel: int) -> SpotTensor:
    """``got`` against ``want``; ``scale(mask)`` gives ``|s0·A| + |s1·B|`` (float64) where
    ``mask`` is set (computed only for the elements that need it)."""
    got, want = got.reshape(-1), want.reshape(-1)
    sixteen = got.dtype in (torch.bfloat16, torch.float16)
    if torch.equal(got, want):
        return SpotTensor(name=name, method=method, numel=numel, checked=got.numel(),
                          **({"max_ulp": 0} if sixteen else {"max_rel_err": 0.0}), passed=True)
    rtol = 1e-10 if got.dtype == torch.float64 else 1e-4
    if sixteen:
        d = ulp_distance(got, want)
        worst = int(d.max()) if d.numel() else 0
        # where s0·A and s1·B nearly cancel, two float32 evaluations differ by the rounding of the
        # terms, which can be several ulps of the small result
        far = d > 1
        bad = 0
        if bool(far.any()):
            err = (got[far].double() - want[far].double()).abs()
            bad = int((err > rtol * scale(far) + 1e-30).sum())
        return SpotTensor(name=name, method=method, numel=numel, checked=got.numel(), max_ulp=worst,
                          mismatches=bad, passed=bad == 0)
    every = torch.ones_like(got, dtype=torch.bool)
    err = (got.double() - want.double()).abs()
    bound = rtol * scale(every) + 1e-30
    rel = float((err / bound).max()) * rtol if err.numel() else 0.0
    bad = int((err > bound).sum())
    return SpotTensor(name=name, method=method, numel=numel, checked=got.numel(), max_rel_err=rel,
                      mismatches=bad, passed=bad == 0)


def fixed_scale(values: torch.Tensor) -> Scale:
    """A :data:`Scale` from precomputed per-element scales."""
    flat = values.reshape(-1).double()
    return lambda mask: flat[mask]


def _load_dtype(spec: dict[str, Any]) -> torch.dtype | None:
    return getattr(torch, spec["dtype"]) if spec.get("dtype") else None


class _Tensors:
    """The parents' and the merge's tensors, read with ``pread``.

    Raises (from :meth:`read`): ValidationInputError for a parent that cannot be read,
    CheckpointError for the merge.
    """

    def __init__(self, checkpoints: dict[str, Checkpoint]) -> None:
        self.checkpoints = checkpoints  # "a", "b": the parents; "m": the merge
        self.reader = TensorReader()

    def has(self, name: str) -> bool:
        return all(name in ck.tensors for ck in self.checkpoints.values())

    def read(self, role: str, name: str, row: int = 0, rows: int | None = None) -> torch.Tensor:
        """Rows ``[row, row+rows)`` of the tensor (all of it by default), in its shape."""
        info = self.checkpoints[role].tensors[name]
        shape = info.shape or (1,)
        per_row = math.prod(shape[1:])
        rows = shape[0] - row if rows is None else min(rows, shape[0] - row)
        try:
            flat = self.reader.read_tensor(info, row * per_row, rows * per_row)
        except CheckpointError as e:
            if role == "m":
                raise
            raise ValidationInputError(e.message, path=info.file) from e
        return flat.reshape((rows, *shape[1:]) if info.shape else ())

    def close(self) -> None:
        self.reader.close()


def spot_check(
    folder: Path,
    parents: tuple[Path, Path],
    manifest: Manifest,
    *,
    sample: int = 16,
    check_all_below_bytes: int = 1 << 30,
    reference_max_elements: int = 1 << 22,
    seed: int = 0,
) -> SpotResult:
    """Recompute a sample of tensors from the parents (see the module docstring).

    Raises:
        ValidationInputError: a parent's tensor cannot be read.
        CheckpointError: a merged tensor cannot be read.
    """
    chosen = _choose(manifest, check_all_below_bytes, sample, seed)
    log.info("spot re-computation of %d of %d tensors", len(chosen), len(manifest.tensors))
    checkpoints = {"a": Checkpoint.open(parents[0]), "b": Checkpoint.open(parents[1]),
                   "m": Checkpoint.open(folder)}
    return spot_check_tensors(checkpoints, manifest.tensors, manifest.spec, chosen,
                              reference_max_elements=reference_max_elements, seed=seed)


def spot_check_tensors(
    checkpoints: dict[str, Checkpoint],
    tensors_merged: list[TensorRecord],
    spec: dict[str, Any],
    names: list[str],
    *,
    reference_max_elements: int = 1 << 22,
    seed: int = 0,
) -> SpotResult:
    """Recompute the tensors ``names`` of a merge from the parents: ``checkpoints`` maps ``a`` and
    ``b`` (the parents) and ``m`` (the merge, or some of its shards) to where their tensors lie;
    ``tensors_merged`` are the merge's records of them, ``spec`` its spec as JSON.

    Raises:
        ValidationInputError: a parent's tensor cannot be read.
        CheckpointError: a merged tensor cannot be read.
    """
    records = {t.name: t for t in tensors_merged}
    tensors = _Tensors(checkpoints)
    results, problems = [], []
    try:
        for name in names:
            if not tensors.has(name) or name not in records:
                problems.append(f"{name}: missing in a parent or the merge")
                continue
            res = _check_one(tensors, records[name], spec, reference_max_elements, seed)
            results.append(res)
            if not res.passed:
                worst = (f"max {res.max_ulp} ulp" if res.max_ulp is not None
                         else f"rel err {res.max_rel_err:.3g}")
                problems.append(f"{name}: differs from the recomputed SLERP "
                                f"({res.mismatches} of {res.checked} elements, {worst})")
    finally:
        tensors.close()
    return SpotResult(passed=not problems, problems=problems, tensors=results)


def _choose(manifest: Manifest, check_all_below_bytes: int, sample: int, seed: int) -> list[str]:
    """Every tensor of a small merge; else the largest, the vocabulary tensors and a sample."""
    shapes = {t.name: math.prod(t.shape) for t in manifest.tensors}
    names = list(shapes)
    if manifest.output.total_size <= check_all_below_bytes:
        return names
    return pick_tensors(names, sample, seed, first=[max(names, key=shapes.get)])


def pick_tensors(names: list[str], sample: int, seed: int, first: Sequence[str] = ()) -> list[str]:
    """``first``, then the vocabulary tensors among ``names``, then ``sample`` of the others chosen
    with ``seed``: the tensors a spot check recomputes."""
    vocab = [n for n in names if any(v in n for v in VOCAB_TENSOR_NAMES)]
    rest = [n for n in names if n not in first and n not in vocab]
    sampled = random.Random(seed).sample(rest, min(sample, len(rest)))
    return list(dict.fromkeys([*first, *vocab, *sampled]))


def _check_one(tensors: _Tensors, rec: TensorRecord, spec: dict[str, Any], reference_max_elements: int,
               seed: int) -> SpotTensor:
    name, numel = rec.name, math.prod(rec.shape)
    if rec.branch == "shape-kept":
        got, a = tensors.read("m", name), tensors.read("a", name)
        return _compare(name, "kept", got, a.to(got.dtype), fixed_scale(a.abs()), numel)
    if numel <= reference_max_elements:
        return _spot_reference(tensors, rec, spec, numel)
    return _spot_streamed(tensors, rec, spec, numel, seed)


def _spot_reference(tensors: _Tensors, rec: TensorRecord, spec: dict[str, Any], numel: int) -> SpotTensor:
    name, load = rec.name, _load_dtype(spec)
    a, b, got = tensors.read("a", name), tensors.read("b", name), tensors.read("m", name)
    if load is not None:
        a, b = a.to(load), b.to(load)
    want = slerp_reference(rec.t if rec.t is not None else spec["t"], a, b,
                           spec.get("DOT_THRESHOLD", DEFAULT_DOT_THRESHOLD),
                           spec.get("epsilon", DEFAULT_EPSILON),
                           norm_precision=spec.get("norm_precision", "float64"))
    cd = want.dtype
    return _compare(name, "reference", got, want.to(got.dtype), _scale(rec, a.to(cd), b.to(cd)), numel)


def _scale(rec: TensorRecord, a: torch.Tensor, b: torch.Tensor) -> Scale:
    s0 = abs(float(rec.s0)) if isinstance(rec.s0, (int, float)) else 1.0
    s1 = abs(float(rec.s1)) if isinstance(rec.s1, (int, float)) else 1.0
    a, b = a.reshape(-1), b.reshape(-1)
    return lambda mask: (s0 + 1e-3) * a[mask].abs().double() + (s1 + 1e-3) * b[mask].abs().double()


def _spot_streamed(tensors: _Tensors, rec: TensorRecord, spec: dict[str, Any], numel: int,
                   seed: int) -> SpotTensor:
    """Huge tensors: norms and dot in float64 over row blocks, then sampled rows compared."""
    name, load = rec.name, _load_dtype(spec)
    info = tensors.checkpoints["a"].tensors[name]
    rows = info.shape[0]
    block = max(1, (1 << 22) // max(1, numel // max(rows, 1)))
    cd = compute_dtype(load or info.torch_dtype)
    stats = SlerpStats()
    for r in range(0, rows, block):
        x = tensors.read("a", name, r, block).to(load or cd).reshape(-1)
        y = tensors.read("b", name, r, block).to(load or cd).reshape(-1)
        stats = stats + accumulate_chunks([(x, y)])
    t = rec.t if rec.t is not None else spec["t"]
    coeff = coefficients(t, stats, dtype=cd, DOT_THRESHOLD=spec.get("DOT_THRESHOLD", DEFAULT_DOT_THRESHOLD),
                         epsilon=spec.get("epsilon", DEFAULT_EPSILON))
    picks = sorted({0, rows - 1, *random.Random(seed).sample(range(rows), min(4, rows))})
    checked = []
    for r in picks:
        a = tensors.read("a", name, r, 1).to(load or info.torch_dtype).to(cd)
        b = tensors.read("b", name, r, 1).to(load or info.torch_dtype).to(cd)
        got = tensors.read("m", name, r, 1)
        want = (coeff.s0 * a + coeff.s1 * b).to(got.dtype)
        checked.append(_compare(name, "streamed", got, want, _scale(rec, a, b), numel))
    worst = max(checked, key=lambda c: (c.mismatches, c.max_ulp or 0, c.max_rel_err or 0))
    return SpotTensor(name=name, method="streamed", numel=numel, checked=sum(c.checked for c in checked),
                      max_ulp=worst.max_ulp, max_rel_err=worst.max_rel_err,
                      mismatches=sum(c.mismatches for c in checked), passed=all(c.passed for c in checked))
