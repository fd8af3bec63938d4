"""``python -m slerp_plugin`` = ``slerp-merge``."""

from .cli import entry

entry()
