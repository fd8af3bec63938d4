"""The ``slerp_for_causal_lm`` merge method for mergekit's registry.

Parameters (resolved per tensor by mergekit, so gradients and filters apply): ``t`` in [0, 1]
(required), ``DOT_THRESHOLD`` in (0, 1] (default 0.9995), ``epsilon`` > 0 (default 1e-8).
Inputs: ``base_model`` (model_1, t = 0) and exactly one other model (model_2, t = 1).
The result is cast to the base tensor's dtype, as FusionBench casts to model_1's; mergekit then
applies ``out_dtype``.
"""

from __future__ import annotations

import threading
from typing import Annotated

import torch
from mergekit.merge_methods import register as _mk_register
from mergekit.merge_methods import registered_methods
from mergekit.merge_methods.base import BasePolicy, InputContract, MergeMethod, TensorGroup
from mergekit.merge_methods.easy_define import merge_method
from pydantic import Field

from ...kernel import DEFAULT_DOT_THRESHOLD, DEFAULT_EPSILON, SlerpCoefficients, slerp_with_coefficients

METHOD_NAME = "slerp_for_causal_lm"


class KernelRecorder:
    """Collects (t, coefficients) per tensor name while a mergekit run of our method is active."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.records: dict[str, tuple[float, SlerpCoefficients]] | None = None

    def start(self) -> None:
        with self._lock:
            self.records = {}

    def stop(self) -> dict[str, tuple[float, SlerpCoefficients]]:
        with self._lock:
            records, self.records = self.records or {}, None
        return records

    def add(self, name: str | None, t: float, coeff: SlerpCoefficients) -> None:
        with self._lock:
            if self.records is not None and name:
                self.records[name] = (t, coeff)


RECORDER = KernelRecorder()


def _kernel(
    group: TensorGroup,
    t: Annotated[float, Field(ge=0.0, le=1.0)],
    DOT_THRESHOLD: Annotated[float, Field(gt=0.0, le=1.0)] = DEFAULT_DOT_THRESHOLD,
    epsilon: Annotated[float, Field(gt=0.0)] = DEFAULT_EPSILON,
) -> torch.Tensor:
    base = group.base.tensor
    other = group.non_base[0].tensor
    merged, coeff = slerp_with_coefficients(t, base, other, DOT_THRESHOLD, epsilon)
    RECORDER.add(group.metadata.name, t, coeff)
    return merged.to(base.dtype)


slerp_for_causal_lm_method: MergeMethod = merge_method(
    _kernel,
    name=METHOD_NAME,
    pretty_name="SLERP (FusionBench SlerpForCausalLM, slerp_plugin)",
    reference_url="https://github.com/tanganke/fusion_bench",
    contract=InputContract(base=BasePolicy.REQUIRED, min_inputs=2, max_inputs=2),
)


def register() -> MergeMethod:
    """Register the method with mergekit (once per process); return the registered method."""
    for method in registered_methods():
        if method.spec.name == METHOD_NAME:
            return method
    _mk_register(slerp_for_causal_lm_method)
    return slerp_for_causal_lm_method
