"""Which branch SLERP took per tensor, and the tensors where that choice hangs on the last bits.

The engine takes ``d`` from norms and a dot product summed in float64; FusionBench takes it from
float32 ``torch.linalg.norm`` and ``torch.sum`` over the whole tensor, which can be off by about
1e-3 relative on large tensors. Where ``|d|`` lies within :data:`SENSITIVE_WINDOW` of
DOT_THRESHOLD the two can choose different branches; those tensors are listed.
"""

from __future__ import annotations

from ..defaults import DEFAULT_DOT_THRESHOLD
from ..formats.manifest import Manifest
from .report import BranchResult, BranchSensitiveTensor

#: ``| |d| − DOT_THRESHOLD |`` up to this counts as branch-sensitive
SENSITIVE_WINDOW = 1e-5


def branch_result(manifest: Manifest, window: float = SENSITIVE_WINDOW) -> BranchResult:
    """Branch counts and the branch-sensitive tensors of a merge (closest to the threshold first)."""
    tau = float(manifest.spec.get("DOT_THRESHOLD", DEFAULT_DOT_THRESHOLD))
    sensitive = [
        BranchSensitiveTensor(name=t.name, d=t.d, branch=t.branch)
        for t in manifest.tensors
        if isinstance(t.d, (int, float)) and abs(abs(t.d) - tau) <= window
    ]
    sensitive.sort(key=lambda s: abs(abs(s.d) - tau))
    return BranchResult(counts=dict(manifest.branch_counts), DOT_THRESHOLD=tau, window=window,
                        sensitive=sensitive)
