"""The streaming merge engine: MergeSpec → plan of output shards → streamed, resumable execution.

- :func:`plan_resolved` (:mod:`.plan`): headers only; which tensor goes to which output shard.
- :func:`merge_shards` (:mod:`.execute`): the shards streamed through the kernel into
  ``<output>.partial``, each journalled when finished (:mod:`.resume`).
- :func:`finalize` (:mod:`.finish`): index, configs, tokenizer, manifest, model card, and one
  rename to ``<output>``.

Several workers may share one merge: :func:`~slerp_plugin.merge.plan_merge` on each, :func:`merge_shards` with
disjoint ``indices``, then one :func:`finalize`. The engine reads local folders only; Hub
references are resolved by :mod:`slerp_plugin.merge`.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers see; at run time each name loads on first use, so that a task
    # that only plans or finishes a merge (or reads where its output goes) loads no torch
    from .execute import merge_shards, prepare
    from .finish import MergeResult, finalize, input_records
    from .inputs import InputHashes
    from .plan import VOCAB_TENSOR_NAMES, MergePlan, ShardPlan, TensorJob, layer_fraction, plan_resolved
    from .resources import compute_threads, resolve_device
    from .resume import ShardOutcome

_LAZY = {
    "merge_shards": "execute", "prepare": "execute", "MergeResult": "finish", "finalize": "finish",
    "input_records": "finish", "InputHashes": "inputs", "VOCAB_TENSOR_NAMES": "plan", "MergePlan": "plan",
    "ShardPlan": "plan", "TensorJob": "plan", "layer_fraction": "plan", "plan_resolved": "plan",
    "compute_threads": "resources", "resolve_device": "resources", "ShardOutcome": "resume",
}

__all__ = [
    "VOCAB_TENSOR_NAMES", "InputHashes", "MergePlan", "MergeResult", "ShardOutcome", "ShardPlan", "TensorJob",
    "compute_threads", "finalize", "input_records", "layer_fraction", "merge_shards", "plan_resolved",
    "prepare", "resolve_device",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
