"""The SLERP kernel: FusionBench ``SlerpForCausalLM`` semantics, computed in two chunked passes.

Per tensor the whole tensor is one flattened vector. With ``A`` (model_1), ``B`` (model_2):

1. If ``A`` is not float32/float64 both are computed in float32 (float64 stays float64).
2. ``â = A/‖A‖`` if ``‖A‖ > epsilon`` else ``A`` (not normalised); the same for ``B``.
3. ``d = Σ â·b̂``.
4. ``|d| > DOT_THRESHOLD`` → LERP on the unnormalised tensors ``(1−t)·A + t·B``; otherwise
   ``θ₀ = arccos d``, ``θₜ = θ₀·t`` and ``r = sin(θ₀−θₜ)/sin θ₀ · A + sin θₜ/sin θ₀ · B``.
5. The caller casts ``r`` to model_1's dtype.

Pass 1 (:func:`accumulate_chunks`) sums ``‖A‖²``, ``‖B‖²`` and ``A·B`` chunk by chunk from
float64 products, which are exact for elements of float32 precision or less, so ``d`` is the
float64 cosine (to about 1e-15) on any CPU or GPU; :func:`coefficients` turns the sums into the
branch and the scalars ``s0, s1`` with the same scalar op order as FusionBench; pass 2
(:func:`combine`) computes ``s0·A + s1·B`` chunk by chunk in the compute dtype. Scratch memory is
therefore bounded by the chunk size, not by the tensor.

FusionBench takes ``d`` from float32 ``torch.linalg.norm`` and ``torch.sum`` over the whole
tensor. Float32 reductions over millions of elements put ``d`` off by 1e-6 to 1e-4, by amounts
that depend on the CPU and its BLAS code path, so where ``|d|`` lies that close to DOT_THRESHOLD
FusionBench's own branch choice changes with the machine, and can differ from the exact one.
:func:`fusionbench_coefficients` takes ``d`` FusionBench's way (``norm_precision="float32"``) from
whole tensors in memory, reproducing FusionBench run on the same machine.

:func:`slerp_reference` is FusionBench's op order on whole tensors, kept for tests and for the
validator's spot re-computation.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from .defaults import DEFAULT_CHUNK_ELEMENTS, DEFAULT_DOT_THRESHOLD, DEFAULT_EPSILON

__all__ = ["DEFAULT_CHUNK_ELEMENTS", "DEFAULT_DOT_THRESHOLD", "DEFAULT_EPSILON", "NormPrecision",
           "SlerpCoefficients", "SlerpStats", "accumulate", "accumulate_chunks", "coefficients",
           "coefficients_from_d", "combine", "compute_dtype", "fusionbench_coefficients", "slerp",
           "slerp_reference", "slerp_with_coefficients"]

log = logging.getLogger(__name__)


Branch = Literal["slerp", "lerp", "unnormalised"]
#: how ``d`` is computed: ``float64`` sums over chunks (default), or FusionBench's whole-tensor
#: ``torch.linalg.norm`` and ``torch.sum`` in the compute dtype (``float32``)
NormPrecision = Literal["float64", "float32"]


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
    ``d`` is the cosine of the normalised (or, below epsilon, unnormalised) pair, taken with
    ``norm_precision``: the float64 value from exact products (``float64``), or FusionBench's
    float32 one (``float32``). The branch compared it, rounded to the compute dtype, with
    DOT_THRESHOLD.
    """

    branch: Branch
    s0: torch.Tensor
    s1: torch.Tensor
    d: float
    norm_a: float
    norm_b: float
    norm_precision: NormPrecision = "float64"

    def as_record(self) -> dict[str, float | str]:
        """A JSON-friendly summary for the manifest."""
        return {
            "branch": self.branch,
            "d": _finite_or_str(self.d),
            "s0": _finite_or_str(float(self.s0)),
            "s1": _finite_or_str(float(self.s1)),
            "norm_precision": self.norm_precision,
        }


