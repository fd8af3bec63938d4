"""slerp_plugin: SLERP merges of causal LMs with FusionBench ``SlerpForCausalLM`` semantics.

Importing the package is cheap (no torch); the public API loads on first use:

- :func:`slerp`, :func:`slerp_reference` — the kernel (:mod:`slerp_plugin.kernel`);
- :class:`MergeSpec` — the typed merge description (:mod:`slerp_plugin.spec`);
- :func:`run_merge`, :func:`plan_merge` — a whole merge, Hub inputs and upload included
  (:mod:`slerp_plugin.merge`); :func:`stream_merge` — Hub to Hub with bounded disk
  (:mod:`slerp_plugin.stream`); :func:`merge_shards`, :func:`finalize` — the streaming engine's
  steps, for merges shared by several workers (:mod:`slerp_plugin.engine`);
- :func:`run_sweep` — the merge evaluated at several t in one read of the parents, the best t
  chosen (:mod:`slerp_plugin.sweep`);
- :class:`Manifest` — ``merge_manifest.json`` (:mod:`slerp_plugin.formats.manifest`).

The package's layers, bottom to top: :mod:`~slerp_plugin.errors`, :mod:`~slerp_plugin.kernel` (the
kernel) and :mod:`~slerp_plugin.spec`; :mod:`~slerp_plugin.io`; :mod:`~slerp_plugin.formats`;
:mod:`~slerp_plugin.engine` and :mod:`~slerp_plugin.hub`; :mod:`~slerp_plugin.preflight`;
:mod:`~slerp_plugin.validate`; :mod:`~slerp_plugin.stream`; :mod:`~slerp_plugin.merge`;
:mod:`~slerp_plugin.sweep`; :mod:`~slerp_plugin.demo`; :mod:`~slerp_plugin.cli`;
:mod:`~slerp_plugin.integrations` (mergekit, Airflow). Each imports only from layers below it.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers see; at run time each name loads on first use
    from .engine import finalize, merge_shards
    from .formats.manifest import Manifest
    from .kernel import slerp, slerp_reference
    from .merge import plan_merge, run_merge
    from .spec import MergeSpec, ModelRef
    from .stream import stream_merge
    from .sweep import SweepResult, run_sweep

__version__ = "0.1.0"

_LAZY = {
    "slerp": "slerp_plugin.kernel",
    "slerp_reference": "slerp_plugin.kernel",
    "MergeSpec": "slerp_plugin.spec",
    "ModelRef": "slerp_plugin.spec",
    "run_merge": "slerp_plugin.merge",
    "plan_merge": "slerp_plugin.merge",
    "stream_merge": "slerp_plugin.stream",
    "merge_shards": "slerp_plugin.engine",
    "finalize": "slerp_plugin.engine",
    "Manifest": "slerp_plugin.formats.manifest",
    "run_sweep": "slerp_plugin.sweep",
    "SweepResult": "slerp_plugin.sweep",
}

__all__ = ["Manifest", "MergeSpec", "ModelRef", "SweepResult", "__version__", "finalize", "merge_shards",
           "plan_merge", "run_merge", "run_sweep", "slerp", "slerp_reference", "stream_merge"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'slerp_plugin' has no attribute {name!r}")
