"""Spot re-computation: a sample of merged tensors recomputed from the parents through an
independent reader (``safetensors``) with FusionBench's op order.

Always the largest tensor and the embeddings/lm_head, all of them for small models. They must
agree: bf16/fp16 within one ulp, float32 within a relative ``1e-4`` (the documented rounding is
≤ 1e-6 away from the conditioning of θ₀), float64 ``1e-10``, relative to the terms
``|s0·A| + |s1·B|`` (which also bounds 16-bit elements where they cancel).
"""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path
from typing import Any

import torch

from ..engine import VOCAB_TENSOR_NAMES
from ..errors import CheckpointError, ValidationInputError
from ..formats.manifest import Manifest
from ..io.safetensors import Checkpoint, torch_dtype
from ..slerp import compute_dtype, slerp_reference
from .report import SpotResult, SpotTensor

log = logging.getLogger(__name__)


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
        sampled = random.Random(seed).sample(rest, min(sample, len(rest)))
        chosen = list(dict.fromkeys([largest, *vocab, *sampled]))
    log.info("spot re-computation of %d of %d tensors (%d elements in all)", len(chosen), len(names), total)
    index = {"a": Checkpoint.open(parents[0]), "b": Checkpoint.open(parents[1]), "m": Checkpoint.open(folder)}
    results, problems = [], []
    handles: dict[Path, Any] = {}

    def tensor(role: str, name: str):
        info = index[role].tensors[name]
        if info.file not in handles:
            try:
                handles[info.file] = safe_open(str(info.file), framework="pt")
            except Exception as e:  # the library's own error type; a parent is bad input, the merge fails
                if role == "m":
                    raise CheckpointError(f"{info.file}: {e}", path=info.file) from e
                raise ValidationInputError(f"{info.file}: cannot be read: {e}", path=info.file) from e
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
                f"{name}: differs from the recomputed SLERP "
                f"({res.mismatches} of {res.checked} elements, {worst})"
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
    cd = compute_dtype(load or torch_dtype(sa.get_dtype()))
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
