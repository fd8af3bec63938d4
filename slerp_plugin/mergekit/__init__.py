"""mergekit integration: ``import slerp_plugin.mergekit`` registers ``slerp_for_causal_lm``.

Registration is idempotent. Once this package is installed, plain ``mergekit-yaml`` finds the
method without any import: :mod:`slerp_plugin._mergekit_hook` (started from a ``.pth`` file)
registers it when mergekit loads its method registry; ``SLERP_PLUGIN_MERGEKIT_HOOK=0`` turns that
off. The kernel is :func:`slerp_plugin.slerp.slerp_with_coefficients`, the one the engine uses.
"""

from __future__ import annotations

from .._mergekit_hook import installed as _hook_installed
from .method import METHOD_NAME, register, slerp_for_causal_lm_method
from .run import patch_mergekit

register()
patch_mergekit(import_merge=not _hook_installed())

__all__ = ["METHOD_NAME", "register", "slerp_for_causal_lm_method", "patch_mergekit"]
