"""mergekit integration: the ``slerp_for_causal_lm`` method (:mod:`.method`, the kernel the engine
uses), our manifest and model card for mergekit runs of it (:mod:`.run`), and the import hook
(:mod:`.hook`) that registers both whenever mergekit loads, so plain ``mergekit-yaml`` knows the
method once this package is installed. Importing this package imports neither mergekit nor torch.
"""

from __future__ import annotations


def register() -> None:
    """Register ``slerp_for_causal_lm`` with mergekit and add our manifest and card to its
    ``run_merge`` (idempotent). Needed only where the import hook is off
    (``SLERP_PLUGIN_MERGEKIT_HOOK=0``) or the ``.pth`` file is missing.
    """
    from .hook import installed
    from .method import register as register_method
    from .run import patch_mergekit

    register_method()
    patch_mergekit(import_merge=not installed())
