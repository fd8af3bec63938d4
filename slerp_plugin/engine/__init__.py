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

from .execute import merge_shards, prepare
from .finish import MergeResult, finalize, input_records
from .inputs import InputHashes
from .plan import VOCAB_TENSOR_NAMES, MergePlan, ShardPlan, TensorJob, layer_fraction, plan_resolved
from .resources import compute_threads, resolve_device
from .resume import ShardOutcome

__all__ = [
    "VOCAB_TENSOR_NAMES", "InputHashes", "MergePlan", "MergeResult", "ShardOutcome", "ShardPlan", "TensorJob",
    "compute_threads", "finalize", "input_records", "layer_fraction", "merge_shards", "plan_resolved",
    "prepare", "resolve_device",
]
