"""The SLERP kernel: FusionBench ``SlerpForCausalLM`` semantics, computed in two chunked passes.

Per tensor the whole tensor is one flattened vector. With ``A`` (model_1), ``B`` (model_2):

1. If ``A`` is not float32/float64 both are computed in float32 (float64 stays float64).
2. ``â = A/‖A‖`` if ``‖A‖ > epsilon`` else ``A`` (not normalised); the same for ``B``.
3. ``d = Σ â·b̂``.
4. ``|d| > DOT_THRESHOLD`` → LERP on the unnormalised tensors ``(1−t)·A + t·B``; otherwise
   ``θ₀ = arccos d``, ``θₜ = θ₀·t`` and ``r = sin(θ₀−θₜ)/sin θ₀ · A + sin θₜ/sin θ₀ · B``.
5. The caller casts ``r`` to model_1's dtype.

Pass 1 (:func:`accumulate`) sums ``‖A‖²``, ``‖B‖²`` and ``A·B`` chunk by chunk (float64 across
chunks); :func:`coefficients` turns the sums into the branch and the scalars ``s0, s1`` with the
same scalar op order as FusionBench; pass 2 (:func:`combine`) computes ``s0·A + s1·B`` chunk by
chunk. Scratch memory is therefore bounded by the chunk size, not by the tensor.

:func:`slerp_reference` is FusionBench's op order on whole tensors, kept for tests and for the
validator's spot re-computation.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from .defaults import DEFAULT_CHUNK_ELEMENTS, DEFAULT_DOT_THRESHOLD, DEFAULT_EPSILON

__all__ = ["DEFAULT_CHUNK_ELEMENTS", "DEFAULT_DOT_THRESHOLD", "DEFAULT_EPSILON", "SlerpCoefficients",
           "SlerpStats", "accumulate", "accumulate_chunks", "coefficients", "combine", "compute_dtype",
           "slerp", "slerp_reference", "slerp_with_coefficients"]

log = logging.getLogger(__name__)


Branch = Literal["slerp", "lerp", "unnormalised"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype SLERP computes in for a model_1 tensor of ``dtype``: float64 stays, all else float32."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


@dataclass(frozen=True)
class SlerpStats:
    """Pass-1 sums over a flattened tensor pair: ``Σa²``, ``Σb²`` and ``Σa·b`` (float64)."""

    sumsq_a: float = 0.0
    sumsq_b: float = 0.0
    dot: float = 0.0

    def __add__(self, other: SlerpStats) -> SlerpStats:
        return SlerpStats(
            self.sumsq_a + other.sumsq_a, self.sumsq_b + other.sumsq_b, self.dot + other.dot
        )


@dataclass(frozen=True)
class SlerpCoefficients:
    """What pass 1 decided for one tensor: the branch and ``r = s0·A + s1·B``.

    ``s0``/``s1`` are 0-d tensors in the compute dtype, so pass 2 rounds exactly as FusionBench.
    ``d`` is the cosine of the normalised (or, below epsilon, unnormalised) pair.
    """

    branch: Branch
    s0: torch.Tensor
    s1: torch.Tensor
    d: float
    norm_a: float
    norm_b: float

    def as_record(self) -> dict[str, float | str]:
        """A JSON-friendly summary for the manifest."""
        return {
            "branch": self.branch,
            "d": _finite_or_str(self.d),
            "s0": _finite_or_str(float(self.s0)),
            "s1": _finite_or_str(float(self.s1)),
        }


def _finite_or_str(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


def accumulate(a: torch.Tensor, b: torch.Tensor) -> SlerpStats:
    """Pass 1 on one chunk: the sums of ``a²``, ``b²`` and ``a·b`` of two 1-D tensors.

    ``a`` and ``b`` must already be in the compute dtype; the chunk's sums are taken in that dtype
    and returned as Python floats (float64) so that sums over chunks do not lose precision.
    The chunk sums come from BLAS ``dot``, whose last bit can depend on the buffers' alignment and
    the CPU; the engine always reads into freshly allocated buffers, so its runs are reproducible.
    """
    return accumulate_chunks([(a, b)])


def accumulate_chunks(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> SlerpStats:
    """Pass 1 over consecutive chunks: the same float64 sums as adding :func:`accumulate` of each
    chunk in order, with one device→host transfer for all of them instead of three per chunk.

    Each pair's dot products are taken before the next pair is drawn, so ``pairs`` may reuse
    buffers.
    """
    sums = [torch.stack((torch.dot(a, a), torch.dot(b, b), torch.dot(a, b))) for a, b in pairs]
    stats = SlerpStats()
    if sums:
        for aa, bb, ab in torch.stack(sums).tolist():
            stats = stats + SlerpStats(aa, bb, ab)
    return stats


def coefficients(
    t: float,
    stats: SlerpStats,
    *,
    dtype: torch.dtype = torch.float32,
    DOT_THRESHOLD: float = DEFAULT_DOT_THRESHOLD,
    epsilon: float = DEFAULT_EPSILON,
) -> SlerpCoefficients:
    """The SLERP branch and scalars for a tensor pair from its pass-1 sums.

    ``dtype`` is the compute dtype (:func:`compute_dtype`). A norm ``≤ epsilon`` leaves that side
    unnormalised. ``|d| > DOT_THRESHOLD`` (nearly parallel or anti-parallel) selects LERP.
    Where FusionBench would divide by ``sin θ₀ = 0`` (only possible with ``DOT_THRESHOLD = 1``)
    this falls back to LERP instead of producing NaN.
    """
    norm_a = math.sqrt(stats.sumsq_a)
    norm_b = math.sqrt(stats.sumsq_b)
    normalised_a = norm_a > epsilon
    normalised_b = norm_b > epsilon
    scale = (norm_a if normalised_a else 1.0) * (norm_b if normalised_b else 1.0)
    d_value = stats.dot / scale if scale != 0.0 else 0.0
    d = torch.tensor(d_value, dtype=dtype)
    branch: Branch = "slerp" if normalised_a and normalised_b else "unnormalised"
    if bool(torch.abs(d) > DOT_THRESHOLD):
        return _lerp_coefficients(t, dtype, float(d), norm_a, norm_b)
    theta_0 = torch.arccos(d)
    # FusionBench takes sin θ₀ with numpy (np.sin of a 0-d tensor); numpy and torch can differ
    # by one ulp here, and it scales every element of the result.
    sin_theta_0 = np.sin(theta_0.numpy())
    if sin_theta_0 == 0.0:
        log.warning("sin(theta_0) is 0 (d=%r, DOT_THRESHOLD=%r): using LERP", float(d), DOT_THRESHOLD)
        return _lerp_coefficients(t, dtype, float(d), norm_a, norm_b)
    theta_t = theta_0 * t
    s0 = torch.sin(theta_0 - theta_t) / sin_theta_0
    s1 = torch.sin(theta_t) / sin_theta_0
    return SlerpCoefficients(branch, s0.to(dtype), s1.to(dtype), float(d), norm_a, norm_b)


def _lerp_coefficients(
    t: float, dtype: torch.dtype, d: float, norm_a: float, norm_b: float
) -> SlerpCoefficients:
    return SlerpCoefficients(
        "lerp", torch.tensor(1 - t, dtype=dtype), torch.tensor(t, dtype=dtype), d, norm_a, norm_b
    )


def combine(
    a: torch.Tensor,
    b: torch.Tensor,
    coeff: SlerpCoefficients,
    out: torch.Tensor | None = None,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pass 2 on one chunk: ``s0·a + s1·b``, rounded exactly as FusionBench's ``s0*A + s1*B``.

    ``a``/``b`` are in the compute dtype. ``out`` and ``scratch`` (same shape and dtype) may be
    given to avoid allocations; ``out`` may alias ``a`` and ``scratch`` may alias ``b``.
    """
    s0 = coeff.s0.to(a.device)
    s1 = coeff.s1.to(a.device)
    out = torch.mul(a, s0, out=out) if out is not None else torch.mul(a, s0)
    scratch = torch.mul(b, s1, out=scratch) if scratch is not None else torch.mul(b, s1)
    return out.add_(scratch)


