"""slerp_plugin: SLERP merges of causal LMs with FusionBench ``SlerpForCausalLM`` semantics.

Importing the package is cheap (no torch); the public API loads on first use:

- :func:`slerp`, :func:`slerp_reference` — the kernel (:mod:`slerp_plugin.slerp`);
- :class:`MergeSpec` — the typed merge description (:mod:`slerp_plugin.spec`);
- :func:`run_merge`, :func:`plan_merge`, :func:`merge_shards`, :func:`finalize` — the streaming
  engine (:mod:`slerp_plugin.engine`).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "slerp": "slerp_plugin.slerp",
    "slerp_reference": "slerp_plugin.slerp",
    "MergeSpec": "slerp_plugin.spec",
    "ModelRef": "slerp_plugin.spec",
    "run_merge": "slerp_plugin.engine",
    "plan_merge": "slerp_plugin.engine",
    "merge_shards": "slerp_plugin.engine",
    "finalize": "slerp_plugin.engine",
    "Manifest": "slerp_plugin.manifest",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'slerp_plugin' has no attribute {name!r}")