def _finite_or_str(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


def accumulate(a: torch.Tensor, b: torch.Tensor) -> SlerpStats:
    """Pass 1 on one chunk: the sums of ``a²``, ``b²`` and ``a·b`` of two 1-D tensors, in float64.

    See :func:`accumulate_chunks` for how they are taken and how exact they are.
    """
    return accumulate_chunks([(a, b)])


def accumulate_chunks(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> SlerpStats:
    """Pass 1 over consecutive chunks of a flattened tensor pair: ``Σa²``, ``Σb²`` and ``Σa·b``.

    Every chunk is taken in float64 (chunks in another floating dtype are widened; pass float64
    chunks to spare the copy), so each product of two elements of at most float32 precision is
    exact. Each chunk's three sums are float64 dot products on the chunks' device, and the chunk
    sums are added with :func:`math.fsum` after one device→host transfer for all of them. For a
    chunk of ``m`` elements a sum's error is at most ``m·2⁻⁵³·Σ|aᵢbᵢ|`` and in practice near
    ``√m·2⁻⁵³`` of it, so ``d`` is the float64 cosine to about 1e-15 (measured) on any CPU or GPU,
    whatever float32 code path the host's BLAS takes. ``pairs`` may reuse buffers: each pair is
    reduced before the next is drawn.
    """
    sums = []
    for a, b in pairs:
        x = a if a.dtype == torch.float64 else a.to(torch.float64)
        y = b if b.dtype == torch.float64 else b.to(torch.float64)
        sums.append(torch.stack((torch.dot(x, x), torch.dot(y, y), torch.dot(x, y))))
    if not sums:
        return SlerpStats()
    return SlerpStats(*(math.fsum(column) for column in zip(*torch.stack(sums).tolist(), strict=True)))


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
    scale = (norm_a if norm_a > epsilon else 1.0) * (norm_b if norm_b > epsilon else 1.0)
    d = stats.dot / scale if scale != 0.0 else 0.0
    return coefficients_from_d(t, d, norm_a, norm_b, dtype=dtype, DOT_THRESHOLD=DOT_THRESHOLD,
                               epsilon=epsilon)


def fusionbench_coefficients(
    t: float,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    DOT_THRESHOLD: float = DEFAULT_DOT_THRESHOLD,
    epsilon: float = DEFAULT_EPSILON,
) -> SlerpCoefficients:
    """The branch and scalars with ``d`` taken as FusionBench takes it: ``torch.linalg.norm`` of each
    whole tensor, the division, and ``torch.sum`` of the product, all in the compute dtype of the
    tensors given (float32 for 16-bit models).

    ``a``/``b`` must be whole tensors in their own shape, in the compute dtype, and are
    overwritten (pass copies): the division and the product happen in place, which rounds exactly
    as FusionBench's new tensors do, so no memory beyond the two tensors is needed.
    """
    norm_a, norm_b = torch.linalg.norm(a), torch.linalg.norm(b)
    na = a.div_(norm_a) if norm_a > epsilon else a
    nb = b.div_(norm_b) if norm_b > epsilon else b
    d = torch.sum(na.mul_(nb))
    coeff = coefficients_from_d(t, float(d), float(norm_a), float(norm_b), dtype=a.dtype,
                                DOT_THRESHOLD=DOT_THRESHOLD, epsilon=epsilon)
    return dataclasses.replace(coeff, norm_precision="float32")


def coefficients_from_d(
    t: float,
    d: float,
    norm_a: float,
    norm_b: float,
    *,
    dtype: torch.dtype = torch.float32,
    DOT_THRESHOLD: float = DEFAULT_DOT_THRESHOLD,
    epsilon: float = DEFAULT_EPSILON,
) -> SlerpCoefficients:
    """The branch and scalars from the cosine ``d`` and the two norms.

    The branch and the angle use ``d`` rounded to ``dtype``, as FusionBench's ``d`` is a tensor of
    the compute dtype (compared with DOT_THRESHOLD in that dtype too); the coefficients record
    ``d`` as given.
    """
    d_t = torch.tensor(d, dtype=dtype)
    branch: Branch = "slerp" if norm_a > epsilon and norm_b > epsilon else "unnormalised"
    if bool(torch.abs(d_t) > DOT_THRESHOLD):
        return _lerp_coefficients(t, dtype, d, norm_a, norm_b)
    theta_0 = torch.arccos(d_t)
    # FusionBench takes sin θ₀ with numpy (np.sin of a 0-d tensor); numpy and torch can differ
    # by one ulp here, and it scales every element of the result.
    sin_theta_0 = np.sin(theta_0.cpu().numpy())
    if sin_theta_0 == 0.0:
        log.warning("sin(theta_0) is 0 (d=%r, DOT_THRESHOLD=%r): using LERP", d, DOT_THRESHOLD)
        return _lerp_coefficients(t, dtype, d, norm_a, norm_b)
    theta_t = theta_0 * t
    s0 = torch.sin(theta_0 - theta_t) / sin_theta_0
    s1 = torch.sin(theta_t) / sin_theta_0
    return SlerpCoefficients(branch, s0.to(dtype), s1.to(dtype), d, norm_a, norm_b)


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
    norm_precision: NormPrecision = "float64",
) -> torch.Tensor:
    """SLERP of two same-shape tensors with the two-pass chunked kernel.

    Args:
        t: the interpolation factor, 0 ≤ t ≤ 1 (0 gives ``v0``, 1 gives ``v1``).
        v0: model_1's tensor (any float dtype, any device).
        v1: model_2's tensor, the same shape as ``v0``.
        DOT_THRESHOLD: LERP is used where the cosine ``|d|`` of the two exceeds it (default 0.9995).
        epsilon: norms at or below it are not normalised (default 1e-8).
        chunk_elements: elements per chunk of the two passes (default 524288); the result does not
            depend on it.
        norm_precision: ``"float64"`` (default) takes ``d`` from exact float64 sums, the same on
            every machine; ``"float32"`` takes it as FusionBench does on this machine
            (:func:`fusionbench_coefficients`).

    Returns:
        The merged tensor in the compute dtype (float32, or float64 for float64 ``v0``) on ``v0``'s
        device, as FusionBench's ``slerp`` returns it; cast it to model_1's dtype to store it.

    Raises:
        ValueError: the shapes differ.
    """
    return slerp_with_coefficients(
        t, v0, v1, DOT_THRESHOLD, epsilon, chunk_elements=chunk_elements, norm_precision=norm_precision
    )[0]


def slerp_with_coefficients(
    t: float,
    v0: torch.Tensor,
    v1: torch.Tensor,
    DOT_THRESHOLD: float = DEFAULT_DOT_THRESHOLD,
    epsilon: float = DEFAULT_EPSILON,
    *,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    norm_precision: NormPrecision = "float64",
) -> tuple[torch.Tensor, SlerpCoefficients]:
    """:func:`slerp`, also returning the branch and scalars it used."""
    if v0.shape != v1.shape:
        raise ValueError(f"shape mismatch: {tuple(v0.shape)} vs {tuple(v1.shape)}")
    dtype = compute_dtype(v0.dtype)
    a = v0.reshape(-1)
    b = v1.reshape(-1).to(v0.device)
    if norm_precision == "float32":
        coeff = fusionbench_coefficients(t, v0.to(dtype, copy=True), v1.to(v0.device, dtype, copy=True),
                                         DOT_THRESHOLD=DOT_THRESHOLD, epsilon=epsilon)
    else:
        wide = torch.float64
        pieces = ((a[s].to(wide), b[s].to(wide)) for s in _chunks(a.numel(), chunk_elements))
        stats = accumulate_chunks(pieces)
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
    *,
    norm_precision: NormPrecision = "float32",
) -> torch.Tensor:
    """FusionBench's SLERP op order on whole tensors (memory ~10× the tensor; for checks only).

    Args:
        t: the interpolation factor, 0 ≤ t ≤ 1.
        v0: model_1's tensor.
        v1: model_2's tensor, the same shape.
        DOT_THRESHOLD: LERP where ``|d|`` exceeds it (default 0.9995).
        epsilon: norms at or below it are not normalised (default 1e-8).
        norm_precision: ``"float32"`` (default) is FusionBench's own op order; ``"float64"`` takes
            ``d`` from float64 norms and dot instead (the engine's default), everything else
            unchanged.

    Returns:
        The merged tensor in float32 (float64 for float64 inputs).
    """
    if v0.dtype not in (torch.float32, torch.float64):
        v0 = v0.to(torch.float32)
        v1 = v1.to(torch.float32)
    a, b = v0.clone(), v1.clone()
    if norm_precision == "float64":
        x, y = v0.double(), v1.double()
        nx, ny = float(torch.linalg.norm(x)), float(torch.linalg.norm(y))
        scale = (nx if nx > epsilon else 1.0) * (ny if ny > epsilon else 1.0)
        dot = torch.tensor(float((x * y).sum()) / scale if scale else 0.0, dtype=v0.dtype)
    else:
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