def _chunks(n: int, chunk_elements: int) -> Iterable[slice]:
    for start in range(0, n, chunk_elements):
        yield slice(start, min(n, start + chunk_elements))


def slerp(
    t: float,
    v0: torch.Tensor,
    v1: torch.Tensor,
    DOT_THRESHOLD: float = DEFAULT_DOT_THRESHOLD,
    epsilon: float = DEFAULT_EPSILON,
    *,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """SLERP of two same-shape tensors with the two-pass chunked kernel.

    Returns the result in the compute dtype (float32, or float64 for float64 ``v0``) on ``v0``'s
    device, as FusionBench's ``slerp`` does; cast it to model_1's dtype to store it.

    Raises:
        ValueError: the shapes differ.
    """
    return slerp_with_coefficients(
        t, v0, v1, DOT_THRESHOLD, epsilon, chunk_elements=chunk_elements
    )[0]


def slerp_with_coefficients(
    t: float,
    v0: torch.Tensor,
    v1: torch.Tensor,
    DOT_THRESHOLD: float = DEFAULT_DOT_THRESHOLD,
    epsilon: float = DEFAULT_EPSILON,
    *,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, SlerpCoefficients]:
    """:func:`slerp`, also returning the branch and scalars it used."""
    if v0.shape != v1.shape:
        raise ValueError(f"shape mismatch: {tuple(v0.shape)} vs {tuple(v1.shape)}")
    dtype = compute_dtype(v0.dtype)
    a = v0.reshape(-1)
    b = v1.reshape(-1).to(v0.device)
    stats = accumulate_chunks((a[s].to(dtype), b[s].to(dtype)) for s in _chunks(a.numel(), chunk_elements))
    coeff = coefficients(t, stats, dtype=dtype, DOT_THRESHOLD=DOT_THRESHOLD, epsilon=epsilon)
    out = torch.empty(a.numel(), dtype=dtype, device=v0.device)
    for s in _chunks(a.numel(), chunk_elements):
        combine(a[s].to(dtype), b[s].to(dtype), coeff, out=out[s])
    return out.reshape(v0.shape), coeff


def slerp_reference(
    t: float,
    v0: torch.Tensor,
    v1: torch.Tensor,
    DOT_THRESHOLD: float = DEFAULT_DOT_THRESHOLD,
    epsilon: float = DEFAULT_EPSILON,
) -> torch.Tensor:
    """FusionBench's SLERP op order on whole tensors (memory ~10× the tensor; for checks only)."""
    if v0.dtype not in (torch.float32, torch.float64):
        v0 = v0.to(torch.float32)
        v1 = v1.to(torch.float32)
    a, b = v0.clone(), v1.clone()
    norm0 = torch.linalg.norm(v0)
    norm1 = torch.linalg.norm(v1)
    n0 = v0 / norm0 if norm0 > epsilon else v0
    n1 = v1 / norm1 if norm1 > epsilon else v1
    dot = torch.sum(n0 * n1)
    if torch.abs(dot) > DOT_THRESHOLD:
        return (1 - t) * a + t * b
    theta_0 = torch.arccos(dot)
    sin_theta_0 = np.sin(theta_0.cpu().numpy())
    theta_t = theta_0 * t
    s0 = torch.sin(theta_0 - theta_t) / sin_theta_0
    s1 = torch.sin(theta_t) / sin_theta_0
    return s0 * a + s1 * b
